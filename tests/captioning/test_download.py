"""``python -m ofa_captioning.download`` fails fast, and says what to do, where the hub cannot be reached."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ofa_captioning.download import MODEL_ID, REVISION


def _run_download(
    target: Path, *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> tuple[int, str, float]:
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ofa_captioning.download", str(target), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _assert_offline_message(output: str, target: Path) -> None:
    assert "hub" in output and ("cannot be reached" in output or "cannot reach" in output), output
    assert f"python -m ofa_captioning.demo_checkpoint {target}" in output, output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_constants_name_the_published_model() -> None:
    assert (MODEL_ID, REVISION) == ("iic/ofa_image-caption_coco_distilled_en", "v1.0.1")


@pytest.mark.slow
def test_connection_refused_fails_within_30s(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    rc, out, elapsed = _run_download(
        target, env={"MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    )
    assert rc == 2, out
    assert elapsed < 30, elapsed
    _assert_offline_message(out, target)
    assert not (target / "pytorch_model.bin").exists()


@pytest.mark.slow
def test_silent_hub_hits_the_deadline(tmp_path: Path) -> None:
    # A server that accepts connections and never answers: without our deadline the client would wait for its
    # own read timeouts and retries, for minutes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # accept() timed out: check `stop` again
                held.append(srv.accept()[0])

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        target = tmp_path / "ckpt"
        endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
        rc, out, elapsed = _run_download(target, "--timeout", "3", env={"MODELSCOPE_ENDPOINT": endpoint})
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
        srv.close()
    assert rc == 2, out
    assert "did not answer within 3 s" in out, out
    assert elapsed < 3 + 20, elapsed  # deadline + interpreter and modelscope import
    _assert_offline_message(out, target)


def _hub_resolves() -> bool:
    try:
        socket.getaddrinfo("modelscope.cn", 443)
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(_hub_resolves(), reason="the hub is reachable from here: this would download 190 MB")
def test_default_hub_fails_within_30s_offline(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    rc, out, elapsed = _run_download(target, unset=("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"))
    assert rc == 2, out
    assert elapsed < 30, elapsed
    _assert_offline_message(out, target)
