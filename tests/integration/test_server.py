"""The real tritonserver with the model repository and the demo checkpoint, over HTTP and gRPC."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import Caption, InvalidInputError
from load_tests.testkit.parity import SCORE_ATOL, assert_same_results

from .conftest import decode_error, distinct_images, metric

pytestmark = pytest.mark.integration

# Small generation settings keep the suite fast on 2 CPU cores; the settings path is the same at any size.
FAST = {"beam_size": 2, "max_length": 3}


def assert_same(served: Caption, local, tolerance: float = SCORE_ATOL) -> None:
    """Same caption; same score up to float noise (a batch's composition moves it by ~1e-6)."""
    assert_same_results(served, local, atol=tolerance)


@pytest.mark.kernel_parity
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_captions_equal_the_engine_in_process(protocol, grpc_client, http_client, captioner, image_corpus):
    client = grpc_client if protocol == "grpc" else http_client
    # different images per protocol: the response cache must not answer the second protocol
    picked = image_corpus[0:3] if protocol == "grpc" else image_corpus[3:6]
    for name, data in picked:
        assert_same(client.caption(data, **FAST), captioner.caption([data], **FAST)[0]), name


def test_default_settings_are_the_checkpoints(grpc_client, captioner, image_corpus):
    """No beam_size/max_length inputs at all: the optional ensemble inputs stay absent, defaults apply."""
    _, data = image_corpus[6]
    assert_same(grpc_client.caption(data), captioner.caption([data])[0])


def test_32_concurrent_requests_each_get_their_own_caption_in_fewer_executions(
    triton_server, grpc_client, captioner
):
    settings = {"beam_size": 1, "max_length": 1}
    candidates = distinct_images(64)
    local = []
    for i in range(0, len(candidates), 16):
        local += captioner.caption(candidates[i : i + 16], **settings)
    # The demo weights barely tell images apart: keep 32 whose scores lie further apart than twice the float
    # noise allowed below (a few float32 ulps at |score| ~ 9.5), so that each answer identifies its image.
    picked, last = [], None
    for index in sorted(range(len(local)), key=lambda k: local[k].score):
        if last is None or local[index].score - last > 1e-5:
            picked.append(index)
            last = local[index].score
    assert len(picked) >= 32, f"only {len(picked)} of 64 images have distinguishable scores"
    picked = sorted(picked[:32])
    images = [candidates[k] for k in picked]
    expected = [local[k] for k in picked]

    execs_before = metric(triton_server, "nv_inference_exec_count", "ofa")
    requests_before = metric(triton_server, "nv_inference_request_success", "ofa")
    barrier = threading.Barrier(32)

    def one(data):
        barrier.wait()
        return grpc_client.caption(data, **settings)

    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(one, images))
    for got, want in zip(served, expected, strict=True):
        assert_same(got, want, tolerance=4e-6)
    executions = metric(triton_server, "nv_inference_exec_count", "ofa") - execs_before
    requests = metric(triton_server, "nv_inference_request_success", "ofa") - requests_before
    assert requests == 32
    print(
        f"\n32 concurrent requests: {executions:.0f} ofa executions, average batch {requests / executions:.1f}"
    )
    assert requests / executions >= 4, (
        f"ofa ran {executions} executions for 32 requests: dynamic batching did not merge"
    )


def test_beam_size_and_max_length_change_the_output(grpc_client, captioner):
    (data,) = distinct_images(1, start_seed=1000)
    variants = [
        {"beam_size": 2, "max_length": 2},
        {"beam_size": 2, "max_length": 1},
        {"beam_size": 1, "max_length": 2},
    ]
    served = [grpc_client.caption(data, **v) for v in variants]
    for got, v in zip(served, variants, strict=True):
        assert_same(got, captioner.caption([data], **v)[0])
    assert served[0].text != served[1].text  # max_length changes the caption
    assert served[0].text != served[2].text  # so does beam_size


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_invalid_input_fails_alone_with_its_message(protocol, triton_server, grpc_client, http_client):
    client = grpc_client if protocol == "grpc" else http_client
    good = distinct_images(4, start_seed=2000 if protocol == "grpc" else 3000)
    jobs = [(g, FAST) for g in good[:2]]
    jobs += [(b"definitely not an image", FAST), (good[2], {"beam_size": 0, "max_length": 3})]
    jobs += [(g, FAST) for g in good[3:]]
    barrier = threading.Barrier(len(jobs))

    def one(job):
        barrier.wait()
        try:
            return client.caption(job[0], **job[1])
        except InvalidInputError as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for i in (0, 1, 4):
        assert isinstance(results[i], Caption), results[i]
    assert isinstance(results[2], InvalidInputError)
    assert decode_error(b"definitely not an image") in str(results[2])
    assert results[2].status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    assert isinstance(results[3], InvalidInputError)
    assert "beam_size must be between 1 and 16, got 0" in str(results[3])
    assert triton_server.is_ready()  # and the server keeps serving


def test_a_repeated_image_is_answered_from_the_cache(triton_server, grpc_client):
    (data,) = distinct_images(1, start_seed=4000)
    hits = metric(triton_server, "nv_cache_num_hits_per_model", "caption")
    first = grpc_client.caption(data, **FAST)
    assert metric(triton_server, "nv_cache_num_hits_per_model", "caption") == hits
    assert grpc_client.caption(data, **FAST) == first
    assert metric(triton_server, "nv_cache_num_hits_per_model", "caption") == hits + 1
    # the settings are input tensors, so part of the key: other settings are a miss, not a stale answer
    other = grpc_client.caption(data, beam_size=2, max_length=1)
    assert metric(triton_server, "nv_cache_num_hits_per_model", "caption") == hits + 1
    assert other != first
