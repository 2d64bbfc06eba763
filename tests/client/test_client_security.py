"""The client's side of the inference key and of TLS: the key on every request of each protocol (from the
argument, ``$CAPTION_API_KEY`` or ``$CAPTION_API_KEY_FILE``), never retried when refused and never shown, and
the TLS settings reaching tritonclient and working against servers with certificates from a test CA.

The servers are in-process stand-ins (tests/client/fake_caption_servers.py) that answer a missing key exactly
as Triton 2.51 does: gRPC UNAVAILABLE "This protocol is restricted, expecting header
'triton-grpc-protocol-ofa-api-key'", HTTP 403 "This API is restricted, expecting header 'ofa-api-key'"."""

from __future__ import annotations

import traceback

import grpc
import pytest

from client import api, cli
from client.api import (
    API_KEY_HEADER,
    GRPC_API_KEY_HEADER,
    AuthenticationError,
    Caption,
    CaptionClient,
    CaptionError,
    ServerUnavailableError,
    api_key_headers,
    read_api_key,
)

from .fake_caption_servers import CAPTION, SCORE, FakeGrpcServer, FakeHttpServer, make_certificates

KEY = "k3y-Only-The-Client-Knows"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("CAPTION_API_KEY", raising=False)
    monkeypatch.delenv("CAPTION_API_KEY_FILE", raising=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def servers():
    started = []

    def start(kind, *args, **kwargs):
        started.append(kind(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def url_of(server) -> str:
    return server.address if isinstance(server, FakeGrpcServer) else f"http://{server.address}"


def sent_keys(server) -> list[str | None]:
    """The key header of every inference the server received (over its protocol's header name)."""
    if isinstance(server, FakeGrpcServer):
        return [m.get(GRPC_API_KEY_HEADER) for m in server.infer_metadata]
    return [h.get(API_KEY_HEADER) for h in server.infer_headers]


def no_key_anywhere(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    assert KEY not in text and KEY not in repr(error)


PROTOCOLS = pytest.mark.parametrize("kind", [FakeGrpcServer, FakeHttpServer], ids=["grpc", "http"])


@PROTOCOLS
def test_the_key_goes_with_every_inference(servers, kind):
    server = servers(kind, api_key=KEY)
    with CaptionClient(url_of(server), api_key=KEY) as client:
        assert client.caption(b"img") == Caption(CAPTION, SCORE)
        results = client.caption_many([b"a", b"b", b"c", b"d"], concurrency=3)  # one connection per thread
        assert results == [Caption(CAPTION, SCORE)] * 4
        assert client.health(models=("caption",)) == {"live": True, "ready": True, "model:caption": True}
    assert sent_keys(server) == [KEY] * 5


@PROTOCOLS
def test_the_key_comes_from_the_environment_or_a_file(servers, kind, monkeypatch, tmp_path):
    server = servers(kind, api_key=KEY)
    monkeypatch.setenv("CAPTION_API_KEY", KEY)
    with CaptionClient(url_of(server)) as client:
        assert client.caption(b"img").text == CAPTION
    monkeypatch.delenv("CAPTION_API_KEY")
    (tmp_path / "key").write_text(f"{KEY}\n")  # a mounted secret usually ends with a newline
    monkeypatch.setenv("CAPTION_API_KEY_FILE", str(tmp_path / "key"))
    with CaptionClient(url_of(server)) as client:
        assert client.caption(b"img").text == CAPTION
    # "" = explicitly no key, over the file
    with CaptionClient(url_of(server), api_key="") as client, pytest.raises(AuthenticationError):
        client.caption(b"img")
    assert sent_keys(server) == [KEY, KEY, None]


@PROTOCOLS
def test_a_missing_key_is_refused_once_with_a_clear_error(servers, kind):
    server = servers(kind, api_key=KEY)
    client = CaptionClient(url_of(server), retries=3, backoff=0.001)
    with client, pytest.raises(AuthenticationError) as caught:
        client.caption(b"img")
    assert len(sent_keys(server)) == 1  # not retried (gRPC says UNAVAILABLE, which is otherwise retried)
    message = str(caught.value)
    assert "is restricted, expecting header" in message
    assert "no API key was sent" in message and "CAPTION_API_KEY" in message and "--api-key" in message


@PROTOCOLS
def test_a_wrong_key_is_refused_once_and_never_shown(servers, kind):
    server = servers(kind, api_key="the-server's-key")
    with CaptionClient(url_of(server), retries=3, backoff=0.001, api_key=KEY) as client:
        with pytest.raises(AuthenticationError, match="the API key sent was refused") as caught:
            client.caption(b"img")
        per_item = client.caption_many([b"img"])[0]
    assert sent_keys(server) == [KEY, KEY]
    assert isinstance(per_item, AuthenticationError)
    no_key_anywhere(caught.value)
    no_key_anywhere(per_item)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("StatusCode.UNAUTHENTICATED", "missing credentials"),
        ("StatusCode.PERMISSION_DENIED", "denied"),
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
    ],
)
def test_authentication_statuses_are_typed_and_not_retried(status, message, monkeypatch):
    from tritonclient.utils import InferenceServerException

    calls = []

    class Refusing:
        def infer(self, *args, **kwargs):
            calls.append(1)
            raise InferenceServerException(message, status=status)

    client = CaptionClient("h:1", retries=3, backoff=0.001)
    monkeypatch.setattr(client, "_client", lambda: Refusing())
    with pytest.raises(AuthenticationError, match=message):
        client.caption(b"img")
    assert calls == [1]


def test_a_server_that_echoes_the_key_has_it_cut_out(servers):
    server = servers(FakeGrpcServer, error=(grpc.StatusCode.INTERNAL, f"no such key {KEY} here"))
    client = CaptionClient(server.address, api_key=KEY)
    with client, pytest.raises(CaptionError, match="no such key <hidden> here") as caught:
        client.caption(b"img")
    assert caught.value.__cause__ is None  # the original exception, which holds the key, is not chained
    no_key_anywhere(caught.value)


def test_the_key_is_not_in_any_repr(monkeypatch):
    client = CaptionClient("h:1", api_key=KEY)
    assert client.has_api_key
    assert repr(client) == "CaptionClient('grpc://h:1', model='caption', api_key=set)"
    assert KEY not in repr(vars(client))
    plugin = api._HeadersPlugin(GRPC_API_KEY_HEADER, client._api_key)
    assert KEY not in repr(plugin) and GRPC_API_KEY_HEADER in repr(plugin)
    assert repr(CaptionClient("http://h:1", api_key="")).endswith("api_key=none)")


def test_key_sources_and_their_errors(monkeypatch, tmp_path):
    assert read_api_key() is None and api_key_headers("grpc") == {}
    assert read_api_key(KEY) == KEY
    assert api_key_headers("grpc", KEY) == {"triton-grpc-protocol-ofa-api-key": KEY}
    assert api_key_headers("http", KEY) == {"ofa-api-key": KEY}
    monkeypatch.setenv("CAPTION_API_KEY", KEY)
    assert read_api_key() == KEY and read_api_key("other") == "other"
    monkeypatch.setenv("CAPTION_API_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ValueError, match="set CAPTION_API_KEY or CAPTION_API_KEY_FILE, not both"):
        read_api_key()
    monkeypatch.delenv("CAPTION_API_KEY")
    with pytest.raises(ValueError, match=f"CAPTION_API_KEY_FILE={tmp_path / 'key'}: No such file"):
        read_api_key()
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ValueError, match="non-empty"):
        read_api_key()
    for bad in (f"{KEY}\nX-Injected: 1", f"{KEY}\x00", f"{KEY}é"):
        with pytest.raises(ValueError, match="printable ASCII") as caught:
            CaptionClient("h:1", api_key=bad)
        assert KEY not in str(caught.value)


# -- TLS ---------------------------------------------------------------------------------------------------


def test_tls_settings_reach_tritonclient(monkeypatch, certs):
    import tritonclient.grpc
    import tritonclient.http

    made = {}

    class Recorder:
        def __init__(self, url, **kwargs):
            made["url"], made["kwargs"] = url, kwargs

        def register_plugin(self, plugin):
            made["plugin"] = plugin

    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", Recorder)
    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", Recorder)
    files = {"ca_cert": certs.ca, "client_cert": certs.client_cert, "client_key": certs.client_key}

    CaptionClient("h:8001", tls=True, **files)._client()
    assert made["url"] == "h:8001" and "plugin" not in made
    assert made["kwargs"].pop("channel_args")  # retries and reconnects (tests/serving/test_client_retries.py)
    assert made["kwargs"] == {
        "ssl": True,
        "root_certificates": str(certs.ca),
        "private_key": str(certs.client_key),
        "certificate_chain": str(certs.client_cert),
    }
    CaptionClient("https://h:443", api_key=KEY, **files)._client()
    assert made["url"] == "h:443" and made["kwargs"]["ssl"] is True
    assert made["kwargs"]["ssl_options"] == {
        "ca_certs": str(certs.ca),
        "certfile": str(certs.client_cert),
        "keyfile": str(certs.client_key),
    }
    request = type("Request", (), {"headers": {}})()
    made["plugin"](request)
    assert request.headers == {API_KEY_HEADER: KEY}
    made.clear()
    CaptionClient("grpcs://h:1", api_key=KEY)._client()
    assert made["kwargs"]["ssl"] is True and made["kwargs"]["root_certificates"] is None
    made["plugin"](request := type("Request", (), {"headers": {}})())
    assert request.headers == {GRPC_API_KEY_HEADER: KEY}
    CaptionClient("h:1")._client()
    assert made["kwargs"]["ssl"] is False


def test_contradictory_or_incomplete_tls_settings_are_refused(certs, tmp_path):
    with pytest.raises(ValueError, match="TLS settings: add tls=True"):
        CaptionClient("h:1", ca_cert=certs.ca)
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        CaptionClient("h:1", tls=True, client_cert=certs.client_cert)
    with pytest.raises(ValueError, match="ca_cert .*missing.pem: no such readable file"):
        CaptionClient("h:1", tls=True, ca_cert=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="contradicts the plain http:// URL"):
        CaptionClient("http://h:1", tls=True)
    assert CaptionClient("h:1", protocol="http", tls=True).ssl


def test_grpc_tls_with_a_ca_signed_certificate(servers, certs):
    server = servers(FakeGrpcServer, api_key=KEY, certificates=certs)
    with CaptionClient(server.address, tls=True, ca_cert=certs.ca, api_key=KEY) as client:
        assert client.caption(b"img") == Caption(CAPTION, SCORE)
        assert all(client.health(models=("caption",)).values())
    assert sent_keys(server) == [KEY]
    # A plain client, or one that trusts another CA, gets no answer.
    for options in ({}, {"tls": True, "ca_cert": certs.other_ca}):
        with CaptionClient(server.address, api_key=KEY, retries=0, timeout=10, **options) as client:
            with pytest.raises(ServerUnavailableError):
                client.caption(b"img")
            assert not client.health(models=())["live"]
    assert sent_keys(server) == [KEY]


def test_grpc_mutual_tls(servers, certs):
    server = servers(FakeGrpcServer, certificates=certs, mutual=True)
    client = CaptionClient(server.address, tls=True, ca_cert=certs.ca, retries=0, timeout=10)
    with client, pytest.raises(ServerUnavailableError):
        client.caption(b"img")  # no client certificate
    with CaptionClient(
        server.address,
        tls=True,
        ca_cert=certs.ca,
        client_cert=certs.client_cert,
        client_key=certs.client_key,
    ) as client:
        assert client.caption(b"img").text == CAPTION


def test_https_with_a_ca_signed_certificate(servers, certs):
    server = servers(FakeHttpServer, api_key=KEY, certificates=certs)
    with CaptionClient(f"https://{server.address}", ca_cert=certs.ca, api_key=KEY) as client:
        assert client.caption(b"img").text == CAPTION
    with CaptionClient(server.address, protocol="http", tls=True, ca_cert=certs.ca, api_key=KEY) as client:
        assert client.caption(b"img").text == CAPTION
    assert sent_keys(server) == [KEY, KEY]


# -- the command line and ofa_eval ---------------------------------------------------------------------------


def test_cli_key_and_tls_options_end_to_end(servers, certs, tmp_path, capsys, monkeypatch):
    server = servers(FakeGrpcServer, api_key=KEY, certificates=certs, mutual=True)
    (tmp_path / "a.png").write_bytes(b"img")
    tls = ["--tls", "--ca-cert", str(certs.ca), "--client-cert", str(certs.client_cert)]
    tls += ["--client-key", str(certs.client_key)]
    image = str(tmp_path / "a.png")

    assert cli.main(["caption", image, "--url", server.address, *tls, "--api-key", KEY]) == 0
    assert capsys.readouterr().out == f"{image}\t{CAPTION}\n"

    monkeypatch.setenv("CAPTION_API_KEY", KEY)
    assert cli.main(["caption", image, "--url", server.address, *tls]) == 0
    monkeypatch.delenv("CAPTION_API_KEY")

    assert cli.main(["caption", image, "--url", server.address, *tls, "--json"]) == 1
    out, err = capsys.readouterr()
    assert '"error_type": "AuthenticationError"' in out.splitlines()[-1]
    assert "no API key was sent" in err

    assert cli.main(["caption", image, "--url", server.address, *tls, "--api-key", "wrong-" + KEY]) == 1
    out, err = capsys.readouterr()
    assert "the API key sent was refused" in err and KEY not in out + err

    assert cli.main(["health", "--url", server.address, *tls]) == 0  # health needs no key
    assert cli.main(["caption", image, "--url", server.address, "--ca-cert", str(certs.ca)]) == 2
    assert "add tls=True (--tls)" in capsys.readouterr().err
    assert sent_keys(server) == [KEY, KEY, None, "wrong-" + KEY]


def test_ofa_eval_served_mode_passes_the_key_and_tls(servers, certs, tmp_path, monkeypatch):
    from ofa_eval.dataset import Sample
    from ofa_eval.predict import ServedPredictor

    server = servers(FakeGrpcServer, api_key=KEY, certificates=certs)
    (tmp_path / "a.png").write_bytes(b"img")
    samples = [Sample(1, tmp_path / "a.png", ("a cat",))]
    predictor = ServedPredictor(server.address, api_key=KEY, tls=True, ca_cert=str(certs.ca))
    assert [p.caption for p in predictor.predict(samples)] == [CAPTION]
    predictor.close()
    monkeypatch.setenv("CAPTION_API_KEY", KEY)  # the default, as for the client
    predictor = ServedPredictor(server.address, tls=True, ca_cert=str(certs.ca))
    assert [p.caption for p in predictor.predict(samples)] == [CAPTION]
    assert KEY not in repr(predictor.describe())
    predictor.close()
    assert sent_keys(server) == [KEY, KEY]


# -- load tools that call tritonclient directly ------------------------------------------------------------


def test_with_api_key_registers_the_key_on_a_tritonclient_client(servers, monkeypatch):
    import tritonclient.grpc as grpcclient

    from client import with_api_key
    from load_tests.reliabilitylib import caption_inputs, fire

    server = servers(FakeGrpcServer, api_key=KEY)
    plain = grpcclient.InferenceServerClient(server.address)
    assert with_api_key(plain, "grpc") is plain and plain.plugin() is None  # no key anywhere: unchanged
    plain.close()
    # The burst tools (reliabilitylib.fire) read $CAPTION_API_KEY through with_api_key.
    requests = [caption_inputs(grpcclient, [b"img"]) for _ in range(2)]
    assert [o.status for o in fire(server.address, requests, timeout_s=30)] == ["StatusCode.UNAVAILABLE"] * 2
    monkeypatch.setenv("CAPTION_API_KEY", KEY)
    assert [o.status for o in fire(server.address, requests, timeout_s=30)] == ["OK", "OK"]
    assert sent_keys(server) == [None, None, KEY, KEY]
    assert KEY not in repr(with_api_key(grpcclient.InferenceServerClient(server.address), "grpc").plugin())
