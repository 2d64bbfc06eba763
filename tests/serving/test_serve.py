"""`python -m ofa_serving.serve`'s checkpoint choice (no server, no hub): OFA_MODEL_DIR, the published
checkpoint once downloaded, the demo checkpoint as the fallback."""

from __future__ import annotations

import signal
import subprocess
import types
from pathlib import Path

import pytest

from ofa_serving import serve
from ofa_serving.launcher import TritonServer
from ofa_serving.settings import ServerSettings, SettingsError, load_settings


def make_checkpoint(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(b"")
    return path


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """ensure_demo_checkpoint stand-in; records the directories it was asked for."""
    calls = []

    def ensure(path):
        calls.append(path)
        return make_checkpoint(tmp_path / "demo")

    monkeypatch.setattr("ofa_captioning.demo_checkpoint.ensure_demo_checkpoint", ensure)
    return calls


@pytest.fixture
def download(monkeypatch):
    """subprocess.run stand-in for `python -m ofa_captioning.download DIR`; set .succeed to choose."""
    state = types.SimpleNamespace(calls=[], succeed=False)

    def run(cmd, check=False):
        state.calls.append(cmd)
        if state.succeed:
            make_checkpoint(Path(cmd[-1]))
        return subprocess.CompletedProcess(cmd, 0 if state.succeed else 2)

    monkeypatch.setattr(serve.subprocess, "run", run)
    return state


def test_configured_checkpoint_is_used_as_is(tmp_path, demo, download):
    ckpt = make_checkpoint(tmp_path / "mine")
    settings = load_settings(ServerSettings, environ={"OFA_MODEL_DIR": str(ckpt)})
    assert serve.prepare_checkpoint(settings, real_dir=tmp_path / "real") == (ckpt.resolve(), "configured")
    assert not download.calls and not demo


def test_configured_directory_that_is_not_a_checkpoint_is_refused(tmp_path, demo, download):
    settings = load_settings(ServerSettings, environ={"OFA_MODEL_DIR": str(tmp_path / "empty")})
    with pytest.raises(SettingsError, match="OFA_MODEL_DIR: .*empty is not a checkpoint directory"):
        serve.prepare_checkpoint(settings, real_dir=tmp_path / "real")


def test_published_checkpoint_is_downloaded_once(tmp_path, demo, download):
    download.succeed = True
    settings = load_settings(ServerSettings, environ={})
    real = tmp_path / "real"
    assert serve.prepare_checkpoint(settings, real_dir=real) == (real.resolve(), "real")
    assert serve.prepare_checkpoint(settings, real_dir=real) == (real.resolve(), "real")
    assert len(download.calls) == 1 and download.calls[0][-3:] == ["-m", "ofa_captioning.download", str(real)]
    assert not demo


def test_unreachable_hub_falls_back_to_the_demo_checkpoint_loudly(tmp_path, demo, download, capsys):
    settings = load_settings(ServerSettings, environ={"DEMO_CHECKPOINT": str(tmp_path / "d")})
    path, kind = serve.prepare_checkpoint(settings, real_dir=tmp_path / "real")
    assert kind == "demo" and path == (tmp_path / "demo").resolve()
    assert demo == [tmp_path / "d"] and len(download.calls) == 1
    assert "MEANINGLESS" in capsys.readouterr().err


def test_no_download_goes_straight_to_the_demo(tmp_path, demo, download):
    settings = load_settings(ServerSettings, environ={"OFA_DOWNLOAD": "0"})
    assert serve.prepare_checkpoint(settings, real_dir=tmp_path / "real")[1] == "demo"
    assert not download.calls


def test_usage_text_names_the_real_addresses():
    server = TritonServer(http_port=18000, grpc_port=18001, metrics_port=18002)
    text = serve.usage_text(server, "demo")
    assert "--url 127.0.0.1:18001" in text and "http://127.0.0.1:18000/v2/models/caption/infer" in text
    assert "meaningless" in text


def test_bad_setting_exits_with_status_2(monkeypatch, capsys):
    monkeypatch.setenv("HTTP_PORT", "eighty")
    assert serve.main() == 2
    assert "HTTP_PORT: expected an integer, got 'eighty'" in capsys.readouterr().err


def test_a_bad_key_file_exits_with_status_2_without_the_key(monkeypatch, capsys, tmp_path, demo, download):
    (tmp_path / "key").write_text("short key, with spaces\n")
    monkeypatch.setenv("OFA_API_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("OFA_MODEL_DIR", str(make_checkpoint(tmp_path / "ckpt")))
    assert serve.main() == 2
    err = capsys.readouterr().err
    assert "OFA_API_KEY_FILE" in err and "the key must be" in err and "short key" not in err


def test_usage_text_shows_the_key_header_never_the_key(tmp_path):
    server = TritonServer(http_port=18000, grpc_port=18001, metrics_port=18002, api_key="the-key-0123456789")
    text = serve.usage_text(server, "real")
    assert 'curl -s -H "ofa-api-key: $CAPTION_API_KEY"' in text and "CAPTION_API_KEY" in text
    assert "the-key-0123456789" not in text


class _Process:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.returncode = None

    def poll(self):
        return self.returncode

    def kill(self) -> None:
        self.sent.append("SIGKILL")

    def send_signal(self, signum) -> None:
        self.sent.append(signal.Signals(signum).name)


class _Server:
    pid, exit_timeout_secs = 4242, 30

    def __init__(self, tmp_path) -> None:
        self.process = _Process()
        self.drain_file = tmp_path / "draining"

    def terminate(self) -> None:
        self.process.sent.append("SIGTERM")


@pytest.mark.parametrize("second_kills", [True, False])
def test_stop_signals_drain_once_supervised_then_kill_or_pass_on(tmp_path, second_kills):
    from ofa_serving.supervisor import StopSignals

    lines: list[str] = []
    server = _Server(tmp_path)
    stop = StopSignals(server, lines.append, second_kills=second_kills)
    assert not stop.requested()
    stop.supervising = True
    stop(signal.SIGINT)
    assert stop.requested() and server.drain_file.exists() and server.process.sent == ["SIGTERM"]
    assert lines[0].startswith("SIGINT: stopping tritonserver (pid 4242) gracefully")
    stop(signal.SIGINT)
    assert server.process.sent[1:] == (["SIGKILL"] if second_kills else ["SIGINT"])


def test_stop_signals_before_supervision_terminate_without_the_drain_flag(tmp_path):
    from ofa_serving.supervisor import StopSignals

    server = _Server(tmp_path)
    stop = StopSignals(server, lambda line: None, second_kills=True)
    stop(signal.SIGTERM)
    assert server.process.sent == ["SIGTERM"] and not server.drain_file.exists()
    server.process.returncode = 0  # exited: later signals have nothing to reach
    stop(signal.SIGTERM)
    assert server.process.sent == ["SIGTERM"] and stop.count == 2


def test_help_describes_the_command_and_starts_nothing(capsys):
    with pytest.raises(SystemExit) as stop:
        serve.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "python -m ofa_serving.serve" in out and "OFA_MODEL_DIR" in out


def test_an_unknown_option_is_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as stop:
        serve.main(["--model", "x"])
    assert stop.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
