"""CPU and GPU serving profiles from one source: the committed ``model_repository/`` filled with a profile's values.

The committed config.pbtxt files are the ``cpu`` profile, tuned for a small CPU host (docs/load-testing.md). The
``gpu`` profile is the same files with a handful of values replaced, as the TensorRT-LLM backend fills its
templates: :func:`apply_profile` rewrites one config's text, :mod:`ofa_serving.repository` writes the
repository (``make serve`` generates it at start when the profile is ``gpu``). Values of the ``gpu`` profile:

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
on a GPU (:func:`warmup_batch_sizes`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .settings import SettingsError, resolve_device

__all__ = [
    "PROFILES",
    "GpuProfile",
    "apply_profile",
    "gpu_profile",
    "instance_device",
    "resolve_profile",
    "warmup_batch_sizes",
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


def apply_profile(step: str, text: str, profile: str, values: GpuProfile | None = None) -> str:
    """The committed config.pbtxt ``text`` of ``step`` (``preprocess``, ``ofa`` or ``caption``) for ``profile``.

    ``cpu`` returns ``text`` unchanged. ``gpu`` replaces the fields of :class:`GpuProfile` (``values``, default
    :func:`gpu_profile`), each preceded by a comment naming the profile; a field that is not exactly once in the
    text raises :class:`SettingsError` (the committed file changed shape).
    """
    if profile == "cpu":
        return text
    if profile != "gpu":
        raise SettingsError(f"unknown serving profile {profile!r}; expected one of {', '.join(PROFILES)}")
    v = values or gpu_profile()
    why = "# gpu profile (ofa_serving.profiles):"
    if step == "caption":
        return _field(
            text, "max_batch_size", v.ofa_max_batch_size, f"{why} as many images as one `ofa` batch"
        )
    if step == "preprocess":
        max_batch, delay, kind, count = (
            v.preprocess_max_batch_size,
            v.preprocess_queue_delay_us,
            "KIND_CPU",
            v.preprocess_instances,
        )
        batch_why = "a full `ofa` batch of images decoded in one execute()"
        count_why = "instances (stub processes) decoding on the host's cores in parallel"
        kind_why = "PIL decoding runs on the host's cores"
    elif step == "ofa":
        max_batch, delay, kind, count = (
            v.ofa_max_batch_size,
            v.ofa_queue_delay_us,
            "KIND_GPU",
            v.ofa_instances_per_gpu,
        )
        batch_why = "bigger engine batches share the GPU's per-step decoding cost"
        count_why = "instances per visible GPU, each with its own copy of the model"
        kind_why = "one instance group per visible GPU, the model on cuda:<model_instance_device_id>"
    else:
        raise SettingsError(f"no {profile} profile for model {step!r}; expected preprocess, ofa or caption")
    text = _field(text, "max_batch_size", max_batch, f"{why} {batch_why}")
    text = _field(
        text,
        "max_queue_delay_microseconds",
        delay,
        f"{why} a GPU batch takes ms, not s: a short window",
        indent=2,
    )
    text = _field(text, "max_queue_size", v.max_queue_size, f"{why} 4 full batches may wait", indent=4)
    text = _field(text, "kind", kind, f"{why} {kind_why}", indent=4, enum=True)
    return _field(text, "count", count, f"{why} {count_why}", indent=4)


def _field(text: str, name: str, value: Any, comment: str, *, indent: int = 0, enum: bool = False) -> str:
    pad = " " * indent
    token = "[A-Z_]+" if enum else "[0-9]+"
    pattern = f"(?m)^{pad}{name}: {token}$"
    new, count = re.subn(pattern, lambda _m: f"{pad}{comment}\n{pad}{name}: {value}", text)
    if count != 1:
        raise SettingsError(
            f"the committed config.pbtxt has {count} `{name}` fields where the serving profile expects one"
        )
    return new


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
