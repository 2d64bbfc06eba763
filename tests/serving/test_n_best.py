"""n-best captions in the `ofa` adapter (``num_captions`` in; ``captions``/``scores`` out) and its helpers,
under a stand-in pb_utils and a stand-in engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ofa_serving.batching import RequestError
from ofa_serving.nbest import EMPTY, n_best_arrays, pad_captions, request_num_captions

from .conftest import StandInCaption, int_input, pixels


def request(pb, image_id, rows=1, num_captions=None, beam_size=None):
    return pb.InferenceRequest(
        pixel_values=pixels(image_id, rows),
        beam_size=None if beam_size is None else int_input(*[beam_size] * rows),
        num_captions=None if num_captions is None else int_input(*num_captions),
    )


def outputs(pb, response):
    assert not response.has_error(), response.error().message()
    return {
        name: pb.get_output_tensor_by_name(response, name).as_numpy()
        for name in ("caption", "score", "captions", "scores")
    }


def texts(array):
    return [[v.decode() for v in row] for row in array]


def test_without_num_captions_the_default_one_caption_comes_in_both_outputs(pb, model):
    (response,) = model.execute([request(pb, 3)])
    out = outputs(pb, response)
    assert texts(out["caption"]) == texts(out["captions"]) == [["image 3 beam 5 len 16"]]
    assert out["scores"].shape == (1, 1) and out["scores"].dtype == np.float32
    assert out["scores"][0, 0] == out["score"][0, 0] == pytest.approx(-0.3)
    assert model.captioner.n_best_calls == [1]


def test_n_best_per_image_best_first_and_caption_stays_the_best(pb, model):
    (response,) = model.execute([request(pb, 1, rows=2, num_captions=[3, 3])])
    out = outputs(pb, response)
    assert texts(out["captions"]) == [
        ["image 1 beam 5 len 16", "image 1 beam 5 len 16 alt 1", "image 1 beam 5 len 16 alt 2"],
        ["image 2 beam 5 len 16", "image 2 beam 5 len 16 alt 1", "image 2 beam 5 len 16 alt 2"],
    ]
    assert out["scores"].shape == (2, 3)
    np.testing.assert_allclose(out["scores"], [[-0.1, -1.1, -2.1], [-0.2, -1.2, -2.2]], rtol=1e-6)
    assert texts(out["caption"]) == [["image 1 beam 5 len 16"], ["image 2 beam 5 len 16"]]
    np.testing.assert_array_equal(out["score"][:, 0], out["scores"][:, 0])


def test_requests_asking_for_different_n_share_one_engine_batch(pb, model):
    responses = model.execute(
        [request(pb, 0, num_captions=[2]), request(pb, 1), request(pb, 2, num_captions=[4])]
    )
    widths = [outputs(pb, r)["captions"].shape for r in responses]
    assert widths == [(1, 2), (1, 1), (1, 4)]
    assert texts(outputs(pb, responses[2])["captions"])[0][3] == "image 2 beam 5 len 16 alt 3"
    # one engine call, asked for the largest n; each request keeps its own n
    assert model.captioner.calls == [((3, 3, 480, 480), 5, 16)] and model.captioner.n_best_calls == [4]


def test_rows_of_one_request_with_different_n_are_refused_alone(pb, model):
    responses = model.execute([request(pb, 0, rows=2, num_captions=[1, 2]), request(pb, 5, num_captions=[2])])
    error = responses[0].error()
    assert error.code() == pb.TritonError.INVALID_ARG
    assert "'num_captions' must be the same for every image of a request, got [1, 2]" in error.message()
    assert texts(outputs(pb, responses[1])["captions"]) == [
        ["image 5 beam 5 len 16", "image 5 beam 5 len 16 alt 1"]
    ]
    assert model.captioner.calls == [((1, 3, 480, 480), 5, 16)]  # the refused one never reached the engine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_captions": [0]}, "num_captions must be between 1 and 5, got 0"),
        ({"num_captions": [6]}, "num_captions must be between 1 and 5, got 6"),
        ({"num_captions": [3], "beam_size": 2}, "num_captions must be between 1 and 2, got 3"),
    ],
)
def test_out_of_range_n_is_invalid_arg_for_that_request_only(pb, model, kwargs, message):
    responses = model.execute([request(pb, 0), request(pb, 1, **kwargs), request(pb, 2, num_captions=[5])])
    assert responses[1].error().code() == pb.TritonError.INVALID_ARG
    assert responses[1].error().message() == message
    assert outputs(pb, responses[0])["captions"].shape == (1, 1)
    assert outputs(pb, responses[2])["captions"].shape == (1, 5)


def test_num_captions_with_the_wrong_batch_size_is_invalid_arg(pb, model):
    bad = pb.InferenceRequest(pixel_values=pixels(1, rows=2), num_captions=int_input(2))
    (response,) = model.execute([bad])
    assert response.error().code() == pb.TritonError.INVALID_ARG
    assert (
        "input 'num_captions' has batch size 1 but the request has 2 image(s)" in response.error().message()
    )


def test_an_image_with_fewer_hypotheses_is_padded_with_empty_and_minus_inf(pb, model):
    # the stand-in engine gives images with id >= 1000 a single hypothesis (as after non-finite scores)
    (response,) = model.execute([request(pb, 999, rows=2, num_captions=[3, 3])])
    out = outputs(pb, response)
    assert texts(out["captions"])[1] == ["image 1000 beam 5 len 16", "", ""]
    assert out["scores"][1, 1] == out["scores"][1, 2] == -math.inf
    assert len(texts(out["captions"])[0]) == 3 and np.isfinite(out["scores"][0]).all()


def test_helpers():
    assert request_num_captions([None, None]) is None
    assert request_num_captions([4, 4, 4]) == 4
    with pytest.raises(RequestError, match=r"got \[2, 3\]"):
        request_num_captions([3, 2])
    best = [StandInCaption("a", -1.0), StandInCaption("b", -2.0)]
    assert pad_captions(best, 1) == best[:1]
    assert pad_captions(best, 3) == [*best, EMPTY]
    arrays = n_best_arrays([pad_captions(best, 3)])
    assert arrays["captions"].tolist() == [[b"a", b"b", b""]] and arrays["caption"].tolist() == [[b"a"]]
    assert arrays["scores"].dtype == np.float32 and arrays["scores"][0, 2] == -math.inf
    with pytest.raises(ValueError, match="same number"):
        n_best_arrays([best, best[:1]])
