"""Cancellation (issue 10): a request whose client gave up is not computed.

While ``ofa`` runs a slow batch, 12 more requests arrive with a client timeout of 1 s; their clients give up
(DEADLINE_EXCEEDED) while the requests wait in ``ofa``'s queue. When their turn comes, the adapters check
``request.is_cancelled()`` before building the engine batch: the server log says how many were skipped, and
``ofa``'s metrics count none of them as computed.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import tritonclient.grpc as grpcclient
from reliabilitylib import caption_inputs, fire

from .conftest import FAST, fresh_seed, png

pytestmark = pytest.mark.integration

SLOW = 4  # default generation settings: a batch takes seconds on a CPU
GIVING_UP = 12
SKIPPED = re.compile(r"(ofa|preprocess): (\d+) cancelled request\(s\) not (?:computed|decoded)")


def _metric(server, name: str, model: str) -> float:
    total = 0.0
    for line in server.metrics().splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_requests_whose_clients_gave_up_are_not_computed(hardened_server):
    server = hardened_server
    log_start = len(server.log_file.read_bytes())
    seed = fresh_seed()
    computed_before = _metric(server, "nv_inference_request_success", "ofa")
    preprocessed = _metric(server, "nv_inference_request_success", "preprocess")
    slow: list = []
    thread = threading.Thread(
        target=lambda: slow.extend(
            fire(
                server.grpc_address,
                [caption_inputs(grpcclient, [png(48, 36, seed + i)]) for i in range(SLOW)],
                timeout_s=600,
            )
        )
    )
    thread.start()
    deadline = time.monotonic() + 120
    while _metric(server, "nv_inference_request_success", "preprocess") < preprocessed + SLOW:
        assert time.monotonic() < deadline, "the slow requests never reached ofa"
        time.sleep(0.05)
    gave_up = fire(
        server.grpc_address,
        [caption_inputs(grpcclient, [png(48, 36, seed + 100 + i)], **FAST) for i in range(GIVING_UP)],
        client_timeout_s=1.0,
        timeout_s=60,
    )
    thread.join(timeout=600)
    assert [o.status for o in slow] == ["OK"] * SLOW, slow
    # the clients gave up while the slow batch was running
    assert [o.status for o in gave_up] == ["StatusCode.DEADLINE_EXCEEDED"] * GIVING_UP, gave_up

    def skipped() -> dict[str, int]:
        text = server.log_file.read_bytes()[log_start:].decode(errors="replace")
        out = {"ofa": 0, "preprocess": 0}
        for model, count in SKIPPED.findall(text):
            out[model] += int(count)
        return out

    deadline = time.monotonic() + 120
    while sum(skipped().values()) < GIVING_UP and time.monotonic() < deadline:
        time.sleep(0.2)
    computed = _metric(server, "nv_inference_request_success", "ofa") - computed_before
    print(
        f"\n{GIVING_UP} requests given up by their clients: skipped {skipped()}; ofa computed {computed:.0f} requests"
    )
    assert sum(skipped().values()) == GIVING_UP
    assert computed == SLOW, "ofa computed requests nobody was waiting for"
