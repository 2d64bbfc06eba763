"""``python -m client`` end to end against the real server: a folder in, captions out, failures reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from load_tests.testkit.parity import assert_same_results

from .conftest import decode_error, distinct_images

pytestmark = pytest.mark.integration


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], input=stdin, capture_output=True, timeout=600, check=False
    )


def test_caption_a_folder(triton_server, captioner, tmp_path):
    images = distinct_images(3, start_seed=5000)
    (tmp_path / "sub").mkdir()
    paths = [tmp_path / "a.png", tmp_path / "sub" / "b.PNG", tmp_path / "c.png"]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image, not picked up")

    proc = run_cli(
        "caption", str(tmp_path), "--url", triton_server.grpc_address, "--max-length", "2", "--json"
    )
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    by_name = {line["image"]: line for line in lines}
    assert sorted(by_name) == sorted(str(p) for p in [*paths, tmp_path / "broken.jpg"])
    for path, data in zip(paths, images, strict=True):
        assert_same_results(by_name[str(path)], captioner.caption([data], max_length=2)[0])
    broken = by_name[str(tmp_path / "broken.jpg")]
    assert broken["error_type"] == "InvalidInputError" and decode_error(b"not a jpeg") in broken["error"]
    assert f"error: {tmp_path / 'broken.jpg'}:" in proc.stderr.decode()


def test_tab_output_over_http_and_stdin(triton_server, captioner):
    (data,) = distinct_images(1, start_seed=6000)
    proc = run_cli("caption", "-", "--url", triton_server.http_url, "--max-length", "2", stdin=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"-\t{captioner.caption([data], max_length=2)[0].text}\n"


def test_health(triton_server):
    proc = run_cli("health", "--url", triton_server.grpc_address)
    assert proc.returncode == 0, proc.stderr
    assert "model ofa" in proc.stdout.decode() and "NO" not in proc.stdout.decode()
