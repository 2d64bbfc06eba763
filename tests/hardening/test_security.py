"""Security checks: loopback by default (and only, for the wheel's vulnerable server, unless overridden), every
non-public API behind the admin key, the optional inference key, gRPC over TLS, no model control, no URL fetching,
tensors-only checkpoints. The image byte and pixel limits are exercised in test_bad_input.py; the non-root
container user in tests/deploy.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from load_tests.reliabilitylib import caption_inputs, fire, listening_addresses
from ofa_serving import launcher as launcher_module
from ofa_serving import security as security_module
from ofa_serving import serve as serve_module
from ofa_serving.launcher import ServerStartError, TritonServer, find_triton, free_port
from ofa_serving.processes import stub_pids
from ofa_serving.security import (
    ADMIN_APIS,
    CVES,
    UnpatchedServerError,
    check_exposure,
    detect_runtime,
    grpc_tls_flags,
    load_secret,
    read_key_file,
    write_key_file,
)
from ofa_serving.settings import SecuritySettings, ServerSettings, SettingsError, load_settings

from .conftest import API_KEY, FAST, fresh_seed, models_ready, png


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
    url = f"{hardened_server.http_url}/v2/repository/models/ofa/{action}"
    with pytest.raises(urllib.error.HTTPError) as info:  # without the admin key: refused before anything
        urllib.request.urlopen(urllib.request.Request(url, data=body.encode(), method="POST"), timeout=30)
    assert info.value.code == 403 and "This API is restricted" in info.value.read().decode()
    request = urllib.request.Request(
        url, data=body.encode(), headers=hardened_server.admin_headers, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:  # even with it: no model control when unsupervised
        urllib.request.urlopen(request, timeout=30)
    # tritonserver 2.51 answers 503 with this (odd) message for --model-control-mode=none
    assert info.value.code == 503
    assert "explicit model load / unload is not allowed" in info.value.read().decode()
    # gRPC: RepositoryModelLoad / RepositoryModelUnload
    client = grpcclient.InferenceServerClient(hardened_server.grpc_address)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            getattr(client, f"{action}_model")("ofa")
        with pytest.raises(
            InferenceServerException, match="explicit model load / unload is not allowed"
        ) as err:
            getattr(client, f"{action}_model")("ofa", headers=hardened_server.grpc_admin_headers)
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


# ------------------------------------------------------------------------- the wheel's server stays on loopback


def test_the_bundled_server_is_known_to_be_vulnerable():
    runtime = detect_runtime(find_triton().binary)
    assert runtime.version == "2.51.0" and runtime.source.startswith("nvidia-pytriton ")
    ids = {c.id for c in runtime.unfixed()}
    # the chunked-encoding crash, the Python backend's shared-memory chain, and the 2026 bypasses
    assert {"CVE-2025-23310", "CVE-2025-23319", "CVE-2025-23334", "CVE-2026-24207"} <= ids
    assert ids == {c.id for c in CVES}  # 2.51 predates every fix in the table
    assert all(c.source and c.fixed_release and c.fixed_version for c in CVES)


def test_an_ngc_server_is_judged_by_its_release(tmp_path):
    (tmp_path / "bin").mkdir()
    binary = tmp_path / "bin" / "tritonserver"
    binary.touch()

    def unfixed(version: str, release: str | None) -> set[str]:
        (tmp_path / "TRITON_VERSION").write_text(version + "\n")
        environ = {"NVIDIA_TRITON_SERVER_VERSION": release} if release else {}
        return {c.id for c in detect_runtime(binary, environ).unfixed()}

    assert unfixed("2.51.0", "24.10") == {c.id for c in CVES}  # today's image
    assert "CVE-2025-23310" not in unfixed("2.59.1", "25.07") and "CVE-2025-23316" in unfixed(
        "2.59.1", "25.07"
    )
    assert unfixed("2.71.0", "26.07") == set()
    assert unfixed("2.71.0", None) == set()  # the server version alone, without the release


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "example.org"])
def test_a_non_loopback_host_is_refused_with_the_cves_named(host):
    runtime = detect_runtime(find_triton().binary)
    with pytest.raises(UnpatchedServerError) as refused:
        check_exposure(host, runtime, allow_unpatched=False)
    message = str(refused.value)
    assert f"HOST={host}" in message and "Triton 2.51.0" in message
    assert all(c.id in message for c in CVES)
    assert "docker/" in message and "OFA_ALLOW_UNPATCHED_TRITON=1" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_override(host):
    assert check_exposure(host, detect_runtime(find_triton().binary)) is None


def test_the_override_starts_it_with_a_loud_warning(tmp_path, monkeypatch, capsys):
    """OFA_ALLOW_UNPATCHED_TRITON=1 (read through the settings): the launcher goes on to start tritonserver."""
    settings = load_settings(ServerSettings, environ={"HOST": "0.0.0.0"})
    security = load_settings(SecuritySettings, environ={"OFA_ALLOW_UNPATCHED_TRITON": "1"})
    started = []

    def popen(cmd, **_kwargs):
        started.append(cmd)
        raise RuntimeError("stand-in for tritonserver")

    monkeypatch.setattr(launcher_module.subprocess, "Popen", popen)
    server = TritonServer.from_settings(settings, security, model_dir=tmp_path, http_port=free_port())
    with pytest.raises(RuntimeError, match="stand-in"):
        server.start()
    assert started and "--http-address=0.0.0.0" in started[0]
    err = capsys.readouterr().err
    assert "WARNING: OFA_ALLOW_UNPATCHED_TRITON is set" in err and "CVE-2025-23310" in err
    # without it, the same start is refused before tritonserver runs
    started.clear()
    refused = TritonServer.from_settings(
        settings, load_settings(SecuritySettings, environ={}), model_dir=tmp_path
    )
    with pytest.raises(ServerStartError, match="CVE-2025-23310"):
        refused.start()
    assert not started and refused.process is None


def test_make_serve_refuses_a_non_loopback_host_before_starting(monkeypatch, capsys):
    """`python -m ofa_serving.serve` with HOST=0.0.0.0: exit status 2, one message, nothing prepared or started."""
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.delenv("OFA_ALLOW_UNPATCHED_TRITON", raising=False)

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("nothing may be prepared or started")

    monkeypatch.setattr(serve_module, "prepare_checkpoint", must_not_run)
    monkeypatch.setattr(serve_module, "prepare_server", must_not_run)
    monkeypatch.setattr(launcher_module.subprocess, "Popen", must_not_run)
    assert serve_module.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[serve] error: HOST=0.0.0.0: refusing"), err
    assert "CVE-2025-23310" in err[0] and "CVE-2025-23319" in err[0] and "docker/" in err[0]


# ------------------------------------------------------------------------------------------------- keys


def test_keys_come_from_the_environment_or_a_file_and_never_show(tmp_path):
    secret = "s3cret-value-0123456789"
    assert load_secret("OFA_API_KEY", secret, None) == secret
    (tmp_path / "key").write_text(secret + "\n")
    assert load_secret("OFA_API_KEY", None, tmp_path / "key") == secret
    assert load_secret("OFA_API_KEY", None, None) is None
    cases = [
        ((secret, tmp_path / "key"), "OFA_API_KEY or OFA_API_KEY_FILE, not both"),
        ((None, tmp_path / "missing"), "OFA_API_KEY_FILE: cannot read"),
        (("short", None), "OFA_API_KEY: the key must be at least 16 characters"),
        (("has,a:comma=and-more-chars", None), "OFA_API_KEY: the key must be"),
    ]
    (tmp_path / "empty").write_text("\n")
    cases.append(((None, tmp_path / "empty"), "OFA_API_KEY_FILE: .*empty is empty"))
    for (value, path), message in cases:
        with pytest.raises(SettingsError, match=message) as err:
            load_secret("OFA_API_KEY", value, path)
        assert (value or secret) not in str(err.value)
    settings = load_settings(SecuritySettings, environ={"OFA_API_KEY": secret, "OFA_ADMIN_KEY": secret})
    assert secret not in repr(settings)  # settings printed in a log line show no key


def test_the_server_command_restricts_every_non_public_api(tmp_path):
    server = TritonServer(model_dir=tmp_path, admin_key=None, api_key="inference-key-0123456789")
    assert len(server.admin_key) >= 16 and server.admin_key != TritonServer(model_dir=tmp_path).admin_key
    command = server.command()
    admin = f"{','.join(ADMIN_APIS)}:ofa-admin-key={server.admin_key}"
    api = "inference:ofa-api-key=inference-key-0123456789"
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert f"{flag}={admin}" in command and f"{flag}={api}" in command
    assert "--model-control-mode=none" in command
    assert set(ADMIN_APIS) | {"inference"} | {"health", "metadata"} == {
        "shared-memory", "logging", "trace", "model-repository", "model-config", "statistics",
        "inference", "health", "metadata",
    }  # fmt: skip
    # the server's environment holds no key (the models need none)
    env = TritonServer(model_dir=tmp_path, env={}).environment()
    assert "OFA_API_KEY" not in env and "OFA_ADMIN_KEY" not in env
    # without an inference key: only the admin group
    plain = TritonServer(model_dir=tmp_path).command()
    assert not any("ofa-api-key" in a for a in plain)
    assert sum(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol")) for a in plain) == 2


def test_grpc_tls_flags(tmp_path):
    for name in ("cert", "key", "ca"):
        (tmp_path / name).write_text("pem")
    assert grpc_tls_flags(None, None, None) == []
    assert grpc_tls_flags(tmp_path / "cert", tmp_path / "key") == [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tmp_path / 'cert'}",
        f"--grpc-server-key={tmp_path / 'key'}",
    ]
    mutual = grpc_tls_flags(tmp_path / "cert", tmp_path / "key", tmp_path / "ca")
    assert mutual[3:] == ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tmp_path / 'ca'}"]
    with pytest.raises(SettingsError, match="OFA_GRPC_TLS_CERT and OFA_GRPC_TLS_KEY go together"):
        grpc_tls_flags(tmp_path / "cert", None)
    with pytest.raises(SettingsError, match="OFA_GRPC_TLS_KEY: .*nope is not a file"):
        TritonServer(grpc_tls_cert=tmp_path / "cert", grpc_tls_key=tmp_path / "nope")


def test_the_admin_key_file_is_the_owners_only(tmp_path, monkeypatch):
    monkeypatch.setattr(security_module.tempfile, "gettempdir", lambda: str(tmp_path))
    key = "admin-key-0123456789abcdef"
    path = write_key_file(18000, key)
    assert path == tmp_path / "ofa-admin-key-18000" and path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(18000) == key
    path.chmod(0o644)  # readable by others: not trusted
    assert read_key_file(18000) is None
    path.unlink()
    (tmp_path / "elsewhere").write_text(key)
    (tmp_path / "elsewhere").chmod(0o600)
    path.symlink_to(tmp_path / "elsewhere")  # a planted link is not followed...
    assert read_key_file(18000) is None
    assert write_key_file(18000, key) == path and not path.is_symlink()  # ...and is replaced
    assert (tmp_path / "elsewhere").read_text() == key
    security_module.remove_key_file(18000, key)
    assert not path.exists()


# --------------------------------------------------------------------------------- admin APIs behind the key

#: One call per restricted category (shared memory: system and CUDA), as (label, method, args).
ADMIN_CALLS = [
    ("shared-memory (system)", "get_system_shared_memory_status", ()),
    ("shared-memory (CUDA)", "get_cuda_shared_memory_status", ()),
    ("logging (read)", "get_log_settings", ()),
    ("logging (write)", "update_log_settings", ({"log_verbose_level": 0},)),
    ("trace", "get_trace_settings", ()),
    ("model-repository", "get_model_repository_index", ()),
    ("model-config", "get_model_config", ("ofa",)),
    ("statistics", "get_inference_statistics", ("ofa",)),
]


def _client(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_address), server.admin_headers
    return grpcclient.InferenceServerClient(server.grpc_address), server.grpc_admin_headers


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(("label", "method", "args"), ADMIN_CALLS, ids=[c[0] for c in ADMIN_CALLS])
def test_each_admin_api_needs_the_admin_key(hardened_server, protocol, label, method, args):
    client, headers = _client(hardened_server, protocol)
    try:
        with pytest.raises(InferenceServerException, match="restricted") as refused:
            getattr(client, method)(*args)
        assert hardened_server.admin_key not in str(refused.value)
        with pytest.raises(InferenceServerException, match="restricted"):  # a wrong key is no key
            getattr(client, method)(*args, headers={k: "wrong-key-0123456789" for k in headers})
        getattr(client, method)(*args, headers=headers)  # accepted with it
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_metadata_and_inference_stay_open(hardened_server, protocol):
    client, _headers = _client(hardened_server, protocol)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("caption")
        assert client.get_server_metadata() and client.get_model_metadata("caption")
    finally:
        client.close()
    (outcome,) = fire(
        hardened_server.grpc_address, [caption_inputs(grpcclient, [png(30, 20, fresh_seed())], **FAST)]
    )
    assert outcome.ok, outcome


def _backend_regions() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*"))


@pytest.mark.integration
def test_registering_a_backend_shared_memory_region_is_refused(hardened_server):
    """Step 2 of the CVE-2025-23319 chain: any client registered the Python backend's own region (HTTP 200)."""
    regions = _backend_regions()
    assert regions, "the server's stubs hold backend regions in /dev/shm"
    body = json.dumps({"key": f"/{regions[0]}", "offset": 0, "byte_size": 64}).encode()
    request = urllib.request.Request(
        f"{hardened_server.http_url}/v2/systemsharedmemory/region/stolen/register", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403 and "This API is restricted" in refused.value.read().decode()
    client = grpcclient.InferenceServerClient(hardened_server.grpc_address)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            client.register_system_shared_memory("stolen", f"/{regions[0]}", 64)
        status = client.get_system_shared_memory_status(
            headers=hardened_server.grpc_admin_headers, as_json=True
        )
    finally:
        client.close()
    assert "stolen" not in json.dumps(status), status


@pytest.mark.integration
def test_no_key_in_the_server_log(hardened_server, locked_server):
    for server in (hardened_server, locked_server.server):
        log = server.log_file.read_text(errors="replace")
        assert server.admin_key not in log
        assert not server.api_key or server.api_key not in log


# ------------------------------------------------------------------------ inference key and gRPC over TLS


def _tls_client(locked, **kwargs):
    return grpcclient.InferenceServerClient(
        locked.server.grpc_address, ssl=True, root_certificates=str(locked.tls.ca), **kwargs
    )


def _caption_over_tls(locked, headers: dict[str, str] | None) -> str:
    client = _tls_client(locked)
    try:
        result = client.infer(
            "caption", caption_inputs(grpcclient, [png(32, 24, fresh_seed())], **FAST), headers=headers,
            client_timeout=300,
        )  # fmt: skip
        return result.as_numpy("caption")[0][0].decode()
    finally:
        client.close()


@pytest.mark.integration
def test_inference_needs_the_api_key_over_grpc(locked_server):
    with pytest.raises(InferenceServerException, match="This protocol is restricted") as refused:
        _caption_over_tls(locked_server, None)
    assert API_KEY not in str(refused.value)
    assert _caption_over_tls(locked_server, {"triton-grpc-protocol-ofa-api-key": API_KEY})
    assert locked_server.server.grpc_api_headers == {"triton-grpc-protocol-ofa-api-key": API_KEY}


def _curl_form_request(server: TritonServer, headers: dict[str, str]) -> urllib.request.Request:
    """What docs/serving.md's curl example sends: JSON, the image as base64 text."""
    body = {
        "inputs": [
            {"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(png(30, 20, fresh_seed())).decode()]},
            {"name": "max_length", "shape": [1, 1], "datatype": "INT32", "data": [FAST["max_length"]]},
            {"name": "beam_size", "shape": [1, 1], "datatype": "INT32", "data": [FAST["beam_size"]]},
        ]
    }  # fmt: skip
    return urllib.request.Request(
        f"{server.http_url}/v2/models/caption/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )


@pytest.mark.integration
def test_inference_needs_the_api_key_over_http_and_health_stays_open(locked_server):
    server = locked_server.server
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(_curl_form_request(server, {}), timeout=300)
    text = refused.value.read().decode()
    assert refused.value.code == 403 and "This API is restricted" in text and API_KEY not in text
    with urllib.request.urlopen(_curl_form_request(server, {"ofa-api-key": API_KEY}), timeout=300) as answer:
        outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
    assert outputs["caption"]["data"][0]
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        inputs = caption_inputs(httpclient, [png(30, 20, fresh_seed())], **FAST)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.infer("caption", inputs)
        assert client.infer("caption", inputs, headers=server.api_headers).as_numpy("caption")[0][0]
        # probes and load balancers need no key
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("caption")
        assert client.get_model_metadata("caption")
    finally:
        client.close()
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/caption/ready"):
        with urllib.request.urlopen(f"{server.http_url}{path}", timeout=30) as answer:
            assert answer.status == 200


@pytest.mark.integration
def test_grpc_over_tls_answers_tls_clients_only(locked_server):
    client = _tls_client(locked_server)
    try:
        assert client.is_server_live() and client.is_server_ready()  # health: no key
    finally:
        client.close()
    plain = grpcclient.InferenceServerClient(locked_server.server.grpc_address)
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=10)
    finally:
        plain.close()
    assert locked_server.server.grpc_tls and locked_server.server.is_ready()  # readiness is HTTP: unaffected


@pytest.mark.integration
def test_the_supervisor_heals_a_killed_stub_while_the_api_key_is_on(locked_server):
    server, supervisor = locked_server.server, locked_server.supervisor
    headers = {"triton-grpc-protocol-ofa-api-key": API_KEY}
    assert _caption_over_tls(locked_server, headers)
    (victim,) = stub_pids(server.pid, "ofa")
    heals = supervisor.heals["ofa"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while supervisor.heals["ofa"] < heals + 1:
        assert time.monotonic() < deadline, (supervisor.events, locked_server.log_lines)
        time.sleep(0.5)
    assert victim not in stub_pids(server.pid, "ofa")
    assert any("ofa: healed in" in line for line in locked_server.log_lines)
    assert not any(API_KEY in line or server.admin_key in line for line in locked_server.log_lines)
    assert _caption_over_tls(locked_server, headers)


def test_the_probe_sends_the_local_key_file_to_loopback_only(tmp_path, monkeypatch):
    from ofa_serving import probe as probe_module

    monkeypatch.setattr(security_module.tempfile, "gettempdir", lambda: str(tmp_path))
    for name in ("OFA_ADMIN_KEY", "OFA_ADMIN_KEY_FILE", "OFA_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OFA_API_KEY", "inference-key-0123456789")
    write_key_file(18000, "admin-key-0123456789abcdef")
    sent = []

    def probe_server(url, *, timeout, headers, models):
        sent.append((url, headers, models))
        return probe_module.ProbeResult(True, (probe_module.ModelCheck("ofa", "ok", "", 0.1),))

    monkeypatch.setattr(probe_module, "probe_server", probe_server)
    assert probe_module.main(["--url", "http://127.0.0.1:18000"]) == 0
    assert sent[-1][1] == {
        "ofa-admin-key": "admin-key-0123456789abcdef",
        "ofa-api-key": "inference-key-0123456789",
    }
    assert probe_module.main(["--url", "http://example.org:18000", "--model", "ofa"]) == 0
    assert sent[-1][1] == {"ofa-api-key": "inference-key-0123456789"} and sent[-1][2] == ["ofa"]
