"""CPU and GPU serving profiles from one source: the committed ``model_repository/`` filled with a profile's values.

The committed config.pbtxt files are the ``cpu`` profile, tuned for a small CPU host (docs/load-testing.md). The
``gpu`` profile is the same files with a handful of values replaced, as the TensorRT-LLM backend fills its
templates: :func:`apply_profile` sets them on one parsed config (a ``ModelConfig`` message,
:mod:`ofa_serving.model_config`), :mod:`ofa_serving.repository` writes the repository (``make serve`` generates
it at start when the profile is ``gpu``). Values of the ``gpu`` profile:

=========================  ===============  ===========================================================
field                      cpu (committed)  gpu
=========================  ===============  ===========================================================
``ofa`` max_batch_size     16               64 (``caption`` the same: at most its steps' smallest)
``ofa`` queue delay        10 ms            2 ms
``ofa`` instance_group     KIND_MODEL x 1   KIND_GPU x 1 (one instance per visible GPU, on its device)
``preprocess`` max batch   32               64
``preprocess`` queue delay 10 ms            1 ms
``preprocess`` instances   1                half the host's cores, 2..8
queue max_queue_size       64               256 (4 full batches, as on the CPU)
=========================  ===============  ===========================================================

``OFA_PROFILE`` (``auto`` | ``cpu`` | ``gpu``) chooses; ``auto`` is ``gpu`` where torch sees a CUDA device.
The adapters read what they need from the filled config: ``ofa`` puts a ``KIND_GPU`` instance on
``cuda:<model_instance_device_id>`` (:func:`instance_device`) and warms up at batch 1 and at ``max_batch_size``
on a GPU (:func:`warmup_batch_sizes`), the largest batch also with the worst request allowed
(:func:`warmup_plan`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .settings import SettingsError, resolve_device

if TYPE_CHECKING:
    from .model_config import ModelConfig

__all__ = [
    "PROFILES",
    "GpuProfile",
    "apply_profile",
    "gpu_profile",
    "instance_device",
    "resolve_profile",
    "warmup_batch_sizes",
    "warmup_plan",
]

#: The profiles ``OFA_PROFILE`` may name (besides ``auto``).
PROFILES = ("cpu", "gpu")


@dataclass(frozen=True)
class GpuProfile:
    """The values the ``gpu`` profile puts into the committed configs (docs/load-testing.md, GPU sizing)."""

    #: Images per ``ofa`` engine batch (and per ``caption`` request): beam search keeps beam_size x 64 sequences,
    #: a few hundred MB of activations for OFA-tiny, little for a data-centre GPU; decoding is bound by per-step
    #: overhead, which a bigger batch shares.
    ofa_max_batch_size: int = 64
    #: A GPU batch takes tens of ms, not seconds: a short window, paid in full by a lone request.
    ofa_queue_delay_us: int = 2_000
    #: ``count`` of the KIND_GPU instance group: instances per visible GPU, each with its own copy of the model.
    ofa_instances_per_gpu: int = 1
    preprocess_max_batch_size: int = 64
    preprocess_queue_delay_us: int = 1_000
    #: PIL decoding and resizing run on the host's cores: one stub process per instance.
    preprocess_instances: int = 4
    #: Requests allowed to wait per model: 4 full ``ofa`` batches, as the CPU profile's 64 for batches of 16.
    max_queue_size: int = 256


def gpu_profile(cpu_count: int | None = None) -> GpuProfile:
    """The ``gpu`` profile for a host with ``cpu_count`` cores (default: this one's): half of them, 2..8, run
    ``preprocess`` instances."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 2)
    return GpuProfile(preprocess_instances=max(2, min(8, cores // 2)))


def resolve_profile(profile: str, cuda_available: bool | None = None) -> str:
    """``"cpu"`` or ``"gpu"`` for an ``OFA_PROFILE`` value; ``auto`` = ``gpu`` where torch sees a CUDA device
    (``cuda_available``; default: asks torch)."""
    profile = profile.strip().lower() or "auto"
    if profile in PROFILES:
        return profile
    if profile != "auto":
        raise SettingsError(
            f"environment variable OFA_PROFILE: expected one of auto, cpu, gpu, got {profile!r}"
        )
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "gpu" if cuda_available else "cpu"


def apply_profile(
    step: str, config: ModelConfig, profile: str, values: GpuProfile | None = None
) -> list[str]:
    """Put the values of ``profile`` into ``config``, the parsed committed config.pbtxt of ``step``
    (``preprocess``, ``ofa`` or ``caption``; :func:`ofa_serving.model_config.read_config`), in place.

    ``cpu`` changes nothing. ``gpu`` sets the fields of :class:`GpuProfile` (``values``, default
    :func:`gpu_profile`). Returns one line per field set, ``field: value (why)``, for the generated file's header.
    """
    if profile == "cpu":
        return []
    if profile != "gpu":
        raise SettingsError(f"unknown serving profile {profile!r}; expected one of {', '.join(PROFILES)}")
    # Imported here: the adapters import this module in the backend stub, which needs no schema (tritonclient).
    from .model_config import set_dynamic_batching, set_instance_group

    v = values or gpu_profile()
    if step == "caption":
        config.max_batch_size = v.ofa_max_batch_size
        return [f"max_batch_size: {v.ofa_max_batch_size} (as many images as one `ofa` batch)"]
    if step == "preprocess":
        max_batch, delay, kind, count = (
            v.preprocess_max_batch_size,
            v.preprocess_queue_delay_us,
            "KIND_CPU",
            v.preprocess_instances,
        )
        batch_why = "a full `ofa` batch of images decoded in one execute()"
        group_why = "stub processes decoding with PIL on the host's cores in parallel"
    elif step == "ofa":
        max_batch, delay, kind, count = (
            v.ofa_max_batch_size,
            v.ofa_queue_delay_us,
            "KIND_GPU",
            v.ofa_instances_per_gpu,
        )
        batch_why = "bigger engine batches share the GPU's per-step decoding cost"
        group_why = "per visible GPU, each with its own copy of the model on cuda:<model_instance_device_id>"
    else:
        raise SettingsError(f"no {profile} profile for model {step!r}; expected preprocess, ofa or caption")
    config.max_batch_size = max_batch
    set_dynamic_batching(config, max_queue_delay_us=delay, max_queue_size=v.max_queue_size)
    set_instance_group(config, kind, count)
    return [
        f"max_batch_size: {max_batch} ({batch_why})",
        f"dynamic_batching.max_queue_delay_microseconds: {delay} (a GPU batch takes ms, not s: a short window)",
        f"dynamic_batching.default_queue_policy.max_queue_size: {v.max_queue_size} (4 full batches may wait)",
        f"instance_group: {kind} x {count} ({group_why})",
    ]


def instance_device(args: Mapping[str, Any], device: str, cuda_available: bool) -> str:
    """The torch device of a model instance: ``cuda:<model_instance_device_id>`` for a ``KIND_GPU`` instance
    (``args`` of ``initialize``); otherwise the ``device`` setting resolved (:func:`resolve_device`)."""
    kind = str(args.get("model_instance_kind", "")).upper()
    if kind != "GPU":
        return resolve_device(device, cuda_available)
    if device == "cpu":
        raise SettingsError(
            "OFA_DEVICE / parameter 'device' is 'cpu' but the instance_group kind is KIND_GPU; use KIND_MODEL or "
            "KIND_CPU to serve on the CPU (OFA_PROFILE=cpu)"
        )
    if not cuda_available:
        raise SettingsError("the instance_group kind is KIND_GPU but torch sees no CUDA device")
    try:
        index = int(args.get("model_instance_device_id", 0))
    except (TypeError, ValueError):
        raise SettingsError(
            f"model_instance_device_id {args.get('model_instance_device_id')!r} is not a GPU index"
        ) from None
    return f"cuda:{index}"


def warmup_batch_sizes(value: str, device: str, max_batch_size: int | str | None) -> tuple[int, ...]:
    """The warm-up batch sizes of ``ofa``: ``value`` (``OFA_WARMUP_BATCH_SIZES``, e.g. ``"1,64"``) or, empty,
    ``(1, max_batch_size)`` on CUDA (so that ready means warm at every size Triton may send) and ``(1,)`` on the
    CPU (a fast start). Each size must be in 1..``max_batch_size``."""
    largest = int(max_batch_size or 0)
    where = "OFA_WARMUP_BATCH_SIZES / parameter 'warmup_batch_sizes'"
    if not value.strip():
        if device.startswith("cuda") and largest > 1:
            return (1, largest)
        return (1,)
    sizes: list[int] = []
    for part in re.split(r"[\s,]+", value.strip()):
        try:
            size = int(part)
        except ValueError:
            raise SettingsError(f"{where}: expected batch sizes like '1,64', got {value!r}") from None
        if size < 1 or (largest > 0 and size > largest):
            raise SettingsError(f"{where}: {size} is not between 1 and max_batch_size {largest}")
        if size not in sizes:
            sizes.append(size)
    return tuple(sizes)


#: One warm-up call: ``Captioner.warmup(batch_sizes, beam_size, max_length)``; None = the checkpoint's default.
WarmupCall = tuple[tuple[int, ...], int | None, int | None]


def warmup_plan(
    batch_sizes: tuple[int, ...], device: str, limits: tuple[int, int], max_beam_tokens: int
) -> list[WarmupCall]:
    """The warm-up calls of ``ofa``: each of ``batch_sizes`` at the default beam size and length and, on CUDA,
    first the largest of them with the worst requests allowed, so that serving allocates nothing new.

    ``limits`` are the largest beam size and max length the engine accepts (``Captioner.setting_limits``) and
    ``max_beam_tokens`` bounds their product (``OFA_MAX_BEAM_TOKENS``). The worst requests are the largest beam
    with the longest length the bound leaves it, and the longest length with the largest beam the bound leaves
    it: the decode step's rows grow with the beam, its cache with beam x length. On the CPU (a fast start; the
    CPU caches no per-shape kernels or graphs) only the default calls run.
    """
    calls: list[WarmupCall] = []
    if device.startswith("cuda"):
        beam_limit, length_limit = limits
        widest = min(beam_limit, max_beam_tokens)
        longest = min(length_limit, max_beam_tokens)
        for beam, length in (
            (widest, min(length_limit, max_beam_tokens // widest)),
            (min(beam_limit, max_beam_tokens // longest), longest),
        ):
            call = ((max(batch_sizes),), beam, length)
            if call not in calls:
                calls.append(call)
    calls.append((tuple(batch_sizes), None, None))
    return calls
