"""The launcher's pieces that need no running server: locating the wheel, the backend directory, ports,
the command line and the environment (the integration tests start the real server with it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ofa_serving.launcher import (
    ServerStartError,
    TritonServer,
    default_model_repository,
    find_triton,
    free_ports,
    prepare_backend_dir,
)
from ofa_serving.settings import ServerSettings, load_settings


def test_find_triton_locates_every_part_of_the_wheel():
    t = find_triton()
    assert t.binary.name == "tritonserver" and t.binary.stat().st_mode & 0o111
    assert (t.python_backend / "libtriton_python.so").is_file()
    assert t.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (t.caches / "local").is_dir() and t.libs.name == "nvidia_pytriton.libs"


def test_backend_dir_is_built_once(tmp_path):
    first = prepare_backend_dir(directory=tmp_path / "b")
    files = {p.name: p.stat().st_ino for p in (first / "python").iterdir()}
    assert {
        "libtriton_python.so",
        "triton_python_backend_utils.py",
        "triton_python_backend_stub",
    } <= files.keys()
    assert (first / "python" / "triton_python_backend_stub").stat().st_mode & 0o111
    second = prepare_backend_dir(directory=tmp_path / "b")
    assert {p.name: p.stat().st_ino for p in (second / "python").iterdir()} == files  # nothing rewritten


def test_free_ports_are_distinct():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < 65536 for p in ports)


def test_command_line_and_environment(tmp_path):
    server = TritonServer(
        model_dir=tmp_path, host="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3, exit_timeout_secs=7
    )
    cmd = server.command()
    assert cmd[0].endswith("tritonserver")
    for flag in (
        f"--model-repository={default_model_repository()}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-timeout-secs=7",
        "--http-address=0.0.0.0",
        "--http-port=1",
        "--grpc-port=2",
        "--metrics-port=3",
        f"--cache-config=local,size={64 * 1024 * 1024}",
    ):
        assert flag in cmd
    assert any(a.startswith("--cache-directory=") and a.endswith("caches") for a in cmd)
    env = server.environment()
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(find_triton().libs)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # the stub embeds this venv's Python
    assert env["OFA_MODEL_DIR"] == str(tmp_path.resolve())
    assert server.http_url == "http://127.0.0.1:1" and server.grpc_address == "127.0.0.1:2"
    assert server.metrics_url == "http://127.0.0.1:3/metrics"
    assert not any(a.startswith("--cache-config") for a in TritonServer(response_cache_bytes=0).command())


def test_from_settings_uses_the_environment_names(tmp_path):
    settings = load_settings(
        ServerSettings, environ={"HTTP_PORT": "18000", "GRPC_PORT": "18001", "HOST": "::"}
    )
    server = TritonServer.from_settings(settings, model_dir=tmp_path)
    assert (server.http_port, server.grpc_port, server.metrics_port) == (18000, 18001, 8002)
    assert server.http_url == "http://[::1]:18000"


def test_start_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(ServerStartError, match="does not exist"):
        TritonServer.on_free_ports(model_dir=tmp_path / "missing").start()


def test_stop_before_start_is_harmless():
    assert TritonServer().stop() is None


def test_keys_and_headers_from_the_environment(tmp_path):
    """`make serve`'s server: keys from OFA_ADMIN_KEY / OFA_API_KEY_FILE, the headers clients send, no model
    control unless a supervisor's key is passed."""
    from ofa_serving.settings import SecuritySettings

    (tmp_path / "api-key").write_text("api-key-from-a-file-0123\n")
    security = load_settings(
        SecuritySettings,
        environ={"OFA_ADMIN_KEY": "admin-key-0123456789", "OFA_API_KEY_FILE": str(tmp_path / "api-key")},
    )
    server = TritonServer.from_settings(
        load_settings(ServerSettings, environ={}), security, model_dir=tmp_path
    )
    assert server.admin_headers == {"ofa-admin-key": "admin-key-0123456789"}
    assert server.api_headers == {"ofa-api-key": "api-key-from-a-file-0123"}
    assert server.grpc_admin_headers == {"triton-grpc-protocol-ofa-admin-key": "admin-key-0123456789"}
    assert server.grpc_api_headers == {"triton-grpc-protocol-ofa-api-key": "api-key-from-a-file-0123"}
    command = server.command()
    assert "--model-control-mode=none" in command and not server.grpc_tls
    assert any(a.endswith(":ofa-api-key=api-key-from-a-file-0123") for a in command)
    supervised = TritonServer.from_settings(
        load_settings(ServerSettings, environ={}),
        security,
        model_dir=tmp_path,
        admin_key="supervisor-key-0123",
    )
    assert supervised.model_control and "--model-control-mode=explicit" in supervised.command()
    assert supervised.admin_headers == {"ofa-admin-key": "supervisor-key-0123"}
    open_server = TritonServer(model_dir=tmp_path)
    assert open_server.api_headers == {} and open_server.grpc_api_headers == {}
    assert "api-key-from-a-file" not in repr(server) and "admin-key" not in repr(server)


def test_grpc_tls_from_the_environment(tmp_path):
    from ofa_serving.settings import SecuritySettings

    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("pem")
    environ = {"OFA_GRPC_TLS_CERT": str(tmp_path / "cert.pem"), "OFA_GRPC_TLS_KEY": str(tmp_path / "key.pem")}
    server = TritonServer.from_settings(
        load_settings(ServerSettings, environ={}), load_settings(SecuritySettings, environ=environ)
    )
    command = server.command()
    assert server.grpc_tls and "--grpc-use-ssl=true" in command
    assert (
        f"--grpc-server-cert={tmp_path / 'cert.pem'}" in command
        and "--grpc-use-ssl-mutual=true" not in command
    )
    mutual = TritonServer.from_settings(
        load_settings(ServerSettings, environ={}),
        load_settings(SecuritySettings, environ={**environ, "OFA_GRPC_TLS_CA": str(tmp_path / "ca.pem")}),
    )
    assert "--grpc-use-ssl-mutual=true" in mutual.command()
    assert f"--grpc-root-cert={tmp_path / 'ca.pem'}" in mutual.command()


def test_a_server_from_a_command_reads_its_endpoints_from_the_flags():
    from ofa_serving.launcher import ServerProcess

    command = ["tritonserver", "--http-port=9100", "--grpc-port", "9101", "--exit-timeout-secs=12"]
    server = ServerProcess.from_command(command, admin_key="k" * 20, api_key="a" * 20)
    assert server.command() == command and server.pid is None
    assert (server.http_url, server.grpc_address) == ("http://127.0.0.1:9100", "127.0.0.1:9101")
    assert server.metrics_url == "http://127.0.0.1:8002/metrics" and server.exit_timeout_secs == 12
    assert server.admin_headers == {"ofa-admin-key": "k" * 20} and server.api_headers == {
        "ofa-api-key": "a" * 20
    }
    assert server.environment()["OFA_DRAIN_FILE"] == str(server.drain_file) and not server.grpc_tls
    plain = ServerProcess.from_command(["tritonserver", "--grpc-use-ssl=true"])
    assert plain.http_port == 8000 and plain.exit_timeout_secs == 30 and plain.admin_headers == {}
    assert plain.grpc_tls


def test_a_server_from_a_command_runs_stops_and_can_start_again(tmp_path):
    from ofa_serving.launcher import ServerProcess
    from ofa_serving.processes import is_running

    command = [sys.executable, "-c", "import time; time.sleep(60)", f"--http-port={free_ports(1)[0]}"]
    server = ServerProcess.from_command(command)
    first = server.start().pid
    assert is_running(first) and not server.is_ready()  # nothing answers HTTP
    assert server.stop(timeout=5) == -15 and not is_running(first)
    second = server.start().pid
    assert second != first and is_running(second)
    server.terminate()
    assert server.wait(5) == -15
    assert server.stop() == -15  # idempotent
