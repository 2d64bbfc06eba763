"""The user-facing captioning engine: checkpoint directory in, captions out.

>>> captioner = Captioner.from_pretrained("checkpoints/ofa-tiny-demo")
>>> captioner.caption([open("cat.jpg", "rb").read()])
[Caption(text='...', score=-0.83)]

The split the Triton ensemble uses is :meth:`Captioner.preprocess` (bytes/PIL -> float32 pixels, CPU only) and
:meth:`Captioner.generate` (pixels -> captions); :meth:`Captioner.caption` chains the two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .beam_search import BeamSearchSettings, Hypothesis, beam_search
from .checkpoint import load_state_dict
from .config import ModelConfig, TaskConfig, load_configs, parse_dtype
from .images import ImageInput, normalize_pixels, preprocess_images
from .model import OFAModel
from .tokenizer import OFATokenizer, load_tokenizer, postprocess_caption

__all__ = ["MAX_BEAM_SIZE", "MAX_LENGTH", "MIN_BEAM_SIZE", "MIN_LENGTH", "Caption", "Captioner"]

MIN_BEAM_SIZE, MAX_BEAM_SIZE = 1, 16
MIN_LENGTH, MAX_LENGTH = 1, 64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caption:
    """A caption and its score: the reference generator's length-normalised log-probability (higher is better)."""

    text: str
    score: float


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The torch dtype of a ``dtype`` argument (None: float32), parsed by :func:`~ofa_captioning.config.parse_dtype`."""
    if dtype is None:
        return torch.float32
    return getattr(torch, parse_dtype(dtype))


def tf32_flag(device: torch.device, dtype: torch.dtype, allow_tf32: bool) -> bool | None:
    """The value for torch's TF32 flags of a model on ``device`` in ``dtype``: ``allow_tf32`` for float32 on CUDA
    (where cuDNN's convolutions default to TF32, so "float32" would not be float32), None elsewhere (the flags
    only change CUDA float32 matmuls and convolutions: left as they are)."""
    if device.type == "cuda" and dtype == torch.float32:
        return allow_tf32
    return None


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


class Captioner:
    """OFA image captioning with the reference's semantics (ModelScope's OFA pipeline), built for throughput.

    Create it with :meth:`from_pretrained`. Methods are not thread-safe; use one instance per worker thread.
    """

    def __init__(
        self,
        model: OFAModel,
        tokenizer: OFATokenizer,
        task_config: TaskConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool = False,
    ):
        """Wrap a loaded model (see :meth:`from_pretrained`, which is the normal way in)."""
        if len(tokenizer) != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.task_config = task_config
        self._device = device
        self._dtype = dtype
        self._cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        if cuda_graphs and not self._cuda_graphs:
            log.warning("cuda_graphs ignored: the model runs on %s, not on a CUDA device", device)
        self._prompt_ids = torch.tensor(
            tokenizer.encode_prompt(task_config.prompt, task_config.max_src_length),
            dtype=torch.long,
            device=device,
        )

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        allow_tf32: bool = False,
        cuda_graphs: bool = False,
    ) -> Captioner:
        """Load a checkpoint directory in ModelScope's layout.

        ``device`` defaults to the CPU and ``dtype`` to float32; float16 and bfloat16 are for CUDA. On the CPU,
        bfloat16 runs where the CPU has bfloat16 kernels, and float16 runs for checks (its captions against
        float32's): it is slow where the CPU lacks float16 kernels (the ResNet's convolutions then take a slow
        path, seconds per image). Every hyper-parameter and generation default comes from the directory's
        ``config.json`` and ``configuration.json``.

        ``allow_tf32`` (float32 on CUDA only): False sets ``torch.backends.cuda.matmul.allow_tf32`` and
        ``torch.backends.cudnn.allow_tf32`` to False, so that float32 is float32 (cuDNN's default rounds
        convolution inputs to TF32); True sets both to True (faster, captions may flip on near-ties against the
        CPU). These flags are process-wide: they apply to every model of the process, and the last captioner
        loaded in float32 on CUDA sets them. Other devices and dtypes leave them as they are.

        ``cuda_graphs`` runs the decode step as CUDA graphs per (batch, beam) bucket
        (``beam_search(..., cuda_graphs=True)``); :meth:`warmup` runs the buckets it is given, so that they are
        captured before serving. On a device other than CUDA it is ignored, with one warning in the log.
        """
        path = Path(path)
        device = torch.device(device if device is not None else "cpu")
        resolved = _resolve_dtype(dtype)
        tf32 = tf32_flag(device, resolved, allow_tf32)
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        model_config, task_config = load_configs(path)
        model = cls._load_model(path, model_config)
        model.to(device=device)
        # BatchNorm folds and attention scales are derived from the float32 weights, then rounded once.
        model.prepare_for_inference(dtype=resolved)
        tokenizer = load_tokenizer(path, task_config.language)
        return cls(model, tokenizer, task_config, device=device, dtype=resolved, cuda_graphs=cuda_graphs)

    @staticmethod
    def _load_model(path: Path, config: ModelConfig) -> OFAModel:
        with torch.device("meta"):
            model = OFAModel(config)
        state = load_state_dict(path)
        # assign=True adopts the loaded tensors; the tied embedding is re-tied afterwards.
        model.load_state_dict(state, strict=True, assign=True)
        shared = model.encoder.embed_tokens
        model.decoder.embed_tokens = shared
        if config.share_decoder_input_output_embed:
            model.decoder.output_projection.weight = shared.weight
        # Buffers created on the meta device but absent from old checkpoints would stay meta; strict=True has
        # already refused those, so every tensor is materialised here.
        return model

    # -------------------------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the model's weights and activations."""
        return self._dtype

    @property
    def cuda_graphs(self) -> bool:
        """Whether the decode step runs as CUDA graphs (asked for, and the model is on a CUDA device)."""
        return self._cuda_graphs

    @property
    def setting_limits(self) -> tuple[int, int]:
        """The largest ``beam_size`` and ``max_length`` that :meth:`validate_settings` accepts."""
        cfg = self.task_config
        return max(MAX_BEAM_SIZE, cfg.beam_size), max(MAX_LENGTH, cfg.max_len_b)

    @property
    def patch_image_size(self) -> int:
        """Side of the square pixel input (configuration.json ``model.patch_image_size``)."""
        return self.task_config.patch_image_size

    @property
    def default_beam_size(self) -> int:
        """Beam size used when none is given (configuration.json ``model.beam_search.beam_size``)."""
        return self.task_config.beam_size

    @property
    def default_max_length(self) -> int:
        """Max length used when none is given (configuration.json ``model.beam_search.max_len_b``)."""
        return self.task_config.max_len_b

    # -------------------------------------------------------------------------------------------- API

    def validate_settings(
        self, beam_size: int | None = None, max_length: int | None = None
    ) -> tuple[int, int]:
        """Resolve ``None`` to the checkpoint's defaults and check the bounds.

        ``beam_size`` must be in 1..16 (or up to the checkpoint's own larger default) and ``max_length`` (the
        reference's ``max_len_b``: tokens before EOS when ``max_len_a`` is 0) in 1..64 (or up to the checkpoint's
        own larger default, e.g. 128); otherwise ``ValueError`` names the bound, e.g. "beam_size must be between 1
        and 16, got 0".
        """
        cfg = self.task_config
        beam = cfg.beam_size if beam_size is None else beam_size
        length = cfg.max_len_b if max_length is None else max_length
        beam_limit, length_limit = self.setting_limits
        beam = _check_int("beam_size", beam, MIN_BEAM_SIZE, beam_limit)
        length = _check_int("max_length", length, MIN_LENGTH, length_limit)
        return beam, length

    def preprocess(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """Encoded images (bytes) or PIL images -> float32 CPU tensor [B,3,S,S], the reference's pixels."""
        if isinstance(images, (bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        cfg = self.task_config
        pixels = preprocess_images(images, size=cfg.patch_image_size, mean=cfg.mean, std=cfg.std)
        return torch.from_numpy(pixels)

    def normalize_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 pixels [B,3,S,S] (``ofa_captioning.images.resized_pixels``) -> the reference's float32 pixels on
        this model's device, bit for bit those of :meth:`preprocess` (the bytes are moved, then normalized)."""
        return normalize_pixels(pixels, self.task_config.mean, self.task_config.std, device=self._device)

    def generate(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        beam_size: int | None = None,
        max_length: int | None = None,
    ) -> list[Caption]:
        """Captions for a pixel batch [B,3,S,S] (or one image [3,S,S]), numpy or torch, as from :meth:`preprocess`."""
        beam, length = self.validate_settings(beam_size, max_length)
        return [self._to_caption(hyps) for hyps in self._hypotheses(pixel_values, beam, length)]

    def validate_num_captions(self, num_captions: int | None, beam_size: int) -> int:
        """Resolve ``None`` to the checkpoint's ``num_return_sequences`` and check it is in 1..``beam_size``."""
        n = self.task_config.num_return_sequences if num_captions is None else num_captions
        return _check_int("num_captions", n, 1, beam_size)

    def generate_n_best(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        beam_size: int | None = None,
        max_length: int | None = None,
        num_captions: int | None = None,
    ) -> list[list[Caption]]:
        """The ``num_captions`` best captions per image (best first; default: configuration.json's
        ``num_return_sequences``), as the reference's generator returns its hypotheses. An image may get fewer
        only where the reference would have failed (non-finite scores)."""
        beam, length = self.validate_settings(beam_size, max_length)
        n = self.validate_num_captions(num_captions, beam)
        return [
            [self._hypothesis_caption(h) for h in hyps[:n]]
            for hyps in self._hypotheses(pixel_values, beam, length)
        ]

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        beam_size: int | None = None,
        max_length: int | None = None,
    ) -> list[Caption]:
        """Captions for encoded images (bytes) or PIL images: :meth:`preprocess` then :meth:`generate`."""
        beam, length = self.validate_settings(beam_size, max_length)
        return [self._to_caption(hyps) for hyps in self._hypotheses(self.preprocess(images), beam, length)]

    def generate_hypotheses(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        beam_size: int | None = None,
        max_length: int | None = None,
    ) -> list[list[Hypothesis]]:
        """All finished hypotheses per image (token ids, best first), before decoding to text."""
        return self._hypotheses(pixel_values, *self.validate_settings(beam_size, max_length))

    def _hypotheses(
        self, pixel_values: torch.Tensor | np.ndarray, beam: int, length: int
    ) -> list[list[Hypothesis]]:
        """:meth:`generate_hypotheses` with settings that :meth:`validate_settings` returned (checked once per
        call of a public method)."""
        pixels = self._as_pixels(pixel_values)
        if pixels.shape[0] == 0:
            return []
        settings = self.search_settings(beam, length)
        with torch.inference_mode():
            input_ids = self._prompt_ids.unsqueeze(0).expand(pixels.shape[0], -1)
            encoder_out = self.model.encode(input_ids, pixels)
            return beam_search(self.model, encoder_out, settings, cuda_graphs=self._cuda_graphs)

    def search_settings(self, beam_size: int, max_length: int) -> BeamSearchSettings:
        """The beam-search settings of a request: configuration.json's generator fields with the request's beam
        size and ``max_len_b``; the longest caption is ``int(max_len_a * prompt_length + max_len_b)`` tokens, where
        the prompt length counts ``<s>`` and ``</s>`` (the reference's source length)."""
        cfg = self.task_config
        max_len = cfg.max_len(int(self._prompt_ids.shape[0]), max_length)
        if max_len < 1:
            raise ValueError(
                f"max_len_a={cfg.max_len_a} and max_length={max_length} leave no room for a caption "
                f"(max_len {max_len})"
            )
        return BeamSearchSettings(
            beam_size=beam_size,
            max_len_b=max_len,
            # The reference asserts min_len <= max_len; a short max_length lowers min_len with it.
            min_len=min(cfg.min_len, max_len),
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            len_penalty=cfg.len_penalty,
            bos_id=self.tokenizer.bos_id,
            pad_id=self.tokenizer.pad_id,
            eos_id=self.tokenizer.eos_id,
            temperature=cfg.temperature,
            unk_penalty=cfg.unk_penalty,
            unk_id=self.tokenizer.unk_id,
            normalize_scores=cfg.normalize_scores,
        )

    def warmup(
        self, batch_sizes: Sequence[int] = (1,), beam_size: int | None = None, max_length: int | None = None
    ):
        """Run dummy batches once (allocations, kernel selection, cached position biases) before serving."""
        size = self.patch_image_size
        gen = torch.Generator().manual_seed(0)
        for batch in batch_sizes:
            pixels = torch.rand((batch, 3, size, size), generator=gen) * 2 - 1
            self.generate(pixels, beam_size, max_length)

    # ---------------------------------------------------------------------------------------- helpers

    def postprocess(self, text: str) -> str:
        """The reference's caption clean-up for the checkpoint's language (see ``tokenizer.postprocess_caption``)."""
        return postprocess_caption(text, self.task_config.language)

    def _hypothesis_caption(self, hyp: Hypothesis) -> Caption:
        return Caption(self.postprocess(self.tokenizer.decode(hyp.tokens)), float(hyp.score))

    def _to_caption(self, hyps: list[Hypothesis]) -> Caption:
        if not hyps:  # only after non-finite scores; the reference would have raised instead
            return Caption("", -math.inf)
        return self._hypothesis_caption(hyps[0])

    def _as_pixels(self, pixel_values: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(pixel_values, np.ndarray):
            pixel_values = torch.from_numpy(np.ascontiguousarray(pixel_values))
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a numpy array or torch tensor, got {type(pixel_values).__name__}"
            )
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [B,3,H,W], got {list(pixel_values.shape)}")
        limit = 16 * self.model.config.image_bucket_size
        if not (16 <= pixel_values.shape[2] <= limit and 16 <= pixel_values.shape[3] <= limit):
            raise ValueError(
                f"image side must be between 16 and {limit} pixels, got {list(pixel_values.shape[2:])}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        return pixel_values.to(device=self._device, dtype=self._dtype, non_blocking=True)
