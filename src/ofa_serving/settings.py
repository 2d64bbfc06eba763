"""Typed settings from config.pbtxt ``parameters`` and environment variables: the one way to read settings.

Every setting is a field of a frozen dataclass declared with :func:`setting`, naming its environment variable
and/or its config.pbtxt parameter. :func:`load_settings` fills such a dataclass. Precedence, highest first:

1. the environment variable (deployment-time override, no file to edit: ``OFA_DEVICE=cpu make serve``),
2. the config.pbtxt parameter (``parameters { key: "device" value { string_value: "cpu" } }``),
3. the field's default.

An empty string (the environment variable set to ``""`` or a parameter with ``string_value: ""``) means unset.
Booleans accept ``true/1/yes/on`` and ``false/0/no/off`` (any case). Values are checked when the settings are
loaded (the model's ``initialize``, the launcher's start): a bad value raises :class:`SettingsError` naming the
setting, its source and what was expected, e.g.
``environment variable OFA_TORCH_THREADS: expected an integer, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ofa_captioning.config import DTYPE_NAMES, parse_dtype

__all__ = [
    "SettingsError",
    "setting",
    "load_settings",
    "describe_settings",
    "model_parameters",
    "OFASettings",
    "PreprocessSettings",
    "ServerSettings",
    "SupervisorSettings",
    "SecuritySettings",
    "resolve_device",
    "resolve_dtype",
]

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the setting and where it came from."""


def setting(
    default: Any = None,
    *,
    env: str | None = None,
    param: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: int | float | None = None,
    maximum: int | float | None = None,
    required: bool = False,
    secret: bool = False,
    help: str = "",
) -> Any:
    """Declare a settings dataclass field read from environment variable ``env`` and/or parameter ``param``.

    ``choices`` restricts a string (compared lower-case); ``minimum``/``maximum`` bound a number; ``required``
    makes :func:`load_settings` fail when neither source gives a value and the default is ``None``; ``secret``
    keeps the value out of the dataclass's ``repr`` (and so out of log lines that print the settings).
    """
    if env is None and param is None:
        raise TypeError("a setting needs an environment variable or a config parameter")
    meta = {
        "env": env,
        "param": param,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "required": required,
        "help": help,
    }
    return field(default=default, metadata=meta, repr=not secret)


def model_parameters(model_config: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``{key: string_value}`` of a Triton model config (``args["model_config"]``: JSON text or a dict)."""
    if model_config is None:
        return {}
    if isinstance(model_config, str | bytes):
        model_config = json.loads(model_config)
    params = model_config.get("parameters") or {}
    out = {}
    for key, value in params.items():
        out[key] = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
    return out


def load_settings(
    cls: type[T],
    model_config: str | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Fill the settings dataclass ``cls`` (environment > config.pbtxt parameter > default).

    ``model_config`` is ``args["model_config"]`` of a Python backend model (JSON text or dict), or ``None`` for
    settings that only come from the environment. ``environ`` defaults to ``os.environ``.
    Raises :class:`SettingsError` naming the bad setting.
    """
    environ = os.environ if environ is None else environ
    params = model_parameters(model_config)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        env, param = meta.get("env"), meta.get("param")
        raw = source = None
        if env and environ.get(env, "").strip():
            raw, source = environ[env].strip(), f"environment variable {env}"
        elif param and params.get(param, "").strip():
            raw, source = params[param].strip(), f"config.pbtxt parameter {param!r}"
        if raw is None:
            if meta.get("required") and f.default is None:
                raise SettingsError(f"{_names(meta)} is required but not set")
            continue
        values[f.name] = _convert(raw, hints[f.name], meta, source)
    return cls(**values)


def describe_settings(cls: type) -> list[dict[str, Any]]:
    """One row per setting of ``cls`` (env, param, default, choices, help): the source of the docs' table."""
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        rows.append(
            {
                "name": f.name,
                "env": meta.get("env"),
                "param": meta.get("param"),
                "default": f.default,
                "choices": meta.get("choices"),
                "help": meta.get("help", ""),
            }
        )
    return rows


def _names(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("env"):
        parts.append(f"environment variable {meta['env']}")
    if meta.get("param"):
        parts.append(f"config.pbtxt parameter {meta['param']!r}")
    return " / ".join(parts)


def _convert(raw: str, hint: Any, meta: Mapping[str, Any], source: str) -> Any:
    target = _base_type(hint)
    if target is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(f"{source}: expected a boolean (true/false, 1/0, yes/no), got {raw!r}")
    if target is int:
        try:
            value: Any = int(raw)
        except ValueError:
            raise SettingsError(f"{source}: expected an integer, got {raw!r}") from None
    elif target is float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{source}: expected a number, got {raw!r}") from None
    elif target is Path:
        value = Path(raw).expanduser()
    else:
        value = raw
    choices = meta.get("choices")
    if choices:
        value = value.lower()
        if value not in choices:
            raise SettingsError(f"{source}: expected one of {', '.join(choices)}, got {raw!r}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise SettingsError(f"{source}: expected at least {meta['minimum']}, got {raw!r}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise SettingsError(f"{source}: expected at most {meta['maximum']}, got {raw!r}")
    return value


def _base_type(hint: Any) -> Any:
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


# ---------------------------------------------------------------------------------------------------------
# The settings of this repository (docs/serving.md lists them; tests/serving checks that it does).

_MODEL_DIR_HELP = "checkpoint directory (ModelScope layout); set by `make serve` / the launcher"


@dataclass(frozen=True)
class OFASettings:
    """Settings of the ``ofa`` model (the captioning engine)."""

    model_dir: Path | None = setting(
        env="OFA_MODEL_DIR", param="model_dir", required=True, help=_MODEL_DIR_HELP
    )
    device: str = setting(
        "auto",
        env="OFA_DEVICE",
        param="device",
        choices=("auto", "cpu", "cuda"),
        help="auto = CUDA when torch sees a GPU, else CPU",
    )
    dtype: str = setting(
        "auto",
        env="OFA_DTYPE",
        param="dtype",
        choices=("auto", *DTYPE_NAMES),
        help="auto = float16 on CUDA, float32 on CPU",
    )
    torch_threads: int = setting(
        0,
        env="OFA_TORCH_THREADS",
        param="torch_threads",
        minimum=0,
        help="torch intra-op threads per model instance; 0 = torch's default",
    )
    warmup: bool = setting(
        True,
        env="OFA_WARMUP",
        param="warmup",
        help="caption a random image in initialize, so that ready means warm",
    )
    max_beam_tokens: int = setting(
        320,
        env="OFA_MAX_BEAM_TOKENS",
        param="max_beam_tokens",
        minimum=1,
        help="cost bound: requests with beam_size x max_length above this get INVALID_ARG (default 5 x 64)",
    )
    unhealthy_after_failures: int = setting(
        3,
        env="OFA_UNHEALTHY_AFTER_FAILURES",
        param="unhealthy_after_failures",
        minimum=0,
        help="engine batches failing in a row before the model unloads itself to be reloaded; 0 = never",
    )
    warmup_batch_sizes: str = setting(
        "",
        env="OFA_WARMUP_BATCH_SIZES",
        param="warmup_batch_sizes",
        help="warm-up batch sizes, e.g. `1,64`; unset = 1 and max_batch_size on CUDA, 1 on the CPU",
    )
    allow_tf32: bool = setting(
        False,
        env="OFA_ALLOW_TF32",
        param="allow_tf32",
        help="float32 on CUDA: let matmuls and convolutions round their inputs to TF32 (faster, not float32: "
        "captions may flip on near-ties against the CPU); false = true float32. Sets torch's process-wide flags",
    )
    cuda_graphs: bool = setting(
        False,
        env="OFA_CUDA_GRAPHS",
        param="cuda_graphs",
        help="decode step as CUDA graphs per (batch, beam) bucket, captured at warm-up; unmeasured on a GPU, "
        "off until measured; ignored (one log line) on the CPU",
    )


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings of the ``preprocess`` model (image decoding and pixels)."""

    model_dir: Path | None = setting(
        env="OFA_MODEL_DIR", param="model_dir", required=True, help=_MODEL_DIR_HELP
    )
    max_image_bytes: int = setting(
        20 * 1024 * 1024,
        env="OFA_MAX_IMAGE_BYTES",
        param="max_image_bytes",
        minimum=1,
        help="larger encoded images are refused with INVALID_ARG",
    )
    max_image_pixels: int = setting(
        40_000_000,
        env="OFA_MAX_IMAGE_PIXELS",
        param="max_image_pixels",
        minimum=1,
        help="images with more pixels (width x height) are refused before decoding (decompression bombs)",
    )
    drain_file: Path | None = setting(
        env="OFA_DRAIN_FILE",
        help="while this file exists new requests are refused with UNAVAILABLE (set by the launcher; the "
        "supervisor creates it when a graceful stop begins)",
    )


@dataclass(frozen=True)
class ServerSettings:
    """Settings of the launcher (``make serve`` / ``python -m ofa_serving.serve``); environment only."""

    host: str = setting("127.0.0.1", env="HOST", help="address the HTTP, gRPC and metrics endpoints bind to")
    http_port: int = setting(8000, env="HTTP_PORT", minimum=0, maximum=65535, help="KServe v2 HTTP/REST port")
    grpc_port: int = setting(8001, env="GRPC_PORT", minimum=0, maximum=65535, help="KServe v2 gRPC port")
    metrics_port: int = setting(
        8002, env="METRICS_PORT", minimum=0, maximum=65535, help="Prometheus metrics port"
    )
    model_dir: Path | None = setting(
        env="OFA_MODEL_DIR",
        help="checkpoint to serve; unset = the real one if the hub answers, else the demo one",
    )
    models: str = setting(
        "",
        env="OFA_MODELS",
        help="several checkpoints, each its own public model: `name=dir name2=dir2` (docs/serving.md); "
        "unset = one `caption` model from OFA_MODEL_DIR",
    )
    download: bool = setting(
        True, env="OFA_DOWNLOAD", help="without OFA_MODEL_DIR, try the hub for the real checkpoint first"
    )
    demo_checkpoint: Path = setting(
        Path("checkpoints/ofa-tiny-demo"),
        env="DEMO_CHECKPOINT",
        help="where the demo checkpoint is built when the real one is unavailable",
    )
    model_repository: Path | None = setting(
        env="OFA_MODEL_REPOSITORY",
        help="Triton model repository; default: model_repository/ of this checkout",
    )
    response_cache_bytes: int = setting(
        64 * 1024 * 1024,
        env="OFA_RESPONSE_CACHE_BYTES",
        minimum=0,
        help="size of Triton's local response cache (the `caption` ensemble uses it); 0 = no cache",
    )
    exit_timeout_secs: int = setting(
        30, env="OFA_EXIT_TIMEOUT_SECS", minimum=0, help="on SIGTERM, how long in-flight requests may finish"
    )
    log_verbose: int = setting(
        0, env="TRITON_LOG_VERBOSE", minimum=0, help="tritonserver --log-verbose level"
    )
    profile: str = setting(
        "auto",
        env="OFA_PROFILE",
        choices=("auto", "cpu", "gpu"),
        help="serving profile: cpu = the committed configs, gpu = generated with GPU values "
        "(ofa_serving.profiles); auto = gpu where torch sees a CUDA device",
    )


@dataclass(frozen=True)
class SupervisorSettings:
    """Settings of the supervisor that heals dead or hung models (:mod:`ofa_serving.supervisor`); environment only."""

    supervise: bool = setting(
        True, env="OFA_SUPERVISE", help="probe every model and reload the ones whose stub died or hung"
    )
    probe_interval_s: float = setting(
        5.0, env="OFA_PROBE_INTERVAL_S", minimum=0.1, help="seconds between the supervisor's probe rounds"
    )
    probe_timeout_s: float = setting(
        10.0,
        env="OFA_PROBE_TIMEOUT_S",
        minimum=0.5,
        help="seconds one model's probe may take before it counts as unanswered",
    )
    hang_after_s: float = setting(
        60.0,
        env="OFA_HANG_AFTER_S",
        minimum=1.0,
        help="a model whose probes go unanswered and that completes no execution for this long is hung",
    )
    state_file: Path | None = setting(
        env="OFA_SUPERVISOR_STATE",
        help="JSON file with the heal counters; default <tmp>/ofa-supervisor-<HTTP_PORT>.json",
    )
    max_server_crashes: int = setting(
        5,
        env="OFA_MAX_SERVER_CRASHES",
        minimum=1,
        help="a crash of tritonserver is restarted unless it is this many crashes within "
        "OFA_SERVER_CRASH_WINDOW_S (a crash loop): then the supervisor gives up and exits non-zero",
    )
    server_crash_window_s: float = setting(
        300.0,
        env="OFA_SERVER_CRASH_WINDOW_S",
        minimum=1.0,
        help="seconds over which OFA_MAX_SERVER_CRASHES crashes of tritonserver count as a crash loop",
    )


@dataclass(frozen=True)
class SecuritySettings:
    """Keys, gRPC TLS and the exposure rule of the server (:mod:`ofa_serving.security`); environment only.

    A key comes from ``X`` or from the file named by ``X_FILE`` (a mounted secret), never both; files and keys are
    checked by :mod:`ofa_serving.security` when the server is built, and no message shows a key.
    """

    admin_key: str = setting(
        "",
        env="OFA_ADMIN_KEY",
        secret=True,
        help="key of the admin APIs (shared memory, logging, trace, model repository/config, statistics), "
        "header ofa-admin-key; unset = a fresh random key at each start",
    )
    admin_key_file: Path | None = setting(env="OFA_ADMIN_KEY_FILE", help="file holding OFA_ADMIN_KEY")
    api_key: str = setting(
        "",
        env="OFA_API_KEY",
        secret=True,
        help="inference then needs header ofa-api-key (gRPC: triton-grpc-protocol-ofa-api-key); unset = open",
    )
    api_key_file: Path | None = setting(env="OFA_API_KEY_FILE", help="file holding OFA_API_KEY")
    grpc_tls_cert: Path | None = setting(
        env="OFA_GRPC_TLS_CERT", help="PEM certificate (chain) of the gRPC endpoint: gRPC over TLS"
    )
    grpc_tls_key: Path | None = setting(env="OFA_GRPC_TLS_KEY", help="PEM private key of OFA_GRPC_TLS_CERT")
    grpc_tls_ca: Path | None = setting(
        env="OFA_GRPC_TLS_CA", help="PEM CA of client certificates: mutual TLS (clients must present one)"
    )
    allow_unpatched_triton: bool = setting(
        False,
        env="OFA_ALLOW_UNPATCHED_TRITON",
        help="start a tritonserver with known unfixed CVEs on a non-loopback HOST anyway (a loud warning)",
    )


def resolve_device(device: str, cuda_available: bool) -> str:
    """``"cuda"`` or ``"cpu"`` for a ``device`` setting (auto|cpu|cuda)."""
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise SettingsError("OFA_DEVICE / parameter 'device' is 'cuda' but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``"float16"`` on CUDA and ``"float32"`` on CPU for ``auto``; an explicit dtype by the engine's name for it
    (the engine's parser, :func:`ofa_captioning.config.parse_dtype`). float16 is refused on the CPU: the engine
    runs it there for checks only (slow where the CPU lacks float16 kernels)."""

    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    try:
        name = parse_dtype(dtype)
    except ValueError as e:
        raise SettingsError(f"OFA_DTYPE / parameter 'dtype': {e}") from None
    if name == "float16" and not device.startswith("cuda"):
        raise SettingsError(
            "OFA_DTYPE / parameter 'dtype': float16 is only served on CUDA; use float32 or bfloat16 on the CPU"
        )
    return name
