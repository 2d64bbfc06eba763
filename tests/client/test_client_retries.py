"""CaptionClient's retries without a real server: which failures are retried (the answers Triton 2.51 gives in each
transient case, measured against a real server: see docs/serving.md), the deadline, the backoff, ``retries=0``,
the counter and its log line, gRPC's channel arguments; against stand-ins where the wire matters (a closed port,
the in-process gRPC and HTTP servers of fake_caption_servers.py)."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import ssl
import threading
import time

import grpc
import pytest
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException

from client import api, cli
from client.api import (
    AuthenticationError,
    Caption,
    CaptionClient,
    CaptionError,
    CaptionTimeoutError,
    InvalidInputError,
    ServerUnavailableError,
)

from .fake_caption_servers import CAPTION, CAPTION_ANSWER, GRPC_HEADER, FakeGrpcServer, reply_json

KEY = "retry-test-key-0123456789"
STUB_DEAD = "in ensemble 'caption', Stub process 'ofa_0_0' is not healthy."
RELOADING = "Request for unknown model: 'caption' has no available versions"
QUEUE_FULL = "in ensemble 'caption', [request id: <id_unknown>] Exceeds maximum queue size"
REFUSED_GRPC = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote "
    "host: Connection refused"
)

#: What each transient case looks like to the client (tritonclient's exception), as measured against Triton 2.51.
TRANSIENT = {
    "server down, gRPC": InferenceServerException(REFUSED_GRPC, status="StatusCode.UNAVAILABLE"),
    "server down, HTTP": ConnectionRefusedError(111, "Connection refused"),
    "server killed under the request, gRPC": InferenceServerException(
        "Stream removed (Socket closed)", status="StatusCode.UNAVAILABLE"
    ),
    "server closed the connection, HTTP": HTTPConnectionClosed("connection closed."),
    "connection reset": ConnectionResetError(104, "Connection reset by peer"),
    "stub dead, gRPC": InferenceServerException(STUB_DEAD, status="StatusCode.INTERNAL"),
    "stub dead, HTTP": InferenceServerException(STUB_DEAD, status="500"),
    "model being reloaded, gRPC": InferenceServerException(RELOADING, status="StatusCode.NOT_FOUND"),
    "model being reloaded, HTTP": InferenceServerException(RELOADING, status="404"),
    "stopping, gRPC": InferenceServerException(
        "Server is stopping, scheduler for model has stopped accepting new inference requests",
        status="StatusCode.UNAVAILABLE",
    ),
    "queue full, gRPC": InferenceServerException(QUEUE_FULL, status="StatusCode.UNAVAILABLE"),
    "queue full, HTTP": InferenceServerException(QUEUE_FULL, status="503"),
    "proxy before a restarting server, HTTP": InferenceServerException("Bad Gateway", status="502"),
}

#: Failures that the same request cannot cure: sent once.
FINAL = {
    "bad image, gRPC": (
        InferenceServerException(
            "in ensemble 'caption', not a decodable image", "StatusCode.INVALID_ARGUMENT"
        ),
        InvalidInputError,
    ),
    "bad image, HTTP": (InferenceServerException("not a decodable image", status="400"), InvalidInputError),
    "unknown model": (
        InferenceServerException("Request for unknown model: 'nosuch' is not found", "StatusCode.NOT_FOUND"),
        CaptionError,
    ),
    "engine error": (
        InferenceServerException(
            "in ensemble 'caption', engine failed (id 3f2a)", status="StatusCode.INTERNAL"
        ),
        CaptionError,
    ),
    "timeout": (
        InferenceServerException("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"),
        CaptionTimeoutError,
    ),
    "key refused, gRPC": (
        InferenceServerException(
            f"This protocol is restricted, expecting header '{GRPC_HEADER}'", "StatusCode.UNAVAILABLE"
        ),
        AuthenticationError,
    ),
    "key refused, HTTP": (InferenceServerException("restricted", status="403"), AuthenticationError),
    "TLS, gRPC": (
        InferenceServerException(
            "failed to connect to all addresses; last error: UNKNOWN: Ssl handshake failed: CERTIFICATE_VERIFY_FAILED",
            "StatusCode.UNAVAILABLE",
        ),
        ServerUnavailableError,
    ),
    "TLS, HTTP": (ssl.SSLCertVerificationError(1, "certificate verify failed"), ServerUnavailableError),
}


class FakeResult:
    def as_numpy(self, name):
        import numpy as np

        return {"caption": np.array([[b"a cat"]], dtype=object), "score": np.array([[-0.5]], np.float32)}[
            name
        ]


class Flaky:
    """A tritonclient client that raises ``failures`` one per call, then answers; records each call's timeout."""

    def __init__(self, failures, delay: float = 0.0):
        self.failures = list(failures)
        self.delay = delay
        self.timeouts: list[float | None] = []

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        self.timeouts.append(client_timeout)
        time.sleep(self.delay)
        if self.failures:
            raise self.failures.pop(0)
        return FakeResult()

    def close(self):
        pass


def flaky_client(monkeypatch, failures, **options) -> tuple[CaptionClient, Flaky, list[float]]:
    """A CaptionClient over a :class:`Flaky` (one per connection: a retry must make a new one), and its waits."""
    fake = Flaky(failures)
    options = {"backoff": 0.01, **options}
    client = CaptionClient("h:1", **options)
    made = []

    def connect():
        if getattr(client._local, "client", None) is None:
            client._local.client = fake
            made.append(fake)
        return client._local.client

    waits: list[float] = []
    monkeypatch.setattr(client, "_client", connect)
    monkeypatch.setattr(api, "_sleep", waits.append)
    client.made = made  # type: ignore[attr-defined]
    return client, fake, waits


@pytest.mark.parametrize("failure", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_each_transient_failure_is_retried_on_a_new_connection_then_succeeds(monkeypatch, failure):
    client, fake, waits = flaky_client(monkeypatch, [failure, failure])
    assert client.caption(b"img") == Caption("a cat", -0.5)
    assert len(fake.timeouts) == 3 and len(waits) == 2
    assert client.retry_count == 2
    assert len(client.made) == 3  # the connection is dropped before each retry


@pytest.mark.parametrize(("failure", "kind"), FINAL.values(), ids=FINAL.keys())
def test_a_failure_the_request_cannot_cure_is_sent_once(monkeypatch, failure, kind):
    client, fake, waits = flaky_client(monkeypatch, [failure] * 3, retries=5)
    with pytest.raises(kind) as raised:
        client.caption(b"img")
    assert type(raised.value) is kind and not raised.value.transient
    assert len(fake.timeouts) == 1 and waits == [] and client.retry_count == 0
    assert raised.value.retries == 0


def test_retries_bound_the_attempts_and_the_error_says_so(monkeypatch):
    failure = TRANSIENT["stub dead, gRPC"]
    client, fake, _ = flaky_client(monkeypatch, [failure] * 10, retries=3)
    with pytest.raises(ServerUnavailableError, match=r"not healthy\. \(gave up after 3 retries in") as raised:
        client.caption(b"img")
    assert (
        len(fake.timeouts) == 4 and raised.value.retries == 3 and raised.value.status == "StatusCode.INTERNAL"
    )


def test_retries_zero_sends_once_and_turns_grpc_retries_off(monkeypatch):
    client, fake, waits = flaky_client(monkeypatch, [TRANSIENT["server down, gRPC"]], retries=0)
    with pytest.raises(ServerUnavailableError) as raised:
        client.caption(b"img")
    assert len(fake.timeouts) == 1 and waits == [] and client.retry_count == 0
    assert "gave up" not in str(raised.value)
    args = dict(CaptionClient("h:1", retries=0, grpc_retry_policy=True).grpc_channel_args())
    assert args["grpc.enable_retries"] == 0 and "grpc.service_config" not in args


def test_the_waits_grow_exponentially_with_full_jitter_up_to_the_cap(monkeypatch):
    draws = []

    def uniform(low, high):
        draws.append((low, high))
        return high * 0.75

    monkeypatch.setattr(api.random, "uniform", uniform)
    failures = [TRANSIENT["queue full, gRPC"]] * 6
    client, _, waits = flaky_client(monkeypatch, failures, backoff=0.5, max_backoff=4.0)
    client.caption(b"img")
    assert draws == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 4.0), (0.0, 4.0)]
    assert waits == [0.375, 0.75, 1.5, 3.0, 3.0, 3.0]


def test_each_attempt_is_cut_to_what_is_left_of_the_deadline(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(api, "_clock", lambda: now[0])
    failures = [TRANSIENT["stub dead, gRPC"]] * 50
    client, fake, waits = flaky_client(
        monkeypatch, failures, timeout=120, deadline=10, backoff=1.0, max_backoff=2
    )
    monkeypatch.setattr(api, "_sleep", lambda s: (waits.append(s), now.__setitem__(0, now[0] + s)))
    with pytest.raises(ServerUnavailableError, match="gave up after"):
        client.caption(b"img")
    assert fake.timeouts[0] == 10  # not the 120 s timeout: the deadline
    assert all(t <= 10 - sum(waits[:i]) + 1e-9 for i, t in enumerate(fake.timeouts))
    assert sum(waits) < 10  # no wait that ends past the deadline


def test_the_default_deadline_rides_out_a_restart_and_keeps_a_long_timeout():
    assert CaptionClient("h:1", timeout=10).deadline == api.DEFAULT_DEADLINE >= 60
    # a slow single answer is still allowed its whole timeout (120 s by default)
    assert CaptionClient("h:1").deadline == 120 and CaptionClient("h:1", timeout=300).deadline == 300
    assert CaptionClient("h:1", deadline=5).deadline == 5
    assert CaptionClient("h:1").retries == api.DEFAULT_RETRIES
    # the waits the default retries may make add up to more than the deadline: the deadline ends the retrying
    waits = [min(api.MAX_BACKOFF, 0.5 * 2**n) / 2 for n in range(api.DEFAULT_RETRIES)]  # mean of each draw
    assert sum(waits) > api.DEFAULT_DEADLINE / 2
    with pytest.raises(ValueError):
        CaptionClient("h:1", retries=-1)
    with pytest.raises(ValueError):
        CaptionClient("h:1", deadline=0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_that_stays_down_fails_within_the_deadline(protocol):
    """Real tritonclient against a closed port: refused again and again, retried until the deadline."""
    deadline, cap = 2.0, 0.4
    client = CaptionClient(
        f"127.0.0.1:{closed_port()}", protocol, deadline=deadline, backoff=0.05, max_backoff=cap
    )
    start = time.monotonic()
    with client, pytest.raises(ServerUnavailableError, match="gave up after") as raised:
        client.caption(b"img")
    took = time.monotonic() - start
    assert deadline - cap - 0.5 <= took <= deadline + cap, took  # kept trying, stopped in time
    assert client.retry_count == raised.value.retries >= 3


def test_the_counter_is_shared_by_threads(monkeypatch):
    client = CaptionClient("h:1", backoff=0.001)
    monkeypatch.setattr(api, "_sleep", lambda s: None)
    shared = Flaky([TRANSIENT["queue full, HTTP"]] * 40)
    lock = threading.Lock()

    class Locked:
        def infer(self, *args, **kwargs):
            time.sleep(0.001)  # let the threads interleave
            with lock:
                return shared.infer(*args, **kwargs)

    monkeypatch.setattr(client, "_client", Locked)
    results = client.caption_many([b"a", b"b", b"c", b"d"] * 4, concurrency=8)
    assert results == [Caption("a cat", -0.5)] * 16
    assert client.retry_count == 40  # each of the 40 refusals, in whichever thread, retried once


def test_each_retry_is_logged_at_debug_without_the_key(monkeypatch, caplog):
    failures = [InferenceServerException(f"stub process 'ofa_0_0' is not healthy (key {KEY})", "500")] * 2
    client, _, _ = flaky_client(monkeypatch, failures, api_key=KEY)
    with caplog.at_level(logging.DEBUG, logger="client"):
        client.caption(b"img")
    lines = [r.getMessage() for r in caplog.records if r.name == "client"]
    assert len(lines) == 2 and all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "client")
    assert lines[0].startswith("retry 1 of at most 50") and "ServerUnavailableError" in lines[0]
    assert "<hidden>" in lines[0]
    assert not [line for line in caplog.text.splitlines() if KEY in line]


def test_grpc_channel_args_keep_tritonclients_defaults_and_reconnect_fast():
    import tritonclient.grpc as tc

    args = dict(CaptionClient("h:1").grpc_channel_args())
    assert args["grpc.max_send_message_length"] == tc.MAX_GRPC_MESSAGE_SIZE
    assert args["grpc.max_receive_message_length"] == tc.MAX_GRPC_MESSAGE_SIZE
    assert args["grpc.keepalive_timeout_ms"] == tc.KeepAliveOptions().keepalive_timeout_ms
    assert args["grpc.enable_retries"] == 1  # transparent retries of requests that never reached the server
    assert args["grpc.max_reconnect_backoff_ms"] <= 2000
    assert "grpc.service_config" not in args
    config = json.loads(
        dict(CaptionClient("h:1", grpc_retry_policy=True).grpc_channel_args())["grpc.service_config"]
    )
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == api.GRPC_POLICY_ATTEMPTS
    assert method["name"] == [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}]


class FlakyGrpcServer(FakeGrpcServer):
    """The gRPC stand-in, failing its first inferences with ``errors`` (StatusCode, message), one each."""

    def __init__(self, errors, **kwargs):
        self.errors = list(errors)
        super().__init__(**kwargs)

    @property
    def error(self):
        call = len(self.infer_metadata) - 1  # the fake records each inference before it looks at the error
        return self.errors[call] if call < len(self.errors) else None

    @error.setter
    def error(self, value):
        pass


@pytest.fixture
def grpc_servers():
    started = []

    def start(*args, **kwargs):
        started.append(FlakyGrpcServer(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_over_grpc_a_dead_stub_and_a_full_queue_are_retried(grpc_servers):
    server = grpc_servers(
        [
            (grpc.StatusCode.INTERNAL, STUB_DEAD),
            (grpc.StatusCode.UNAVAILABLE, QUEUE_FULL),
            (grpc.StatusCode.NOT_FOUND, RELOADING),
        ]
    )
    with CaptionClient(server.address, backoff=0.01) as client:
        assert client.caption(b"img").text == CAPTION
    assert len(server.infer_metadata) == 4 and client.retry_count == 3


def test_grpcs_own_policy_is_honoured_by_tritonclient_and_resends_unavailable(grpc_servers):
    """tritonclient passes channel_args to the channel: with the policy gRPC itself resends an UNAVAILABLE (not
    seen by the client's loop), which is why it stays off by default: Triton refuses a key with UNAVAILABLE too."""
    server = grpc_servers([(grpc.StatusCode.UNAVAILABLE, QUEUE_FULL)] * 2)
    with CaptionClient(server.address, backoff=0.01, grpc_retry_policy=True) as client:
        assert client.caption(b"img").text == CAPTION
    assert len(server.infer_metadata) == 3 and client.retry_count == 0
    refusing = grpc_servers([], api_key=KEY)
    with (
        CaptionClient(refusing.address, grpc_retry_policy=True) as client,
        pytest.raises(AuthenticationError),
    ):
        client.caption(b"img")
    assert len(refusing.infer_metadata) == api.GRPC_POLICY_ATTEMPTS  # resent by gRPC: the reason it is opt-in
    with CaptionClient(refusing.address) as client, pytest.raises(AuthenticationError):
        client.caption(b"img")
    assert len(refusing.infer_metadata) == api.GRPC_POLICY_ATTEMPTS + 1  # default: sent once


class TritonLikeHttp:
    """HTTP stand-in answering inferences with ``answers`` (status, error message) first, then a caption."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.calls += 1
                if owner.answers:
                    status, message = owner.answers.pop(0)
                    reply_json(self, status, {"error": message})
                else:
                    reply_json(self, 200, CAPTION_ANSWER)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_over_http_503_a_dead_stub_and_a_reload_are_retried_and_a_bad_image_is_not():
    server = TritonLikeHttp([(503, QUEUE_FULL), (500, STUB_DEAD), (404, RELOADING)])
    try:
        with CaptionClient(server.url, backoff=0.01) as client:
            assert client.caption(b"img").text == CAPTION
            assert server.calls == 4 and client.retry_count == 3
            server.answers = [(400, "not a decodable image")] * 2
            with pytest.raises(InvalidInputError, match="not a decodable image"):
                client.caption(b"img")
            assert server.calls == 5 and client.retry_count == 3
    finally:
        server.close()


def test_http_attempts_get_socket_timeouts_cut_to_the_deadline(monkeypatch):
    import tritonclient.http

    made, now = [], [100.0]
    monkeypatch.setattr(api, "_clock", lambda: now[0])
    monkeypatch.setattr(api, "_sleep", lambda s: now.__setitem__(0, now[0] + s))

    class Recorder:
        def __init__(self, url, **kwargs):
            made.append(kwargs["network_timeout"])
            self.failures = [ConnectionRefusedError(111, "refused")] if len(made) == 1 else []

        def infer(self, *args, **kwargs):
            if self.failures:
                now[0] += 5.0  # the failed attempt took 5 s
                raise self.failures.pop()
            return FakeResult()

        def close(self):
            pass

    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", Recorder)
    client = CaptionClient("http://h:1", timeout=120, deadline=30, backoff=0.01)
    client.caption(b"img")
    client.caption(b"img")
    assert (
        made[0] == pytest.approx(30) and 24.9 < made[1] <= 25
    )  # the retry's connection: what was left of the deadline
    assert made[2] == pytest.approx(30)  # the next call gets its whole deadline again
    client.caption(b"img")
    assert len(made) == 3  # and keeps that connection


def test_cli_passes_retries_and_deadline_and_reports_retries(tmp_path, monkeypatch, capsys):
    seen = {}

    class Recording:
        retry_count = 2

        def __init__(self, url, protocol, **options):
            seen.update(options)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def imap(self, sources, **kwargs):
            return iter([Caption("a cat", -0.5) for _ in sources])

    monkeypatch.setattr(cli, "CaptionClient", Recording)
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert cli.main(["caption", str(tmp_path / "a.jpg"), "--retries", "4", "--deadline", "9.5"]) == 0
    assert seen["retries"] == 4 and seen["deadline"] == 9.5
    assert "2 retries after transient failures" in capsys.readouterr().err
    assert cli.main(["caption", str(tmp_path / "a.jpg")]) == 0
    assert seen["retries"] == api.DEFAULT_RETRIES and seen["deadline"] is None


class SharedFlaky:
    """Stands in for ``tritonclient.grpc.InferenceServerClient``: ``failures`` shared by every connection."""

    failures: list[Exception] = []

    def __init__(self, url, **kwargs):
        pass

    def register_plugin(self, plugin):
        pass

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        if SharedFlaky.failures:
            raise SharedFlaky.failures.pop(0)
        return FakeResult()

    def close(self):
        pass


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_says_it_is_retrying_once_or_with_v_each_time(tmp_path, monkeypatch, capsys, verbose):
    import tritonclient.grpc

    monkeypatch.setattr(SharedFlaky, "failures", [TRANSIENT["server down, gRPC"]] * 3)
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", SharedFlaky)
    monkeypatch.setattr(api, "_sleep", lambda s: None)
    logger = logging.getLogger("client")
    before = (logger.level, list(logger.handlers))
    (tmp_path / "a.jpg").write_bytes(b"x")
    argv = ["caption", str(tmp_path / "a.jpg"), "--url", "h:1", *(["-v"] if verbose else [])]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if line.startswith("retrying after a transient failure")]
    each = [line for line in err.splitlines() if line.startswith("client: retry ")]
    assert (len(notices), len(each)) == ((0, 3) if verbose else (1, 0)), err
    assert "3 retries after transient failures" in err
    assert (logger.level, list(logger.handlers)) == before
