"""OFA's image embedding: the stem and the first three stages of a bottleneck ResNet, [B,3,S,S] -> [B,1024,S/16,S/16].

Parameter names are torchvision's (ModelScope's ``ResNet`` in ``modelscope/models/multi_modal/ofa/resnet.py``).
For inference, :meth:`ResNet.fuse_batchnorm` folds every eval-mode BatchNorm into its convolution; the folded
convolutions run through :mod:`~ofa_captioning.kernels` (oneDNN with fused ReLU and residual post-ops on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import FoldedConv, conv2d, conv2d_add_relu, in_cpu_chunks, pack_conv_weight

__all__ = ["Bottleneck", "ResNet", "fold_batchnorm"]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), bias-free convs, BatchNorm."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.stride = stride
        # conv1..conv3 (and the downsampling conv) with their BatchNorm folded in: set by ResNet.fuse_batchnorm.
        self._fused: list[FoldedConv] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._fused is not None:
            c1, c2, c3, *ds = self._fused
            out = conv2d(x, c1, relu=True)
            out = conv2d(out, c2, stride=self.stride, padding=1, relu=True)
            identity = conv2d(x, ds[0], stride=self.stride) if ds else x
            return conv2d_add_relu(out, c3, identity)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(identity + out)


def fold_batchnorm(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None, pack: bool = False
) -> FoldedConv:
    """Conv weight and bias with an eval-mode BatchNorm folded in, computed in float64 and rounded once to
    ``dtype`` (default: the conv weight's).

    The weight is channels-last, the layout oneDNN/cuDNN convolutions run fastest in. With ``pack`` it is also
    prepacked for oneDNN where oneDNN serves it (:func:`~ofa_captioning.kernels.pack_conv_weight`): measured
    faster for the stem and the convolutions with a ReLU post-op, slower (several times, in torch 2.13) for the
    residual-add convolutions and the strided 1x1 downsampling ones, which are therefore left unpacked.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    dtype = dtype or conv.weight.dtype
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    packed = None
    if pack:
        packed = pack_conv_weight(
            weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
        )
    return FoldedConv(weight, bias.to(dtype), packed)


class ResNet(nn.Module):
    """Stem and the first three stages of a bottleneck ResNet: [B,3,S,S] -> [B,1024,S/16,S/16]."""

    def __init__(self, layers: tuple[int, int, int]):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self._fused_stem: FoldedConv | None = None
        # Images per pass on a CPU: one at a time measured faster per image than 2, 4 or 8.
        self.cpu_chunk_size = 1

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def fuse_batchnorm(self, dtype: torch.dtype | None = None) -> None:
        """Fold every eval-mode BatchNorm into its convolution (used by ``forward`` from then on), in float64,
        rounded once to ``dtype`` (default: the weights' own)."""
        self._fused_stem = fold_batchnorm(self.conv1, self.bn1, dtype, pack=True)
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                fused = [
                    fold_batchnorm(block.conv1, block.bn1, dtype, pack=True),
                    fold_batchnorm(block.conv2, block.bn2, dtype, pack=True),
                    fold_batchnorm(block.conv3, block.bn3, dtype),
                ]
                if block.downsample is not None:
                    fused.append(fold_batchnorm(block.downsample[0], block.downsample[1], dtype))
                block._fused = fused

    def unfuse_batchnorm(self) -> None:
        """Drop the folded weights (the modules' own parameters are used again)."""
        self._fused_stem = None
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                block._fused = None

    def forward(self, x: Tensor) -> Tensor:
        return in_cpu_chunks(self._forward, self.cpu_chunk_size, x)

    def _forward(self, x: Tensor) -> Tensor:
        if self._fused_stem is not None:
            x = conv2d(
                x.contiguous(memory_format=torch.channels_last),
                self._fused_stem,
                stride=2,
                padding=3,
                relu=True,
            )
        else:
            x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.layer3(self.layer2(self.layer1(x)))
