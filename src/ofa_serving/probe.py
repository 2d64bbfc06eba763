"""Deep health probe: is every model of a running tritonserver really answering? ``python -m ofa_serving.probe``.

tritonserver 2.51 keeps ``/v2/health/live`` and ``/v2/health/ready`` green when a Python backend stub dies or
hangs (docs/reliability.md), so a blind HTTP probe cannot tell. This probe

1. asks ``/v2/health/ready`` (strict readiness: false while a model is unloaded or loading);
2. discovers the models the server holds (the repository index, which needs the admin key: ``OFA_ADMIN_KEY`` or
   ``OFA_ADMIN_KEY_FILE``, else, for a server on this machine's loopback, the owner-only key file its launcher or
   supervisor left (:func:`~ofa_serving.security.read_key_file`); or the models named with ``--model``), and reads
   each one's metadata (open);
3. sends every non-ensemble model one direct inference with **fresh inputs** built from its metadata: a tiny PNG of
   random pixels for a BYTES input, random values for FP32 and UINT8 tensors, 1 for integer settings (so ``ofa`` runs
   beam 1 / max_length 1: the cheapest real engine call). Fresh inputs and direct calls (not the ``caption``
   ensemble) mean the response cache never answers for a model.

Exit status 0 when every model answered within ``--timeout`` seconds (whole probe), 1 otherwise, with one line per
model on stdout. The Kubernetes livenessProbe, the image's HEALTHCHECK and the supervisor (:mod:`.supervisor`)
use it. With ``OFA_API_KEY`` (or ``OFA_API_KEY_FILE``) set, its inferences carry that key. Standard library and
numpy only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .security import (
    ADMIN_HEADER,
    API_HEADER,
    api_key_from_settings,
    is_loopback,
    load_secret,
    read_key_file,
)
from .settings import SecuritySettings, SettingsError, load_settings
from .triton_api import TritonHttp, TritonHttpError

__all__ = [
    "ModelCheck",
    "ProbeResult",
    "list_models",
    "probe_model",
    "probe_models",
    "probe_server",
    "tiny_png",
    "main",
]

_NUMPY_TYPES = {
    "TYPE_FP32": ("FP32", "float32"),
    "TYPE_FP16": ("FP16", "float16"),
    "TYPE_FP64": ("FP64", "float64"),
    "TYPE_INT8": ("INT8", "int8"),
    "TYPE_INT16": ("INT16", "int16"),
    "TYPE_INT32": ("INT32", "int32"),
    "TYPE_INT64": ("INT64", "int64"),
    "TYPE_UINT8": ("UINT8", "uint8"),
    "TYPE_BOOL": ("BOOL", "bool"),
}


@dataclass(frozen=True)
class ModelCheck:
    """The outcome of probing one model: ``status`` is ``ok``, ``busy`` (refused by a full queue or its queue
    timeout: overloaded, not broken), ``error``, ``timeout`` or ``not_ready``."""

    model: str
    status: str
    detail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def alive(self) -> bool:
        """Answered, or refused only because it is overloaded (a liveness probe must not restart a busy server)."""
        return self.status in ("ok", "busy")


@dataclass(frozen=True)
class ProbeResult:
    """The whole probe: server readiness and one :class:`ModelCheck` per probed model."""

    ready: bool
    checks: tuple[ModelCheck, ...]
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.ready and bool(self.checks) and all(c.alive for c in self.checks)

    def lines(self) -> list[str]:
        """Human-readable lines, one per model."""
        out = [f"server ready: {self.ready}{' (' + self.detail + ')' if self.detail else ''}"]
        out += [
            f"{c.model}: {c.status} in {c.seconds:.2f} s{': ' + c.detail if c.detail else ''}"
            for c in self.checks
        ]
        return out


def tiny_png(size: int = 8) -> bytes:
    """A valid ``size`` x ``size`` RGB PNG of random pixels: different bytes every call (never a cache hit)."""
    rows = b"".join(b"\x00" + os.urandom(size * 3) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def list_models(
    base_url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> dict[str, str]:
    """``{model: state}`` of the server from its repository index (every model, ``READY``, ``UNAVAILABLE``,
    ``LOADING``, ...): an admin API, so ``headers`` must carry the admin key (``ofa-admin-key``).

    Raises :class:`RuntimeError` when the server refuses, :class:`OSError` when it does not answer."""
    try:
        index = TritonHttp(base_url, headers).repository_index(timeout)
    except TritonHttpError as exc:
        if exc.status == 403:
            raise RuntimeError(
                "the repository index needs the admin key (OFA_ADMIN_KEY or OFA_ADMIN_KEY_FILE); "
                "or name the models to probe"
            ) from None
        raise
    return {m["name"]: m.get("state", "") for m in index}


_METADATA_TYPES = {"BYTES": "TYPE_STRING", **{v[0]: k for k, v in _NUMPY_TYPES.items()}}


def _config_from_metadata(metadata: Mapping) -> dict:
    """The parts of a model config the probe needs, from the model's metadata (an open API, unlike the config):
    the batch dimension is part of the metadata's shapes (``-1``), hence ``max_batch_size`` 0."""

    def tensors(kind: str) -> list[dict]:
        return [
            {
                "name": t["name"],
                "data_type": _METADATA_TYPES.get(t.get("datatype", ""), t.get("datatype", "")),
                "dims": [int(d) for d in t.get("shape", [])],
            }
            for t in metadata.get(kind, [])
        ]

    return {
        "platform": metadata.get("platform", ""),
        "max_batch_size": 0,
        "input": tensors("inputs"),
        "output": tensors("outputs"),
    }


def _probe_inputs(config: Mapping) -> tuple[dict, bytes]:
    """The JSON header and the binary body of one fresh one-row request to a model with ``config``."""
    import numpy as np

    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    batched = int(config.get("max_batch_size", 0)) > 0
    inputs, blobs = [], []
    for spec in config.get("input", []):
        dims = [1 if int(d) < 0 else int(d) for d in spec.get("dims", [])]
        shape = ([1] if batched else []) + dims
        count = int(np.prod(shape)) if shape else 1
        kind = spec.get("data_type", "")
        if kind == "TYPE_STRING":
            one = tiny_png()
            blob = b"".join(struct.pack("<I", len(one)) + one for _ in range(count))
            datatype = "BYTES"
        elif kind in _NUMPY_TYPES:
            datatype, dtype = _NUMPY_TYPES[kind]
            if dtype.startswith("float"):
                values = rng.standard_normal(count).astype(dtype)
            elif dtype == "bool":
                values = np.zeros(count, dtype=bool)
            elif dtype == "uint8":  # pixels (preprocess's output, ofa's input): fresh random values
                values = rng.integers(0, 255, count, endpoint=True, dtype=np.uint8)
            else:
                values = np.ones(count, dtype=dtype)  # integer settings (beam_size, max_length): the cheapest
            blob = values.tobytes()
        else:
            raise RuntimeError(f"input {spec.get('name')!r} has a data type the probe cannot fill: {kind}")
        inputs.append(
            {
                "name": spec["name"],
                "shape": shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}} for o in config.get("output", [])]
    return {"inputs": inputs, "outputs": outputs}, b"".join(blobs)


def probe_model(
    base_url: str, model: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None
) -> ModelCheck:
    """One direct inference with fresh inputs to ``model`` (ensembles: skipped, reported ``ok``).

    ``headers`` go with every request: the inference key (``ofa-api-key``) when the server requires one.
    """
    start = time.monotonic()

    def check(status: str, detail: str = "") -> ModelCheck:
        return ModelCheck(model, status, detail, time.monotonic() - start)

    api = TritonHttp(base_url, headers)
    try:
        status, body = api.request("GET", f"/v2/models/{model}", timeout=timeout)
        if status != 200:
            return check("not_ready", f"metadata: HTTP {status} {body[:200].decode(errors='replace')}")
        config = _config_from_metadata(json.loads(body))
        if config.get("platform") == "ensemble":
            return check("ok", "ensemble (its steps are probed)")
        header, blob = _probe_inputs(config)
        remaining = timeout - (time.monotonic() - start)
        # Leave the queue unexecuted once we stop waiting (KServe queue timeout, in us; the models allow it), so
        # that probes given up on never pile up in front of the model.
        header["parameters"] = {"timeout": max(int(remaining * 1e6), 1)}
        head = json.dumps(header).encode()
        status, body = api.request(
            "POST",
            f"/v2/models/{model}/infer",
            head + blob,
            timeout=remaining,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(head)),
            },
        )
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return check("timeout", f"no answer within {timeout:.1f} s")
        return check("error", f"{type(reason).__name__}: {reason}")
    if status != 200:
        text = body[:300].decode(errors="replace")
        if status == 503:  # "Exceeds maximum queue size" / "Request timeout expired": overloaded
            return check("busy", f"HTTP 503: {text}")
        with contextlib.suppress(ValueError):
            text = json.loads(text).get("error", text)
        return check("error", f"HTTP {status}: {text}")
    return check("ok")


def probe_models(
    base_url: str,
    states: Mapping[str, str],
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    grace_s: float = 1.0,
    budget_s: float | None = None,
) -> dict[str, ModelCheck]:
    """:func:`probe_model` for every ``READY`` model of ``states`` (``{model: state}``), each in its own thread, all
    within ``timeout`` seconds: one slow model does not delay the others.

    A model in another state is ``not_ready`` without a request; one whose probe has not returned ``grace_s``
    seconds after the deadline is ``timeout`` ("no answer within ``budget_s``", default ``timeout``, seconds).
    """
    deadline = time.monotonic() + timeout
    checks: dict[str, ModelCheck] = {}
    threads = []
    for model, state in states.items():
        if state != "READY":
            checks[model] = ModelCheck(model, "not_ready", f"state {state or 'unknown'}", 0.0)
            continue

        def run(name: str = model) -> None:
            checks[name] = probe_model(
                base_url, name, timeout=max(deadline - time.monotonic(), 0.1), headers=headers
            )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append((model, thread))
    budget = timeout if budget_s is None else budget_s
    for model, thread in threads:
        thread.join(max(deadline - time.monotonic(), 0) + grace_s)
        if model not in checks:
            checks[model] = ModelCheck(model, "timeout", f"no answer within {budget:.1f} s", budget)
    return checks


def probe_server(
    base_url: str,
    *,
    timeout: float = 20.0,
    headers: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
) -> ProbeResult:
    """Readiness, then :func:`probe_model` for every model (concurrently), all within ``timeout`` seconds.

    ``headers``: the admin key (to list the models; else name them in ``models``) and the inference key if the
    server requires one.
    """
    deadline = time.monotonic() + timeout
    try:
        status, _ = TritonHttp(base_url).request("GET", "/v2/health/ready", timeout=timeout)
        ready = status == 200
        states = (
            {m: "READY" for m in models}
            if models is not None
            else list_models(base_url, headers=headers, timeout=max(deadline - time.monotonic(), 0.1))
        )
    except RuntimeError as exc:  # answered, but would not list its models (e.g. no admin key)
        return ProbeResult(False, (), f"cannot list the models: {exc}")
    except (OSError, ValueError) as exc:
        return ProbeResult(False, (), f"server unreachable: {exc}")
    checks = probe_models(
        base_url, states, timeout=max(deadline - time.monotonic(), 0.1), headers=headers, budget_s=timeout
    )
    return ProbeResult(
        ready, tuple(checks[m] for m in sorted(checks)), "" if ready else "/v2/health/ready says no"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 when the server is ready and every model answers, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m ofa_serving.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("OFA_PROBE_URL") or f"http://127.0.0.1:{os.environ.get('HTTP_PORT') or 8000}",
        help="the server's HTTP endpoint (default: $OFA_PROBE_URL, else http://127.0.0.1:$HTTP_PORT, port 8000)",
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds for the whole probe (default 20)"
    )
    parser.add_argument(
        "--model",
        action="append",
        help="probe this model (repeatable); default: every model of the repository index (needs the admin key)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    args = parser.parse_args(argv)
    try:
        security = load_settings(SecuritySettings)
        admin = load_secret("OFA_ADMIN_KEY", security.admin_key, security.admin_key_file)
        api = api_key_from_settings(security)
        url = urlsplit(args.url)
        if admin is None and url.hostname and is_loopback(url.hostname):  # never send a local key elsewhere
            admin = read_key_file(url.port or 80)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    headers = {**({ADMIN_HEADER: admin} if admin else {}), **({API_HEADER: api} if api else {})}
    result = probe_server(args.url.rstrip("/"), timeout=args.timeout, headers=headers, models=args.model)
    for line in result.lines():
        if not args.quiet or not result.ok:
            print(line, flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
