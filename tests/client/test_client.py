"""The client without a server: URLs, image sources, error mapping, retries, ordered concurrency, the CLI."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from client import api, cli
from client.api import (
    Caption,
    CaptionClient,
    CaptionError,
    CaptionTimeoutError,
    ImageSourceError,
    InvalidInputError,
    ServerUnavailableError,
    download_image,
    load_image_bytes,
)


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        (None, None, ("grpc", "127.0.0.1:8001", False)),
        (None, "http", ("http", "127.0.0.1:8000", False)),
        ("localhost:9001", None, ("grpc", "localhost:9001", False)),
        ("http://localhost:9000/", None, ("http", "localhost:9000", False)),
        ("https://example.org:443", None, ("http", "example.org:443", True)),
        ("grpc://h:1", None, ("grpc", "h:1", False)),
    ],
)
def test_url_parsing(url, protocol, expected):
    assert api._parse_url(url, protocol) == expected


def test_bad_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol"):
        CaptionClient("h:1", protocol="smtp")


def test_image_sources(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (3, 3)).save(png, format="PNG")
    (tmp_path / "a.png").write_bytes(png.getvalue())
    assert load_image_bytes(tmp_path / "a.png") == png.getvalue()
    assert load_image_bytes(str(tmp_path / "a.png")) == png.getvalue()
    assert load_image_bytes(bytearray(b"xyz")) == b"xyz"
    assert load_image_bytes(Image.new("RGB", (3, 3))).startswith(b"\x89PNG")
    with pytest.raises(ImageSourceError, match="missing.png"):
        load_image_bytes(tmp_path / "missing.png")
    with pytest.raises(ImageSourceError, match="cannot send a int"):
        load_image_bytes(42)


@pytest.fixture
def http_files(tmp_path):
    """A local HTTP server over tmp_path."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_downloaded_by_the_client_with_a_size_limit(http_files):
    # The test server is on loopback, which downloads refuse unless allowed (tests/serving/test_client_download.py).
    root, base = http_files
    (root / "img.bin").write_bytes(b"x" * 1000)
    assert load_image_bytes(f"{base}/img.bin", allow_private_urls=True) == b"x" * 1000
    with pytest.raises(ImageSourceError, match="larger than the download limit of 999 bytes"):
        download_image(f"{base}/img.bin", max_bytes=999, allow_private=True)
    with pytest.raises(ImageSourceError, match="download failed.*404"):
        download_image(f"{base}/nothing.jpg", allow_private=True)
    with pytest.raises(ImageSourceError, match="only http"):
        download_image("file:///etc/passwd")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidInputError),
        ("400", InvalidInputError),
        ("StatusCode.UNAVAILABLE", ServerUnavailableError),
        ("503", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", CaptionTimeoutError),
        ("StatusCode.INTERNAL", CaptionError),
    ],
)
def test_server_errors_are_typed_and_keep_the_message(status, kind):
    error = api._map_error(
        InferenceServerException("in ensemble 'caption', cannot decode image", status=status)
    )
    assert type(error) is kind
    assert str(error) == "in ensemble 'caption', cannot decode image" and error.status == status


def test_network_errors_are_unavailable_or_timeout():
    assert isinstance(api._map_error(ConnectionRefusedError(111, "refused")), ServerUnavailableError)
    assert isinstance(api._map_error(TimeoutError("timed out")), CaptionTimeoutError)


class FakeResult:
    def __init__(self, text, score):
        self.values = {
            "caption": np.array([[text.encode()]], dtype=object),
            "score": np.array([[score]], np.float32),
        }

    def as_numpy(self, name):
        return self.values[name]


class FakeTritonClient:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = []

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        self.calls.append({i.name(): i for i in inputs})
        if self.failures:
            raise self.failures.pop(0)
        return FakeResult("a cat", -0.5)

    def close(self):
        pass


def test_unavailable_is_retried_with_backoff_then_succeeds(monkeypatch):
    fake = FakeTritonClient([InferenceServerException("not ready", status="StatusCode.UNAVAILABLE")] * 2)
    client = CaptionClient("h:1", retries=3, backoff=0.001)
    monkeypatch.setattr(client, "_client", lambda: fake)
    assert client.caption(b"img", beam_size=2) == Caption("a cat", -0.5)
    assert len(fake.calls) == 3
    assert set(fake.calls[0]) == {"image", "beam_size"}  # max_length not sent: the server's default applies


def test_invalid_argument_is_not_retried(monkeypatch):
    fake = FakeTritonClient(
        [InferenceServerException("beam_size must be between 1 and 16", "StatusCode.INVALID_ARGUMENT")]
    )
    client = CaptionClient("h:1", retries=3, backoff=0.001)
    monkeypatch.setattr(client, "_client", lambda: fake)
    with pytest.raises(InvalidInputError, match="beam_size must be between 1 and 16"):
        client.caption(b"img", beam_size=0)
    assert len(fake.calls) == 1


def test_unavailable_gives_up_after_the_retries(monkeypatch):
    fake = FakeTritonClient([InferenceServerException("down", status="StatusCode.UNAVAILABLE")] * 10)
    client = CaptionClient("h:1", retries=2, backoff=0.001)
    monkeypatch.setattr(client, "_client", lambda: fake)
    with pytest.raises(ServerUnavailableError, match="down"):
        client.caption(b"img")
    assert len(fake.calls) == 3


def test_caption_many_keeps_n_in_flight_order_and_per_item_errors(monkeypatch):
    client = CaptionClient("h:1")
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def fake_caption(image, beam_size=None, max_length=None):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.01 * (image % 3))
        with lock:
            state["now"] -= 1
        if image % 5 == 0:
            raise InvalidInputError(f"bad {image}")
        return Caption(f"caption {image}", float(image))

    monkeypatch.setattr(client, "caption", fake_caption)
    results = client.caption_many(range(1, 31), concurrency=4)
    assert state["max"] == 4
    for i, r in zip(range(1, 31), results, strict=True):
        if i % 5 == 0:
            assert isinstance(r, InvalidInputError) and str(r) == f"bad {i}"
        else:
            assert r == Caption(f"caption {i}", float(i))


def test_expand_inputs_walks_directories_by_extension(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPG", "d/a.png", "d/sub/c.webp", "d/notes.txt", "single.gif"):
        (tmp_path / name).write_bytes(b"x")
    items = list(
        cli.expand_inputs([str(tmp_path / "d"), str(tmp_path / "single.gif"), str(tmp_path / "nope.png")])
    )
    names = [Path(n).name for n, _ in items]
    assert names == ["a.png", "b.JPG", "c.webp", "single.gif", "nope.png"]
    assert isinstance(items[-1][1], ImageSourceError)


class FakeCaptionClient:
    """Stands in for CaptionClient in the CLI: 'bad' in a name means the server refuses the image."""

    models: list[str] = []
    options: list[dict] = []
    retry_count = 0

    def __init__(self, url, protocol, timeout=None, retries=None, model="caption", **options):
        self.protocol, self.address = protocol or "grpc", url
        FakeCaptionClient.models.append(model)
        FakeCaptionClient.options.append(options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def imap(self, sources, concurrency, beam_size, max_length, num_captions=None):
        for src in sources:
            if isinstance(src, CaptionError):
                yield src
            elif "bad" in str(src):
                yield InvalidInputError("cannot decode image")
            elif num_captions is not None:
                yield [Caption(f"caption {k} of {Path(src).stem}", -1.0 - k) for k in range(num_captions)]
            else:
                yield Caption(f"caption of {Path(src).stem} b{beam_size}", -1.0)


def test_cli_prints_tab_lines_and_reports_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CaptionClient", FakeCaptionClient)
    for name in ("a.jpg", "bad.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    rc = cli.main(["caption", str(tmp_path), "--beam-size", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.splitlines() == [f"{tmp_path}/a.jpg\tcaption of a b2", f"{tmp_path}/c.png\tcaption of c b2"]
    assert f"error: {tmp_path}/bad.png: cannot decode image" in err and "1 of 3 image(s) failed" in err


def test_cli_json_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CaptionClient", FakeCaptionClient)
    (tmp_path / "a.jpg").write_bytes(b"x")
    rc = cli.main(["caption", str(tmp_path / "a.jpg"), str(tmp_path / "missing.jpg"), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1
    assert lines[0] == {"image": str(tmp_path / "a.jpg"), "caption": "caption of a bNone", "score": -1.0}
    assert lines[1]["image"] == str(tmp_path / "missing.jpg") and lines[1]["error_type"] == "ImageSourceError"


def test_cli_all_good_exits_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CaptionClient", FakeCaptionClient)
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert cli.main(["caption", str(tmp_path / "a.jpg")]) == 0


class FakeNBestClient(FakeTritonClient):
    def infer(self, model, inputs, outputs=None, client_timeout=None):
        self.calls.append({i.name(): i for i in inputs})
        self.requested = [o.name() for o in outputs]
        return types.SimpleNamespace(
            as_numpy={
                "captions": np.array([[b"a cat", b"a dog", b""]], dtype=object),
                "scores": np.array([[-0.5, -0.75, -np.inf]], np.float32),
            }.__getitem__
        )


def test_caption_n_best_sends_num_captions_and_reads_the_lists(monkeypatch):
    fake = FakeNBestClient([])
    client = CaptionClient("h:1")
    monkeypatch.setattr(client, "_client", lambda: fake)
    got = client.caption_n_best(b"img", num_captions=3, beam_size=4)
    assert got == [Caption("a cat", -0.5), Caption("a dog", -0.75), Caption("", float("-inf"))]
    assert set(fake.calls[0]) == {"image", "num_captions", "beam_size"}
    assert fake.requested == ["captions", "scores"]
    client.caption_n_best(b"img")
    assert set(fake.calls[1]) == {"image"}  # num_captions absent: the checkpoint's default applies


def test_caption_many_with_num_captions_returns_lists(monkeypatch):
    fake = FakeNBestClient([])
    client = CaptionClient("h:1")
    monkeypatch.setattr(client, "_client", lambda: fake)
    results = client.caption_many([b"x", ImageSourceError("gone")], concurrency=2, num_captions=3)
    assert [c.text for c in results[0]] == ["a cat", "a dog", ""]
    assert isinstance(results[1], ImageSourceError)


def test_cli_num_captions_prints_n_lines_per_image_and_json_lists(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CaptionClient", FakeCaptionClient)
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    assert cli.main(["caption", str(tmp_path), "--num-captions", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path}/a.jpg\tcaption 0 of a",
        f"{tmp_path}/a.jpg\tcaption 1 of a",
        f"{tmp_path}/b.jpg\tcaption 0 of b",
        f"{tmp_path}/b.jpg\tcaption 1 of b",
    ]
    assert cli.main(["caption", str(tmp_path / "a.jpg"), "--num-captions", "3", "--json"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line == {
        "image": str(tmp_path / "a.jpg"),
        "caption": "caption 0 of a",
        "score": -1.0,
        "captions": [{"caption": f"caption {k} of a", "score": -1.0 - k} for k in range(3)],
    }


def test_cli_model_option_picks_the_public_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CaptionClient", FakeCaptionClient)
    monkeypatch.setattr(FakeCaptionClient, "models", [])
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert cli.main(["caption", str(tmp_path / "a.jpg"), "--model", "caption_zh"]) == 0
    assert cli.main(["caption", str(tmp_path / "a.jpg")]) == 0
    assert FakeCaptionClient.models == ["caption_zh", "caption"]
