"""``CaptionClient`` and ``python -m client`` against the real locked server (inference key on, gRPC over TLS with a
test CA): answered with the key and the CA, refused without the key once (no retries) with an error that says
what to do and never shows a key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from client import AuthenticationError, CaptionClient, ServerUnavailableError

from .conftest import API_KEY, FAST, fresh_seed, png

pytestmark = pytest.mark.integration


def test_caption_client_with_the_key_over_grpc_tls_and_http(locked_server):
    server, ca = locked_server.server, str(locked_server.tls.ca)
    image = png(32, 24, fresh_seed())
    with CaptionClient(server.grpc_address, tls=True, ca_cert=ca, api_key=API_KEY, timeout=300) as client:
        assert client.caption(image, **FAST).text
    with CaptionClient(server.http_url, api_key=API_KEY, timeout=300) as client:
        assert client.caption(image, **FAST).text
    # A plain gRPC client gets no answer from the TLS port.
    plain = CaptionClient(server.grpc_address, api_key=API_KEY, retries=0, timeout=30)
    with plain, pytest.raises(ServerUnavailableError):
        plain.caption(image, **FAST)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_caption_client_without_the_key_is_refused_at_once(locked_server, protocol, monkeypatch):
    monkeypatch.delenv("CAPTION_API_KEY", raising=False)
    monkeypatch.delenv("CAPTION_API_KEY_FILE", raising=False)
    server, ca = locked_server.server, str(locked_server.tls.ca)
    url, options = (
        (server.grpc_address, {"tls": True, "ca_cert": ca}) if protocol == "grpc" else (server.http_url, {})
    )
    for key, hint in (
        (None, "no API key was sent"),
        ("wrong-key-0123456789", "the API key sent was refused"),
    ):
        # Refused at once: no retry (counted by the client) and no wait.
        client = CaptionClient(url, api_key=key, retries=3, backoff=10.0, timeout=60, **options)
        start = time.monotonic()
        with client, pytest.raises(AuthenticationError, match=hint) as refused:
            client.caption(png(30, 20, fresh_seed()), **FAST)
        assert time.monotonic() - start < 5.0 and client.retry_count == 0
        assert "is restricted, expecting header" in str(refused.value)
        assert API_KEY not in str(refused.value) and "wrong-key-0123456789" not in str(refused.value)
        assert client.health(models=("caption",)) == {"live": True, "ready": True, "model:caption": True}


def test_cli_with_the_key_from_the_environment_and_tls(locked_server, tmp_path):
    server, ca = locked_server.server, str(locked_server.tls.ca)
    image = tmp_path / "a.png"
    image.write_bytes(png(32, 24, fresh_seed()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    args = [sys.executable, "-m", "client", "caption", str(image), "--url", server.grpc_address, "--tls"]
    args += ["--ca-cert", ca, "--beam-size", str(FAST["beam_size"]), "--max-length", str(FAST["max_length"])]

    def run(*extra: str, **more_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*args, *extra], env={**env, **more_env}, capture_output=True, text=True, timeout=600, check=False
        )

    answered = run(CAPTION_API_KEY=API_KEY)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.startswith(f"{image}\t") and len(answered.stdout.split("\t")[1].strip()) > 0
    refused = run()
    assert refused.returncode == 1 and "no API key was sent" in refused.stderr
    wrong = run("--api-key", "wrong-key-0123456789")
    assert wrong.returncode == 1 and "the API key sent was refused" in wrong.stderr
    assert "wrong-key-0123456789" not in wrong.stdout + wrong.stderr
