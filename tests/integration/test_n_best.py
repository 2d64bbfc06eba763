"""n-best captions through the real tritonserver: ``num_captions`` in, ``captions``/``scores`` out, over HTTP
and gRPC, equal to the engine in-process; refusals; the response cache keys on ``num_captions``."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import InvalidInputError
from load_tests.testkit.parity import assert_same_results

from .conftest import distinct_images, metric

pytestmark = pytest.mark.integration

SMALL = {"beam_size": 3, "max_length": 3}


def local_n_best(captioner, data, n, beam_size=3, max_length=3):
    return captioner.generate_n_best(captioner.preprocess([data]), beam_size, max_length, num_captions=n)[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_n_best_equals_the_engine_in_process_and_caption_stays_the_best(
    protocol, grpc_client, http_client, captioner
):
    client = grpc_client if protocol == "grpc" else http_client
    (data,) = distinct_images(1, start_seed=7000 if protocol == "grpc" else 7100)
    served = client.caption_n_best(data, num_captions=3, **SMALL)
    local = local_n_best(captioner, data, 3)
    assert len(served) == len(local) == 3
    assert_same_results(served, local)
    assert served[0].score >= served[1].score >= served[2].score
    best = client.caption(data, **SMALL)  # the same request's best, through the old outputs
    assert_same_results(best, served[0])


def test_without_num_captions_one_caption_the_checkpoints_default(grpc_client, captioner):
    (data,) = distinct_images(1, start_seed=7200)
    (only,) = grpc_client.caption_n_best(data, **SMALL)
    assert captioner.task_config.num_return_sequences == 1
    assert only.text == local_n_best(captioner, data, 1)[0].text


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_out_of_range_n_is_invalid_argument(protocol, grpc_client, http_client):
    client = grpc_client if protocol == "grpc" else http_client
    (data,) = distinct_images(1, start_seed=7300)
    with pytest.raises(InvalidInputError, match="num_captions must be between 1 and 3, got 4") as info:
        client.caption_n_best(data, num_captions=4, **SMALL)
    assert info.value.status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")


def infer_two_images(server, images, num_captions):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    inputs = [grpcclient.InferInput("image", [2, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[d] for d in images], dtype=np.object_))
    for name, values in (("num_captions", num_captions), ("beam_size", [3, 3]), ("max_length", [3, 3])):
        inputs.append(grpcclient.InferInput(name, [2, 1], "INT32"))
        inputs[-1].set_data_from_numpy(np.array([[v] for v in values], dtype=np.int32))
    try:
        return client.infer("caption", inputs)
    finally:
        client.close()


def test_a_request_of_several_images_gets_n_each_and_must_ask_one_n(triton_server, captioner):
    images = distinct_images(2, start_seed=7400)
    result = infer_two_images(triton_server, images, [2, 2])
    captions = result.as_numpy("captions")
    assert captions.shape == (2, 2) and result.as_numpy("scores").shape == (2, 2)
    for row, data in zip(captions, images, strict=True):
        assert [c.decode() for c in row] == [c.text for c in local_n_best(captioner, data, 2)]
    assert result.as_numpy("caption")[:, 0].tolist() == captions[:, 0].tolist()
    with pytest.raises(
        InferenceServerException, match="must be the same for every image of a request"
    ) as info:
        infer_two_images(triton_server, images, [1, 2])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_the_response_cache_keys_on_num_captions(triton_server, grpc_client):
    (data,) = distinct_images(1, start_seed=7500)
    hits = metric(triton_server, "nv_cache_num_hits_per_model", "caption")
    two = grpc_client.caption_n_best(data, num_captions=2, **SMALL)
    three = grpc_client.caption_n_best(data, num_captions=3, **SMALL)  # another n: a miss, not a stale answer
    assert len(two) == 2 and len(three) == 3
    assert metric(triton_server, "nv_cache_num_hits_per_model", "caption") == hits
    assert grpc_client.caption_n_best(data, num_captions=3, **SMALL) == three
    assert metric(triton_server, "nv_cache_num_hits_per_model", "caption") == hits + 1
