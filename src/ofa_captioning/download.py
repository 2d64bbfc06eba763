"""Download the published checkpoint from the ModelScope hub.

    python -m ofa_captioning.download [DIR] [--timeout SECONDS]

fetches ``iic/ofa_image-caption_coco_distilled_en`` at revision ``v1.0.1`` (OFA-tiny distilled, English COCO
captions) with ModelScope's ``snapshot_download`` into ``DIR`` (default ``checkpoints/ofa-distilled-en``).

Where the hub cannot be reached the command fails within 30 s (ModelScope's own retries can take longer, and a
network that drops packets can hang for minutes), says so, names the offline alternative
``python -m ofa_captioning.demo_checkpoint DIR`` and exits with status 2. The deadline only covers reaching the
hub: once the first file starts downloading, the download may take as long as it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["DEFAULT_DIR", "MODEL_ID", "REVISION", "HubUnreachableError", "download", "main"]

MODEL_ID = "iic/ofa_image-caption_coco_distilled_en"
REVISION = "v1.0.1"
DEFAULT_DIR = "checkpoints/ofa-distilled-en"
#: Seconds allowed for reaching the hub (listing the repository) before giving up.
DEFAULT_CONNECT_TIMEOUT = 15.0


class HubUnreachableError(ConnectionError):
    """The ModelScope hub could not be reached (no network, DNS failure, blocked, or no answer in time)."""


def _offline_hint(local_dir: str | os.PathLike) -> str:
    return (
        f"Offline alternative: `python -m ofa_captioning.demo_checkpoint {local_dir}` builds a random-weight "
        "demo checkpoint in the same layout (its captions are meaningless; it exists to run the stack)."
    )


def download(
    local_dir: str | os.PathLike = DEFAULT_DIR,
    *,
    model_id: str = MODEL_ID,
    revision: str = REVISION,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Path:
    """Download the checkpoint into ``local_dir`` and return its path.

    Raises :class:`HubUnreachableError` if the hub has not answered the repository listing within
    ``connect_timeout`` seconds or fails with a network error. On timeout the download thread is left behind
    (it is a daemon thread): callers that exit right after should do so promptly.
    """
    from modelscope.hub.callback import ProgressCallback, TqdmCallback
    from modelscope.hub.snapshot_download import snapshot_download

    started = threading.Event()
    done = threading.Event()
    outcome: dict[str, object] = {}

    class _FirstFile(ProgressCallback):
        # Instantiated per file once the listing has succeeded, i.e. the hub is reachable.
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            started.set()

    def _run() -> None:
        try:
            outcome["path"] = snapshot_download(
                model_id,
                revision=revision,
                local_dir=str(local_dir),
                progress_callbacks=[TqdmCallback, _FirstFile],
            )
        except BaseException as e:  # handed to the calling thread
            outcome["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=_run, name="ofa-snapshot-download", daemon=True)
    worker.start()
    deadline = time.monotonic() + connect_timeout
    while not done.is_set() and not started.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HubUnreachableError(
                f"ModelScope hub did not answer within {connect_timeout:.0f} s while listing {model_id}@{revision}; "
                "the hub cannot be reached from here. " + _offline_hint(local_dir)
            )
        done.wait(min(remaining, 0.2))
    done.wait()
    err = outcome.get("error")
    if err is not None:
        if isinstance(err, ConnectionError | TimeoutError) or "network" in type(err).__name__.lower():
            raise HubUnreachableError(
                f"cannot reach the ModelScope hub to download {model_id}@{revision}: {err}. "
                + _offline_hint(local_dir)
            ) from err  # type: ignore[misc]
        raise err  # type: ignore[misc]
    return Path(str(outcome["path"]))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m ofa_captioning.download", description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"target directory (default {DEFAULT_DIR})")
    p.add_argument("--revision", default=REVISION, help=f"model revision (default {REVISION})")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help=f"seconds allowed for reaching the hub (default {DEFAULT_CONNECT_TIMEOUT:.0f})",
    )
    args = p.parse_args(argv)
    try:
        path = download(args.dir, revision=args.revision, connect_timeout=args.timeout)
    except HubUnreachableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A timed-out download thread (and the pools it started) must not keep the process alive.
    os._exit(rc)
