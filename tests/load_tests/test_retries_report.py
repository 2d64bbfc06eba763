"""The load tools report CaptionClient's retries apart from failures (no server: tritonclient stand-ins)."""

from __future__ import annotations

import argparse
import logging
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc
from tritonclient.utils import InferenceServerException

import client as client_package
from client import CaptionClient, InvalidInputError, api
from load_tests import burst, soak
from load_tests.reliabilitylib import ClientRetries, format_retries, retry_cause

QUEUE_FULL = "in ensemble 'caption', [request id: <id_unknown>] Exceeds maximum queue size"
STUB_DEAD = "in ensemble 'caption', Stub process 'ofa_0_0' is not healthy."


class Answer:
    def as_numpy(self, name):
        return {"caption": np.array([[b"a cat"]], dtype=object), "score": np.array([[-0.5]], np.float32)}[
            name
        ]


class RefusingFirst:
    """Stands in for ``tritonclient.grpc.InferenceServerClient``: the first ``failures`` inferences (all
    connections together) fail with the given errors, the rest are answered."""

    failures: list[Exception] = []
    lock = threading.Lock()

    def __init__(self, url, **kwargs):
        pass

    def register_plugin(self, plugin):
        pass

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        with RefusingFirst.lock:
            failure = RefusingFirst.failures.pop(0) if RefusingFirst.failures else None
        if failure is not None:
            raise failure
        return Answer()

    def close(self):
        pass


def test_retries_are_counted_by_cause_and_the_logger_is_restored(monkeypatch):
    logger = logging.getLogger("client")
    level, propagate = logger.level, logger.propagate
    failures = [
        InferenceServerException(QUEUE_FULL, status="StatusCode.UNAVAILABLE"),
        InferenceServerException(STUB_DEAD, status="StatusCode.INTERNAL"),
        InferenceServerException(QUEUE_FULL, status="StatusCode.UNAVAILABLE"),
    ]
    monkeypatch.setattr(RefusingFirst, "failures", failures)
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", RefusingFirst)
    monkeypatch.setattr(api, "_sleep", lambda s: None)
    with ClientRetries() as retried, CaptionClient("h:1") as client:
        client.caption(b"img")
    assert retried.total == client.retry_count == 3
    assert retried.summary() == {
        "total": 3,
        "by_cause": {
            "ServerUnavailableError: in ensemble 'caption', Exceeds maximum queue size": 2,
            f"ServerUnavailableError: {STUB_DEAD}": 1,
        },
    }
    assert (logger.level, logger.propagate) == (level, propagate)
    assert retried not in logger.handlers


def test_retry_lines_for_the_tables():
    assert format_retries({"total": 0, "by_cause": {}}) == "0"
    assert format_retries({"total": 3, "by_cause": {"A: x": 2, "B: y": 1}}) == "3 (A: x: 2; B: y: 1)"
    many = {"total": 7, "by_cause": {f"E: {i}": 1 for i in range(7)}}
    assert format_retries(many, limit=2) == "7 (E: 0: 1; E: 1: 1; 5 more causes)"
    assert retry_cause("ServerUnavailableError", "down (gave up after 3 retries in 1.0 s)") == (
        "ServerUnavailableError: down"
    )


def test_burst_phase_2_reports_retries_apart_from_failures(monkeypatch):
    refusals = 5
    monkeypatch.setattr(
        RefusingFirst, "failures", [InferenceServerException(QUEUE_FULL, "StatusCode.UNAVAILABLE")] * refusals
    )
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", RefusingFirst)
    args = argparse.Namespace(
        client_requests=4, retries=100, backoff=0.001, max_backoff=0.01, timeout=30, beam_size=2, max_length=3
    )
    server = argparse.Namespace(grpc_address="127.0.0.1:1")
    corpus = type("Corpus", (), {"next": lambda self: ("img", b"img")})()
    phase2 = burst.retrying_clients(args, server, corpus)
    assert phase2["captioned"] == 4 and phase2["failed"] == []
    assert phase2["retries"] == refusals and phase2["max_retries"] == 100
    assert phase2["retries_by_cause"] == {
        "ServerUnavailableError: in ensemble 'caption', Exceeds maximum queue size": refusals
    }
    assert phase2["attempts"] == {"queue full": refusals, "captioned": 4}
    assert phase2["checks"] == {"every image captioned": True}


class SoakClient:
    """Stands in for CaptionClient in the soak's user loop: refuses broken images, says it retried twice."""

    made: list[dict] = []

    def __init__(self, url, protocol=None, **options):
        SoakClient.made.append(options)
        self.retry_count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def caption(self, data, **settings):
        if data in soak.broken_images():
            raise InvalidInputError("not a decodable image")
        self.retry_count = 2
        return api.Caption("a cat", -0.5)


@pytest.mark.parametrize(("retries", "passed"), [(None, {}), (0, {"retries": 0})])
def test_soak_users_retry_like_the_client_and_tally_retries_apart(monkeypatch, retries, passed):
    monkeypatch.setattr(client_package, "CaptionClient", SoakClient)
    monkeypatch.setattr(SoakClient, "made", [])
    args = argparse.Namespace(
        beam_size=2, max_length=3, peak_rounds=0, bad_every=2, repeat_every=0, retries=retries
    )
    corpus = type("Corpus", (), {"next": lambda self: ("img", b"img" + str(time.monotonic()).encode())})()
    tally = soak.Tally()
    soak.user_loop(0, args, "grpc://h:1", "grpc", corpus, time.monotonic() + 0.2, tally, threading.Barrier(1))
    assert tally.ok > 0 and tally.refused_as_expected > 0 and tally.failures == []
    assert tally.retries == 2
    (options,) = SoakClient.made
    assert {k: v for k, v in options.items() if k == "retries"} == passed
