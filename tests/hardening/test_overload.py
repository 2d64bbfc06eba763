"""Overload: past capacity the queue policy refuses requests at once (UNAVAILABLE) instead of queueing them without
bound; accepted requests complete; ``CaptionClient`` retries refused requests with backoff (issue 5, hardening).

The committed policy (64 waiting per model, 60 s queue timeout) is checked as text; the burst runs against the
``queue_server`` fixture, a copy of the repository with fewer requests allowed to wait (``ofa`` 4, ``preprocess``
8, nothing else changed), so that 56 requests overflow it within seconds on 2 CPU cores. ``make burst``
(load_tests/burst.py) does the same against the committed values.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from client import Caption, CaptionClient
from load_tests.reliabilitylib import caption_inputs, fire
from ofa_serving.launcher import default_model_repository

from .conftest import (
    FAST,
    SMALL_QUEUES,
    fresh_seed,
    model_metric,
    models_ready,
    png,
    stub_pid_by_model,
    wait_until_preprocessed,
)

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = "StatusCode.UNAVAILABLE"
QUEUE_FULL = "Exceeds maximum queue size"
QUEUE_TIMEOUT = "Request timeout expired"
RAW_REQUESTS = 48  # fired at once without retries
RETRYING_CLIENTS = 8  # half gRPC, half HTTP; CaptionClient with retries
COMMITTED_POLICY = {
    "max_queue_size": "64",
    "timeout_action": "REJECT",
    "default_timeout_microseconds": "60000000",
    "allow_timeout_override": "true",
}


def queue_policy(model: str, repository: Path | None = None) -> dict[str, str]:
    """The ``default_queue_policy`` fields of ``model``'s config.pbtxt (comments stripped)."""
    text = ((repository or default_model_repository()) / model / "config.pbtxt").read_text()
    text = re.sub(r"#.*", "", text)
    match = re.search(r"dynamic_batching\s*{(?:[^{}]|{[^{}]*})*default_queue_policy\s*{([^}]*)}", text)
    assert match, f"{model}/config.pbtxt has no default_queue_policy inside dynamic_batching"
    return dict(re.findall(r"(\w+)\s*:\s*(\S+)", match.group(1)))


@pytest.mark.parametrize("model", ["preprocess", "ofa"])
def test_the_committed_queue_policy(model):
    assert queue_policy(model) == COMMITTED_POLICY


def test_the_policy_fits_the_load_tests_and_the_client():
    """16-user load tests never fill a 64-request queue; the client waits longer than the queue timeout."""
    steps = re.search(r"^LOAD_STEPS \?= ([\d,]+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert steps, "LOAD_STEPS default not found in the Makefile"
    max_users = max(int(n) for n in steps.group(1).split(","))
    for model in ("preprocess", "ofa"):
        assert max_users <= int(queue_policy(model)["max_queue_size"])
    timeout_s = int(COMMITTED_POLICY["default_timeout_microseconds"]) / 1e6
    assert CaptionClient().timeout > timeout_s, (
        "the server must refuse a request before the client gives up on it"
    )


@pytest.mark.integration
def test_the_burst_server_differs_from_the_committed_repository_only_in_queue_sizes(queue_server):
    copy = queue_server.repository
    for model in ("caption", "preprocess", "ofa"):
        committed = (default_model_repository() / model / "config.pbtxt").read_text().splitlines()
        changed = (copy / model / "config.pbtxt").read_text().splitlines()
        diff = [(a, b) for a, b in zip(committed, changed, strict=True) if a != b]
        if model in SMALL_QUEUES:
            assert diff == [
                (
                    f"    max_queue_size: {COMMITTED_POLICY['max_queue_size']}",
                    f"    max_queue_size: {SMALL_QUEUES[model]}",
                )
            ]
        else:
            assert diff == []


@pytest.fixture(scope="module")
def burst(queue_server):
    """Behind a slow batch in ``ofa``, 48 raw requests at once and, as soon as they fill the queues, 8 retrying
    CaptionClients (4 gRPC, 4 HTTP), all distinct images.

    Every attempt the clients make is recorded (when it was sent, protocol, status) by wrapping tritonclient's
    ``infer``.
    """
    server = queue_server.get()
    before = {"stubs": stub_pid_by_model(server)}
    seed = fresh_seed()
    # `ofa` first starts one slow batch (16 images at the checkpoint's default settings, seconds on CPU); the burst
    # arrives while it runs, so 4 raw requests wait in `ofa`'s queue until it ends and the clients' first attempts
    # meet a full queue. Without it the queues were full only for moments: CI runs saw all 4 HTTP clients (another
    # all 4 gRPC clients) reach a queue with room at their first attempt, unrefused.
    slow = caption_inputs(grpcclient, [png(44 + i % 5, 33 + i % 3, seed=seed + 500 + i) for i in range(16)])
    raw = [
        caption_inputs(grpcclient, [png(40 + i % 9, 30 + i % 7, seed=seed + i)]) for i in range(RAW_REQUESTS)
    ]
    client_images = [png(50, 40, seed=seed + 1000 + i) for i in range(RETRYING_CLIENTS)]

    attempts: list[tuple[int, str, float, str]] = []  # (client index, protocol, sent at, "OK" | status)
    lock = threading.Lock()
    local = threading.local()

    def recording(module, protocol):
        original = module.InferenceServerClient.infer

        def infer(self, *args, **kwargs):
            sent = time.monotonic()
            try:
                result = original(self, *args, **kwargs)
            except Exception as exc:
                status = str(exc.status()) if hasattr(exc, "status") else type(exc).__name__
                with lock:
                    attempts.append((local.index, protocol, sent, f"{status} {exc}"))
                raise
            with lock:
                attempts.append((local.index, protocol, sent, "OK"))
            return result

        return original, infer

    patches = [(m, *recording(m, p)) for m, p in ((grpcclient, "grpc"), (httpclient, "http"))]
    client_results: list[Caption | BaseException | None] = [None] * RETRYING_CLIENTS

    # The clients start once the burst has filled the queues (its first refusal), not after a fixed delay: on a
    # busy machine the burst's own requests can arrive after the clients' first attempts.
    queue_full = threading.Event()

    def watch(outcome) -> None:
        if QUEUE_FULL in outcome.message:
            queue_full.set()

    def retrying(index: int) -> None:
        local.index = index
        protocol = "grpc" if index % 2 == 0 else "http"
        url = f"grpc://{server.grpc_address}" if protocol == "grpc" else server.http_url
        with CaptionClient(url, protocol=protocol, backoff=0.25, timeout=300) as client:
            queue_full.wait(timeout=120)
            try:
                client_results[index] = client.caption(client_images[index], **FAST)
            except Exception as exc:  # noqa: BLE001 - asserted below
                client_results[index] = exc

    slow_result: list = []
    slowly = threading.Thread(
        target=lambda: slow_result.extend(fire(server.grpc_address, [slow], timeout_s=300))
    )
    preprocessed = model_metric(server, "nv_inference_request_success", "preprocess", settled=True)
    slowly.start()
    wait_until_preprocessed(server, preprocessed, 1, timeout=120, poll=0.02)  # the slow batch reached ofa
    for module, _original, wrapped in patches:
        module.InferenceServerClient.infer = wrapped
    try:
        raw_result: list = []
        firing = threading.Thread(
            target=lambda: raw_result.extend(fire(server.grpc_address, raw, timeout_s=300, on_outcome=watch))
        )
        start = time.monotonic()
        firing.start()
        threads = [threading.Thread(target=retrying, args=(i,)) for i in range(RETRYING_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=400)
        firing.join(timeout=400)
        slowly.join(timeout=400)
    finally:
        for module, original, _wrapped in patches:
            module.InferenceServerClient.infer = original
    return {
        "server": server,
        "raw": raw_result,
        "slow": slow_result,
        "clients": client_results,
        "attempts": [(i, p, t - start, s) for i, p, t, s in attempts],
        "before": before,
        "after": {"stubs": stub_pid_by_model(server), "ready": models_ready(server)},
    }


@pytest.mark.integration
def test_past_capacity_requests_are_refused_at_once(burst):
    outcomes = burst["raw"]
    assert len(outcomes) == RAW_REQUESTS
    refused = [o for o in outcomes if o.status == UNAVAILABLE and QUEUE_FULL in o.message]
    answered = [o for o in outcomes if o.ok]
    timed_out = [o for o in outcomes if o.status == UNAVAILABLE and QUEUE_TIMEOUT in o.message]
    other = [o for o in outcomes if o not in refused and o not in answered and o not in timed_out]
    print(
        f"\n{len(answered)} answered, {len(refused)} refused (queue full), {len(timed_out)} timed out in the queue; "
        f"refusal latency p50 {statistics.median(o.latency_s for o in refused) if refused else 0:.3f} s "
        f"max {max((o.latency_s for o in refused), default=0):.3f} s; answered in "
        f"{min((o.latency_s for o in answered), default=0):.1f}-{max((o.latency_s for o in answered), default=0):.1f} s"
    )
    assert not other, f"only captions and UNAVAILABLE refusals expected: {other[:3]}"
    assert refused, "nothing was refused: the burst did not overflow the queues"
    assert answered, "nothing was accepted"
    # fast: refused on arrival at a full queue, long before an accepted request's caption comes back
    assert statistics.median(o.latency_s for o in refused) < 1.0
    assert max(o.latency_s for o in refused) < min(o.latency_s for o in answered)
    # (queue timeouts: test_a_request_past_its_queue_timeout_is_refused_unexecuted)


@pytest.mark.integration
def test_a_request_past_its_queue_timeout_is_refused_unexecuted(queue_server):
    """The queue timeout bounds every wait: requests asking for 0.3 s (KServe ``timeout``; the models allow
    overriding the 60 s default) wait behind a slow batch in ``ofa`` and are refused with "Request timeout
    expired" once it ends, after at least their timeout and before the slow requests' captions."""
    server = queue_server.get()
    seed = fresh_seed()
    preprocessed = model_metric(server, "nv_inference_request_success", "preprocess", settled=True)
    slow: list = []
    firing = threading.Thread(
        target=lambda: slow.extend(
            fire(
                server.grpc_address,
                # 2 requests of 4 images: an 8-image batch of seconds, far longer than the 0.3 s timeouts
                [
                    caption_inputs(grpcclient, [png(46, 35, seed + 4 * i + j) for j in range(4)])
                    for i in range(2)
                ],
            )
        )
    )
    firing.start()
    wait_until_preprocessed(server, preprocessed, 2, timeout=120, poll=0.02)  # the slow pair reached ofa
    timed = fire(
        server.grpc_address,
        [caption_inputs(grpcclient, [png(46, 35, seed + 10 + i)], **FAST) for i in range(3)],
        queue_timeout_us=300_000,
    )
    firing.join(timeout=600)
    print(f"\nqueue timeout 0.3 s: {[(o.status, round(o.latency_s, 2)) for o in timed]}; slow: {slow}")
    assert [o.status for o in slow] == ["OK", "OK"]
    assert timed and all(o.status == UNAVAILABLE and QUEUE_TIMEOUT in o.message for o in timed), timed
    assert all(o.latency_s >= 0.3 for o in timed)


@pytest.mark.integration
def test_the_client_retries_refused_requests_with_backoff_and_gets_its_caption(burst):
    assert all(isinstance(r, Caption) for r in burst["clients"]), burst["clients"]
    attempts = burst["attempts"]
    refused = [a for a in attempts if QUEUE_FULL in a[3]]
    print(
        f"\nattempts (client, protocol, sent at s, refused): {[(i, p, round(t, 3), s != 'OK') for i, p, t, s in attempts]}"
    )
    assert {p for _i, p, _t, _s in refused} == {"grpc", "http"}, (
        f"both protocols refused at least once: {attempts}"
    )
    assert any(s.startswith("503 ") for *_, s in refused) and any(
        s.startswith(UNAVAILABLE) for *_, s in refused
    )
    all_gaps = []
    for index in range(RETRYING_CLIENTS):
        mine = sorted((t, s) for i, _p, t, s in attempts if i == index)
        assert mine[-1][1] == "OK" and all(QUEUE_FULL in s for _t, s in mine[:-1]), mine
        all_gaps += [b[0] - a[0] for a, b in zip(mine, mine[1:], strict=False)]
    # Full jitter: the k-th wait is drawn from [0, min(2 s, 0.25 s x 2^k)), so a single gap may be short, but
    # together they are not a hot loop against a full queue.
    assert all_gaps and statistics.median(all_gaps) >= 0.05, all_gaps


@pytest.mark.integration
def test_the_server_is_unharmed_by_the_burst(burst):
    assert burst["after"]["ready"] == dict.fromkeys(["server", "caption", "preprocess", "ofa"], True)
    assert burst["after"]["stubs"] == burst["before"]["stubs"]
    assert [o.status for o in burst["slow"]] == ["OK"]
