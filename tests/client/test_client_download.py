"""The client's image downloads: http(s) on every hop, a total deadline, non-public hosts refused unless allowed.

Local HTTP servers on 127.0.0.x stand in for image hosts. Where a test needs a host that counts as public, the
address check is told that one loopback address (127.0.0.2) is public; everything else keeps the real check.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import api, cli
from client.api import CaptionClient, ImageSourceError, download_image, is_url, load_image_bytes

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class ImageHost:
    """A threaded HTTP server on ``host`` that answers each path with its route; records each request."""

    def __init__(self, host: str, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []  # (path, Host header)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests.append((self.path, self.headers.get("Host")))
                route = owner.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def body(data: bytes) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def trickle(total: int, every: float, *, headers_too: bool = False) -> Route:
    """One byte every ``every`` seconds: the body only, or the status line and headers as well."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode()
        try:
            if headers_too:
                for byte in head:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(every)
            else:
                handler.wfile.write(head)
            for _ in range(total):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(every)
        except OSError:  # the client hung up: expected
            pass
        handler.close_connection = True

    return route


@pytest.fixture
def image_host() -> Iterator[Callable[..., ImageHost]]:
    hosts: list[ImageHost] = []

    def start(routes: dict[str, Route], host: str = "127.0.0.1") -> ImageHost:
        hosts.append(ImageHost(host, routes))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    """127.0.0.2 counts as a public address (a stand-in for an image host on the internet)."""
    real = api._refusal
    monkeypatch.setattr(
        api, "_refusal", lambda ip: None if ip == ipaddress.ip_address("127.0.0.2") else real(ip)
    )


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("fec0::1", "site-local"),
        ("100.64.0.1", "non-public"),  # shared address space (carrier-grade NAT)
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classes(address, reason):
    assert api._refusal(ipaddress.ip_address(address)) == reason


def test_loopback_is_refused_by_default_and_allowed_with_the_flag(image_host):
    host = image_host({"/img.jpg": body(b"jpeg bytes")})
    url = f"{host.base}/img.jpg"
    with pytest.raises(
        ImageSourceError, match=r"refused: 127\.0\.0\.1 is a loopback address.*allow_private_urls"
    ):
        download_image(url)
    with pytest.raises(ImageSourceError, match="loopback"):
        load_image_bytes(url)
    assert host.requests == []  # refused before connecting
    assert download_image(url, allow_private=True) == b"jpeg bytes"
    assert load_image_bytes(url, allow_private_urls=True) == b"jpeg bytes"


def test_caption_client_refuses_private_urls_unless_allowed(image_host, monkeypatch):
    host = image_host({"/img.jpg": body(b"jpeg bytes")})
    sent = []

    def fake_call(fn):  # what would go to the server
        sent.append("call")
        raise AssertionError("not reached in this test")

    client = CaptionClient("h:1", api_key="")
    monkeypatch.setattr(client, "_call", fake_call)
    with pytest.raises(ImageSourceError, match="loopback"):
        client.caption(f"{host.base}/img.jpg")
    assert sent == []
    allowed = CaptionClient("h:1", api_key="", allow_private_urls=True)
    assert allowed.allow_private_urls and not client.allow_private_urls
    monkeypatch.setattr(allowed, "_call", fake_call)
    with pytest.raises(AssertionError, match="not reached"):  # downloaded, then handed to the server
        allowed.caption(f"{host.base}/img.jpg")
    assert sent == ["call"] and host.requests == [("/img.jpg", host.base.removeprefix("http://"))]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/img.jpg", "gopher://h/x"])
def test_a_redirect_to_another_scheme_is_refused(image_host, target):
    host = image_host({"/img.jpg": redirect(target)})
    with pytest.raises(ImageSourceError, match=f"refused: redirected to {target}: only http"):
        download_image(f"{host.base}/img.jpg", allow_private=True)


def test_a_redirect_to_loopback_from_a_public_host_is_refused(image_host, public_127_0_0_2):
    inner = image_host({"/secret": body(b"internal data")}, host="127.0.0.1")
    outer = image_host(
        {
            "/img.jpg": redirect(f"{inner.base}/secret"),
            "/hop": redirect("/img2.jpg"),
            "/img2.jpg": body(b"ok"),
        },
        host="127.0.0.2",
    )
    # The public stand-in is fetched, relative redirects on it are followed...
    assert download_image(f"{outer.base}/hop") == b"ok"
    # ...but a redirect from it to a loopback host is refused before anything is sent there.
    with pytest.raises(
        ImageSourceError, match=rf"refused \(redirected to {inner.base}/secret\): 127\.0\.0\.1 is a loopback"
    ):
        download_image(f"{outer.base}/img.jpg")
    assert inner.requests == []


def test_redirects_are_followed_to_a_limit(image_host):
    host = image_host(
        {"/a": redirect("/b", 301), "/b": redirect("/c", 307), "/c": body(b"img"), "/loop": redirect("/loop")}
    )
    assert download_image(f"{host.base}/a", allow_private=True) == b"img"
    with pytest.raises(ImageSourceError, match="more than 5 redirects"):
        download_image(f"{host.base}/loop", allow_private=True)
    assert sum(path == "/loop" for path, _ in host.requests) == 6


def test_every_address_of_a_name_is_checked(monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        assert host == "images.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(api.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(api, "_connect", lambda *a: pytest.fail("connected despite a private address"))
    with pytest.raises(ImageSourceError, match=r"images\.example resolves to 10\.0\.0\.5, a private address"):
        download_image("https://images.example/cat.jpg")


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(image_host, monkeypatch):
    host = image_host({"/cat.jpg": body(b"cat")})
    port = int(host.base.rsplit(":", 1)[1])
    lookups = []

    def getaddrinfo(name, port_, *args, **kwargs):  # answers once; a second lookup could be rebound
        lookups.append(name)
        if len(lookups) > 1:
            raise AssertionError("looked up twice")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

    monkeypatch.setattr(api.socket, "getaddrinfo", getaddrinfo)
    assert download_image(f"http://images.example:{port}/cat.jpg", allow_private=True) == b"cat"
    assert lookups == ["images.example"]
    assert host.requests == [("/cat.jpg", f"images.example:{port}")]  # the name, not the address, as Host


@pytest.mark.parametrize("headers_too", [False, True], ids=["slow-body", "slow-headers"])
def test_the_total_deadline_holds_against_a_trickling_server(image_host, headers_too):
    # 100 bytes at one per 0.2 s would take 20 s (more with the headers): the deadline is 1 s for everything.
    host = image_host({"/slow.jpg": trickle(100, 0.2, headers_too=headers_too)})
    start = time.monotonic()
    with pytest.raises(ImageSourceError, match="not downloaded within 1 s"):
        download_image(f"{host.base}/slow.jpg", timeout=1.0, allow_private=True)
    assert 0.9 <= time.monotonic() - start < 3.0  # slack for a busy machine, far below the trickle's 20 s


def test_size_limit_from_the_header_and_from_the_body(image_host):
    def no_length(handler):
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(b"y" * 5000)
        handler.close_connection = True

    host = image_host({"/big": body(b"x" * 5000), "/stream": no_length})
    for path in ("/big", "/stream"):
        with pytest.raises(ImageSourceError, match="larger than the download limit of 4999 bytes"):
            download_image(f"{host.base}{path}", max_bytes=4999, allow_private=True)
    assert download_image(f"{host.base}/stream", max_bytes=5000, allow_private=True) == b"y" * 5000


def test_credentials_in_a_url_are_refused():
    with pytest.raises(ImageSourceError, match="credentials in image URLs are not supported"):
        download_image("http://user:pw@images.example/cat.jpg")


def test_a_url_has_a_scheme_and_anything_else_is_a_path(tmp_path, monkeypatch):
    assert is_url("http://h/x.jpg") and is_url("HTTPS://h/x.jpg") and is_url("file:///etc/passwd")
    assert not is_url("cat.jpg") and not is_url("/data/cat.jpg") and not is_url("C:\\cat.jpg")
    assert not is_url(Path("http:/h/x.jpg")) and not is_url(b"http://h")
    for url in ("file:///etc/passwd", "ftp://h/x.jpg"):
        with pytest.raises(ImageSourceError, match="only http"):
            load_image_bytes(url)
    # A relative path that starts like a host name is read from disk, never fetched.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.com").mkdir()
    (tmp_path / "example.com" / "cat.jpg").write_bytes(b"local")
    assert load_image_bytes("example.com/cat.jpg") == b"local"
    names = [name for name, _ in cli.expand_inputs(["ftp://h/x.jpg", "example.com/cat.jpg"])]
    assert names == ["ftp://h/x.jpg", "example.com/cat.jpg"]
    assert isinstance(
        dict(cli.expand_inputs(["ftp://h/x.jpg"]))["ftp://h/x.jpg"], str
    )  # a URL, refused later


def test_cli_allow_private_urls_flag(image_host, capsys, monkeypatch):
    host = image_host({"/img.jpg": body(b"jpeg bytes")})
    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise ValueError("stop here")

    monkeypatch.setattr(cli, "CaptionClient", Recorder)
    assert cli.main(["caption", f"{host.base}/img.jpg"]) == 2
    assert seen["allow_private_urls"] is False and seen["download_timeout"] == 30.0
    assert (
        cli.main(["caption", f"{host.base}/img.jpg", "--allow-private-urls", "--download-timeout", "5"]) == 2
    )
    assert seen["allow_private_urls"] is True and seen["download_timeout"] == 5.0
