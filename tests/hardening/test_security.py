"""Security checks (issue 5, hardening): loopback by default, no model control, no URL fetching, tensors-only
checkpoints. The image byte and pixel limits are exercised in test_bad_input.py; the non-root container user in
tests/deploy.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from load_tests.reliabilitylib import caption_inputs, fire, listening_addresses
from ofa_serving.launcher import TritonServer
from ofa_serving.settings import ServerSettings, load_settings

from .conftest import FAST, models_ready


def test_the_launcher_binds_loopback_by_default(tmp_path):
    """`make serve` = ServerSettings from the environment -> TritonServer: HOST unset means 127.0.0.1."""
    settings = load_settings(ServerSettings, environ={})
    assert settings.host == "127.0.0.1"
    command = TritonServer.from_settings(settings, model_dir=tmp_path).command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command, command
    assert "--model-control-mode=none" in command
    assert (
        load_settings(ServerSettings, environ={"HOST": "0.0.0.0"}).host == "0.0.0.0"
    )  # explicit opt-in only


@pytest.mark.integration
def test_the_running_server_listens_on_loopback_only(hardened_server):
    addresses = listening_addresses(hardened_server.pid)
    ports = {port for _addr, port in addresses}
    assert {hardened_server.http_port, hardened_server.grpc_port, hardened_server.metrics_port} <= ports
    for addr, _port in addresses:  # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1
        ip = ipaddress.ip_address(addr)
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        assert ip == ipaddress.ip_address("127.0.0.1"), addresses


@pytest.mark.integration
@pytest.mark.parametrize("action", ["load", "unload"])
def test_the_model_control_api_is_refused(hardened_server, action):
    # HTTP: POST /v2/repository/models/<model>/{load,unload}; a load may even carry a whole config of its own
    body = json.dumps(
        {"parameters": {"config": json.dumps({"backend": "python"})}} if action == "load" else {}
    )
    request = urllib.request.Request(
        f"{hardened_server.http_url}/v2/repository/models/ofa/{action}", data=body.encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    # tritonserver 2.51 answers 503 with this (odd) message for --model-control-mode=none
    assert info.value.code == 503
    assert "explicit model load / unload is not allowed" in info.value.read().decode()
    # gRPC: RepositoryModelLoad / RepositoryModelUnload
    client = grpcclient.InferenceServerClient(hardened_server.grpc_address)
    try:
        with pytest.raises(
            InferenceServerException, match="explicit model load / unload is not allowed"
        ) as err:
            getattr(client, f"{action}_model")("ofa")
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        client.close()
    assert models_ready(hardened_server)["ofa"]


class _Listener:
    """A TCP server on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.mark.integration
def test_the_server_never_fetches_urls(hardened_server):
    """A URL sent as the image is "not a decodable image", and nothing connects to it."""
    listener = _Listener()
    try:
        urls = [
            f"http://127.0.0.1:{listener.port}/cat.jpg".encode(),
            f"https://127.0.0.1:{listener.port}/cat.jpg".encode(),
            f"ftp://127.0.0.1:{listener.port}/cat.jpg".encode(),
            b"file:///etc/passwd",
        ]
        outcomes = fire(hardened_server.grpc_address, [caption_inputs(grpcclient, [u], **FAST) for u in urls])
        for url, outcome in zip(urls, outcomes, strict=True):
            assert outcome.status == "StatusCode.INVALID_ARGUMENT", (url, outcome)
            assert "not a decodable image" in outcome.message, (url, outcome.message)
        assert listener.connections == 0, "the server connected to a URL it was sent"
    finally:
        listener.close()


class _Payload:
    """Unpickling this runs code: it writes a marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_checkpoint(demo_checkpoint, directory, marker) -> None:
    """A checkpoint directory with the demo's configs and a pytorch_model.bin holding ``_Payload``."""
    directory.mkdir()
    for name in ("config.json", "configuration.json", "vocab.json", "merges.txt"):
        shutil.copy(demo_checkpoint / name, directory / name)
    torch.save({"encoder.embed_tokens.weight": torch.zeros(2, 2), "extra": _Payload(str(marker))},
               directory / "pytorch_model.bin")  # fmt: skip


def test_a_checkpoint_that_runs_code_is_refused_without_running_it(demo_checkpoint, tmp_path):
    from ofa_captioning.captioner import Captioner
    from ofa_captioning.checkpoint import load_state_dict

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil"
    _malicious_checkpoint(demo_checkpoint, checkpoint, marker)

    with pytest.raises(Exception, match="(?i)weights only load failed|unsupported global") as info:
        load_state_dict(checkpoint)
    assert "exec" in str(info.value)
    with pytest.raises(Exception, match="(?i)weights only load failed|unsupported global"):
        Captioner.from_pretrained(checkpoint)  # what the ofa model's initialize() calls
    assert not marker.exists(), "unpickling the checkpoint ran its code"

    # the file really is malicious: a plain torch.load (weights_only=False) runs the payload
    torch.load(checkpoint / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"
