"""``python -m ofa_serving.serve`` (what ``make serve`` runs): prepare a checkpoint, run tritonserver.

1. The checkpoint: ``OFA_MODEL_DIR`` if set; else the published one (``checkpoints/ofa-distilled-en``), downloaded
   through ModelScope where the hub answers (skipped once complete, and with ``OFA_DOWNLOAD=0``); else the demo
   checkpoint (``DEMO_CHECKPOINT``, default ``checkpoints/ofa-tiny-demo``) with a loud notice that its captions
   are meaningless.
   With ``OFA_MODELS`` (``name=dir ...``) several checkpoints are served at once, each as its own public
   model, from a repository generated at start (``ofa_serving.repository``).
2. tritonserver in the foreground on ``HOST`` (127.0.0.1) and ``HTTP_PORT``/``GRPC_PORT``/``METRICS_PORT``
   (8000/8001/8002); once ready it prints how to call it. SIGINT/SIGTERM are forwarded to the server at once and
   it drains: readiness turns false, new requests are refused with UNAVAILABLE (a retrying client goes to another
   replica), the requests in flight are answered, and it exits within ``OFA_EXIT_TIMEOUT_SECS`` (30 s); the
   supervisor neither heals nor restarts anything meanwhile. A second signal kills it.
   The wheel's tritonserver (2.51) has known unfixed CVEs (:mod:`ofa_serving.security`): a non-loopback ``HOST``
   is refused before anything starts (exit status 2, the CVEs named) unless ``OFA_ALLOW_UNPATCHED_TRITON=1``.
   The admin APIs always need the admin key; inference needs ``OFA_API_KEY`` when that is set.
3. Unless ``OFA_SUPERVISE=0``, :mod:`ofa_serving.supervisor` probes every model and reloads one whose backend stub
   died or hung (tritonserver 2.51 does not), and starts tritonserver again on the same ports when it crashes
   (a signal such as SIGSEGV or SIGKILL, or a non-zero exit while no stop was asked for), logging ``[supervisor]``
   lines (docs/reliability.md). After a crash loop (``OFA_MAX_SERVER_CRASHES`` crashes within
   ``OFA_SERVER_CRASH_WINDOW_S``: 5 in 300 s) it gives up and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from .launcher import ServerStartError, TritonServer, find_triton
from .repository import DEFAULT_NAME, prepare_models, prepare_server
from .security import API_HEADER, admin_key_from_settings, check_exposure, detect_runtime
from .settings import (
    SecuritySettings,
    ServerSettings,
    SettingsError,
    SupervisorSettings,
    load_settings,
)
from .supervisor import StopSignals, describe_exit, exit_status, run_supervised

__all__ = ["prepare_checkpoint", "usage_text", "parse_args", "main"]

REAL_DIR = Path("checkpoints/ofa-distilled-en")
_COMPLETE = ".download-complete"

_DEMO_NOTICE = """
################################################################################################
#  DEMO CHECKPOINT: random weights. Its captions are MEANINGLESS; it only runs the stack.      #
#  For real captions run where the ModelScope hub answers (make serve downloads the weights),  #
#  or set OFA_MODEL_DIR to a downloaded iic/ofa_image-caption_coco_distilled_en directory.     #
################################################################################################
"""


def _log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "pytorch_model.bin").is_file() or (path / "model.safetensors").is_file()
    )


def prepare_checkpoint(settings: ServerSettings, real_dir: Path = REAL_DIR) -> tuple[Path, str]:
    """The checkpoint to serve and its kind (``"configured"``, ``"real"`` or ``"demo"``), preparing it if needed."""
    if settings.model_dir is not None:
        path = settings.model_dir
        if not _is_checkpoint(path):
            raise SettingsError(f"environment variable OFA_MODEL_DIR: {path} is not a checkpoint directory")
        return path.resolve(), "configured"
    if (real_dir / _COMPLETE).is_file() and _is_checkpoint(real_dir):
        return real_dir.resolve(), "real"
    if settings.download:
        _log(f"downloading the published checkpoint into {real_dir} (fails fast when the hub is unreachable)")
        # A subprocess: a timed-out download thread must not live on beside the server.
        proc = subprocess.run([sys.executable, "-m", "ofa_captioning.download", str(real_dir)], check=False)
        if proc.returncode == 0 and _is_checkpoint(real_dir):
            (real_dir / _COMPLETE).touch()
            return real_dir.resolve(), "real"
        _log("the published checkpoint is not available; falling back to the demo checkpoint")
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

    path = Path(ensure_demo_checkpoint(settings.demo_checkpoint))
    print(_DEMO_NOTICE, file=sys.stderr, flush=True)
    return path.resolve(), "demo"


def usage_text(server: TritonServer, kind: str, models: tuple[str, ...] = (DEFAULT_NAME,)) -> str:
    """How to call the running server (CLI, curl, health), printed once it is ready."""
    http, grpc = server.http_url, server.grpc_address
    warn = "\n  NOTE: demo checkpoint, captions are meaningless.\n" if kind == "demo" else ""
    model = models[0]
    pick = "" if model == DEFAULT_NAME else f" --model {model}"
    if server.grpc_tls:
        pick += f" --tls --ca-cert {server.grpc_tls_ca or '<CA of the server certificate>'}"
    key_note, curl_key = "", ""
    if server.api_key:  # never the key itself: it stays where the operator put it
        key_note = (
            "\n  Inference needs the API key: export CAPTION_API_KEY=<OFA_API_KEY's value> for the CLI.\n"
        )
        curl_key = f' -H "{API_HEADER}: $CAPTION_API_KEY"'
    listing = f"\n  Models: {', '.join(models)}\n" if models != (DEFAULT_NAME,) else ""
    return f"""
=== OFA captioning is ready: HTTP {http}  gRPC {grpc}  metrics {server.metrics_url} ===
{warn}{listing}{key_note}
  python -m client caption path/to/image.jpg --url {grpc}{pick}
  python -m client caption photos/ --protocol http --url {server.http_address} --json
  python -m client health --url {grpc}{pick}

  {{ printf '{{"inputs":[{{"name":"image","shape":[1,1],"datatype":"BYTES","data":["'; base64 < image.jpg | tr -d '\\n'; \\
     printf '"]}}]}}'; }} | curl -s{curl_key} --data-binary @- {http}/v2/models/{model}/infer

  Stop with Ctrl-C (in-flight requests finish first; a second Ctrl-C kills).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: no options besides ``--help``; every setting comes from the environment."""
    parser = argparse.ArgumentParser(
        prog="python -m ofa_serving.serve",
        description=__doc__.split("\n\n", 1)[0].replace("``", ""),
        epilog="Settings are environment variables (README: Settings), e.g. OFA_MODEL_DIR, OFA_MODELS, HOST, "
        "HTTP_PORT, GRPC_PORT, METRICS_PORT, OFA_API_KEY, OFA_SUPERVISE.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Prepare the checkpoint, run tritonserver in the foreground, forward SIGINT/SIGTERM; its exit code.

    ``argv`` is the command line without the program name (``None``: no arguments)."""
    parse_args(argv or [])
    generated = None
    try:
        settings = load_settings(ServerSettings)
        supervision = load_settings(SupervisorSettings)
        security = load_settings(SecuritySettings)
        # before anything is downloaded or started: a vulnerable server stays on loopback unless overridden
        check_exposure(settings.host, detect_runtime(find_triton().binary), security.allow_unpatched_triton)
        admin_key = admin_key_from_settings(security) if supervision.supervise else None
        if settings.models:
            server, served, generated = prepare_models(settings, admin_key=admin_key, security=security)
            kind, names = "configured", tuple(m.name for m in served)
            what = ", ".join(f"{m.name} <- {m.checkpoint}" for m in served) + f" (repository {generated})"
        else:
            model_dir, kind = prepare_checkpoint(settings)
            server, generated = prepare_server(settings, model_dir, admin_key=admin_key, security=security)
            names, what = (DEFAULT_NAME,), f"{model_dir} ({kind})"
            what += f" (gpu profile, repository {generated})" if generated else ""
    except (SettingsError, ServerStartError, OSError) as exc:
        if generated is not None:
            shutil.rmtree(generated, ignore_errors=True)
        _log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted while preparing the checkpoint")
        return 130
    stop = StopSignals(server, _log, second_kills=True).install()
    _log(f"starting tritonserver with {what}; models load and warm up before ready")
    try:
        server.start()
        while server.process.poll() is None and not stop.requested():
            try:
                server.wait_ready(timeout=1)
                print(usage_text(server, kind, names), file=sys.stderr, flush=True)
                break
            except ServerStartError:
                if server.process.poll() is not None:
                    raise
        if admin_key is not None and server.process.poll() is None and not stop.requested():
            stop.supervising = True
            return run_supervised(server, admin_key, stop.requested, supervision)
        code = server.wait()
        if code and not stop.requested():
            _log(f"tritonserver {describe_exit(code)}; not restarted (OFA_SUPERVISE=0)")
        return exit_status(code)
    except ServerStartError as exc:
        _log(f"error: {exc}")
        server.stop(timeout=5)
        return 1
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()
        if generated is not None:
            shutil.rmtree(generated, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
