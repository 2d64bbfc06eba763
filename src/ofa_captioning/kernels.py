"""How the network's convolutions and linear layers run: oneDNN fast paths on a CPU, plain PyTorch elsewhere.

The network modules (:mod:`~ofa_captioning.resnet`, :mod:`~ofa_captioning.transformer`) call only this module's
interface; it is the one place that uses torch's private oneDNN operators (``torch.ops.mkldnn``):

* :class:`InferenceLinear` - ``x W^T + b`` with the weight prepacked once into oneDNN's blocked layout;
* :class:`FoldedConv` with :func:`pack_conv_weight`, :func:`conv2d` and :func:`conv2d_add_relu` - a convolution
  (BatchNorm folded in) with its ReLU, or the residual add and ReLU, fused into the oneDNN convolution as
  post-ops (one pass over each output instead of two or three);
* :func:`in_cpu_chunks` - a batch run a few images at a time on a CPU, so that their activations stay in cache.

Every fast path has a plain-PyTorch fallback with the same arithmetic (``F.linear``, ``F.conv2d`` then ``relu_``
/ ``add_``), taken off the CPU, for dtypes oneDNN does not serve, with autograd on, and where this torch build
lacks one of the private operators (they are not a stable API). A missing operator is logged once, at WARNING,
naming it; the results are equal up to float rounding, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FoldedConv",
    "InferenceLinear",
    "conv2d",
    "conv2d_add_relu",
    "in_cpu_chunks",
    "onednn_serves",
    "pack_conv_weight",
]

log = logging.getLogger(__name__)

# The private operators used, by name under torch.ops.mkldnn ("op.overload" for an overload).
_LINEAR = "_linear_pointwise"
_PACK_LINEAR = "_reorder_linear_weight"
_CONV = "_convolution_pointwise"
_CONV_BINARY = "_convolution_pointwise.binary"
_PACK_CONV = "_reorder_convolution_weight"
_BF16_SUPPORTED = "_is_mkldnn_bf16_supported"

_reported_missing: set[str] = set()


def _onednn_op(name: str) -> Callable | None:
    """``torch.ops.mkldnn.<name>``, or None where this torch build lacks it (logged once per name)."""
    target = torch.ops.mkldnn
    try:
        for part in name.split("."):
            target = getattr(target, part)
    except (AttributeError, RuntimeError) as e:
        if name not in _reported_missing:
            _reported_missing.add(name)
            log.warning(
                "oneDNN fast path off: torch %s has no torch.ops.mkldnn.%s (%s); using plain PyTorch instead "
                "(equal results up to float rounding, slower)",
                torch.__version__,
                name,
                e,
            )
        return None
    return target


def onednn_serves(t: Tensor) -> bool:
    """Whether oneDNN's CPU kernels serve ``t``'s device and dtype (float32; bfloat16 where the CPU has it)."""
    if t.device.type != "cpu" or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if t.dtype == torch.float32:
        return True
    if t.dtype != torch.bfloat16:
        return False
    bf16_supported = _onednn_op(_BF16_SUPPORTED)
    return bf16_supported is not None and bool(bf16_supported())


def _fusable(x: Tensor) -> bool:
    """Whether a fused oneDNN convolution may take ``x``: served by oneDNN, channels-last, no autograd."""
    return (
        onednn_serves(x)
        and not torch.is_grad_enabled()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


# ------------------------------------------------------------------------------------------------ linear


class InferenceLinear:
    """``x W^T + b`` over inference weights (derived or the module's own, never trained through).

    Where oneDNN serves the weight's device and dtype (CPU float32, bfloat16 where the CPU has it), the weight is
    also prepacked once into oneDNN's blocked layout: ``F.linear`` repacks it on every call, which costs most of
    the decoder's per-step GEMMs (a handful of rows) and of the vocabulary-sized output projection. The packed
    copy costs the weight's size again in memory. ``packed`` is None where the plain ``F.linear`` runs.
    """

    __slots__ = ("weight", "bias", "packed", "_matmul")

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        self.weight = weight
        self.bias = bias
        self.packed: Tensor | None = None
        self._matmul: Callable | None = None
        if onednn_serves(weight):
            matmul, pack = _onednn_op(_LINEAR), _onednn_op(_PACK_LINEAR)
            if matmul is not None and pack is not None:
                self.packed = pack(weight)
                self._matmul = matmul

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.dtype == self.weight.dtype and x.device.type == "cpu":
            return self._matmul(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------------------- convolution


class FoldedConv(NamedTuple):
    """A convolution with its BatchNorm folded in: channels-last ``weight`` and ``bias``; ``packed`` is the weight
    prepacked into oneDNN's blocked layout (:func:`pack_conv_weight`), else None."""

    weight: Tensor
    bias: Tensor
    packed: Tensor | None


def pack_conv_weight(
    weight: Tensor, padding: list[int], stride: list[int], dilation: list[int], groups: int
) -> Tensor | None:
    """``weight`` prepacked into oneDNN's blocked layout for a convolution of that geometry, so that a call does
    not reorder it again; None where oneDNN does not serve it or this torch build cannot run packed weights."""
    if not onednn_serves(weight) or _onednn_op(_CONV) is None:
        return None
    pack = _onednn_op(_PACK_CONV)
    return None if pack is None else pack(weight, padding, stride, dilation, groups)


def conv2d(x: Tensor, conv: FoldedConv, *, stride: int = 1, padding: int = 0, relu: bool = False) -> Tensor:
    """``conv2d(x)``, then ReLU with ``relu``: one oneDNN convolution with the ReLU as a post-op where the weight
    is prepacked and ``x`` is channels-last on a CPU, else ``F.conv2d`` (then ``relu_``)."""
    if conv.packed is not None and _fusable(x):
        op = _onednn_op(_CONV)
        if op is not None:
            return op(
                x,
                conv.packed,
                conv.bias,
                [padding] * 2,
                [stride] * 2,
                [1, 1],
                1,
                "relu" if relu else "none",
                [],
                "",
            )
    out = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    return F.relu_(out) if relu else out


def conv2d_add_relu(x: Tensor, conv: FoldedConv, other: Tensor) -> Tensor:
    """``relu(conv2d(x) + other)`` for a 1x1, stride-1 convolution (a bottleneck's last one and its residual):
    the add and the ReLU as oneDNN post-ops where ``x`` is channels-last on a CPU, else ``F.conv2d``, ``add_``,
    ``relu_``. The weight is used unpacked: measured faster than a prepacked one for these convolutions."""
    if _fusable(x):
        op = _onednn_op(_CONV_BINARY)
        if op is not None:
            return op(x, other, conv.weight, conv.bias, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
    return F.relu_(F.conv2d(x, conv.weight, conv.bias).add_(other))


# ------------------------------------------------------------------------------------------------ batching


def in_cpu_chunks(fn: Callable[..., Tensor], chunk: int, x: Tensor, *per_image: Tensor | None) -> Tensor:
    """``fn(x, *per_image)`` over ``chunk`` images at a time where ``x`` is on a CPU and has more images than that
    (their activations then stay in cache), concatenated; else over the whole batch. ``per_image`` tensors
    (dim 0 = images) are split alongside ``x``; None stays None. ``chunk`` 0: always the whole batch."""
    if x.device.type != "cpu" or not chunk or x.shape[0] <= chunk:
        return fn(x, *per_image)
    parts = x.split(chunk)
    others = [[None] * len(parts) if t is None else t.split(chunk) for t in per_image]
    return torch.cat([fn(*args) for args in zip(parts, *others, strict=True)])
