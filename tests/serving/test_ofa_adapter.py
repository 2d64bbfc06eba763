"""The `ofa` adapter (model_repository/ofa/1/model.py) under a stand-in pb_utils and a stand-in engine."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from ofa_serving.settings import SettingsError

from .conftest import init_args, int_input, load_adapter, model_config, pixels


def request(pb, image_id, rows=1, beam_size=None, max_length=None):
    return pb.InferenceRequest(
        pixel_values=pixels(image_id, rows),
        beam_size=None if beam_size is None else int_input(*[beam_size] * rows),
        max_length=None if max_length is None else int_input(*[max_length] * rows),
    )


def captions(pb, response):
    assert not response.has_error(), response.error().message()
    return [c.decode() for c in pb.get_output_tensor_by_name(response, "caption").as_numpy()[:, 0]]


def test_all_requests_of_one_execute_are_one_engine_batch_answered_in_order(pb, model):
    responses = model.execute([request(pb, i) for i in range(5)])
    assert [captions(pb, r) for r in responses] == [[f"image {i} beam 5 len 16"] for i in range(5)]
    assert model.captioner.calls == [((5, 3, 480, 480), 5, 16)]
    score = pb.get_output_tensor_by_name(responses[3], "score").as_numpy()
    assert score.shape == (1, 1) and score.dtype.name == "float32" and score[0, 0] == pytest.approx(-0.3)


def test_one_batch_per_distinct_settings_responses_stay_in_order(pb, model):
    reqs = [
        request(pb, 0),
        request(pb, 1, beam_size=3),
        request(pb, 2, beam_size=5, max_length=16),  # the defaults spelled out: same batch as request 0
        request(pb, 3, beam_size=3),
        request(pb, 4, max_length=4),
    ]
    responses = model.execute(reqs)
    assert [captions(pb, r)[0] for r in responses] == [
        "image 0 beam 5 len 16",
        "image 1 beam 3 len 16",
        "image 2 beam 5 len 16",
        "image 3 beam 3 len 16",
        "image 4 beam 5 len 4",
    ]
    assert sorted(model.captioner.calls) == sorted(
        [((2, 3, 480, 480), 5, 16), ((2, 3, 480, 480), 3, 16), ((1, 3, 480, 480), 5, 4)]
    )


def test_uint8_pixels_are_normalized_by_the_engine_in_one_call(pb, model):
    reqs = [
        pb.InferenceRequest(pixel_values=pixels(7).astype(np.uint8)),
        pb.InferenceRequest(pixel_values=pixels(8, rows=2).astype(np.uint8)),
    ]
    responses = model.execute(reqs)
    assert [captions(pb, r) for r in responses] == [
        ["image 7 beam 5 len 16"],
        ["image 8 beam 5 len 16", "image 9 beam 5 len 16"],
    ]
    assert model.captioner.calls == [
        ("normalize", (3, 3, 480, 480), "torch.uint8"),
        ((3, 3, 480, 480), 5, 16),
    ]


def test_a_request_with_several_images_gets_all_its_captions(pb, model):
    responses = model.execute([request(pb, 10, rows=3), request(pb, 20)])
    assert captions(pb, responses[0]) == [
        "image 10 beam 5 len 16",
        "image 11 beam 5 len 16",
        "image 12 beam 5 len 16",
    ]
    assert captions(pb, responses[1]) == ["image 20 beam 5 len 16"]
    assert model.captioner.calls == [((4, 3, 480, 480), 5, 16)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_size": 0}, "beam_size must be between 1 and 16, got 0"),
        ({"beam_size": 17}, "beam_size must be between 1 and 16, got 17"),
        ({"max_length": 65}, "max_length must be between 1 and 64, got 65"),
    ],
)
def test_out_of_range_settings_get_their_own_invalid_arg(pb, model, kwargs, message):
    responses = model.execute([request(pb, 0), request(pb, 1, **kwargs), request(pb, 2)])
    assert captions(pb, responses[0]) == ["image 0 beam 5 len 16"]
    assert captions(pb, responses[2]) == ["image 2 beam 5 len 16"]
    error = responses[1].error()
    assert error.code() == pb.TritonError.INVALID_ARG and error.message() == message
    assert model.captioner.calls == [((2, 3, 480, 480), 5, 16)]  # the bad one never reached the engine


def test_inconsistent_shapes_get_invalid_arg(pb, model):
    bad = pb.InferenceRequest(pixel_values=pixels(1, rows=1), beam_size=int_input(3, 3))
    responses = model.execute([bad, request(pb, 2)])
    assert responses[0].error().code() == pb.TritonError.INVALID_ARG
    assert "batch size 2 but the request has 1 image" in responses[0].error().message()
    assert captions(pb, responses[1]) == ["image 2 beam 5 len 16"]


def test_engine_failure_is_internal_for_its_batch_only_and_logged(pb, model):
    responses = model.execute([request(pb, -1, beam_size=2), request(pb, 1), request(pb, 5, beam_size=2)])
    assert captions(pb, responses[1]) == ["image 1 beam 5 len 16"]
    for r in (responses[0], responses[2]):
        assert r.error().code() == pb.TritonError.INTERNAL
        # the client gets an error id, not the exception text; the log has the id with the traceback
        match = re.fullmatch(
            r"ofa: internal error, id ([0-9a-f]{16}) \(details in the server log\)", r.error().message()
        )
        assert match, r.error().message()
        assert any(
            level == "error"
            and match.group(1) in msg
            and "Traceback" in msg
            and "stand-in engine failure" in msg
            for level, msg in pb.Logger.records
        )
    assert responses[0].error().message() == responses[2].error().message(), "one failed batch, one id"


def test_initialize_loads_on_cpu_in_float32_and_warms_up(pb, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    m = load_adapter("ofa").TritonPythonModel()
    m.initialize(init_args("ofa"))
    (captioner,) = engine.instances
    assert (
        captioner.path == tmp_path and captioner.device == "cpu" and str(captioner.dtype) == "torch.float32"
    )
    assert captioner.calls == [("warmup", (1,))]
    m.finalize()
    assert m.captioner is None


def test_warmup_off_and_dtype_from_config_parameters(pb, engine, tmp_path):
    config = model_config("ofa")
    config["parameters"].update(
        model_dir={"string_value": str(tmp_path)},
        warmup={"string_value": "false"},
        dtype={"string_value": "bfloat16"},
    )
    m = load_adapter("ofa").TritonPythonModel()
    m.initialize(init_args("ofa", config))
    assert m.captioner.calls == [] and str(m.captioner.dtype) == "torch.bfloat16"


def test_precision_settings_reach_the_engine_and_float16_is_not_served_on_cpu(
    pb, engine, tmp_path, monkeypatch
):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OFA_ALLOW_TF32", "true")
    monkeypatch.setenv("OFA_CUDA_GRAPHS", "1")
    m = load_adapter("ofa").TritonPythonModel()
    m.initialize(init_args("ofa"))
    assert m.captioner.allow_tf32 is True and m.captioner.cuda_graphs is True
    assert m.captioner.calls == [("warmup", (1,))]  # the CPU's warm-up: no worst-request calls
    assert any("CUDA graphs on" in msg for _, msg in pb.Logger.records)
    monkeypatch.setenv("OFA_DTYPE", "float16")
    with pytest.raises(SettingsError, match="float16 is only served on CUDA"):
        load_adapter("ofa").TritonPythonModel().initialize(init_args("ofa"))
    assert len(engine.instances) == 1  # refused before loading


def test_initialize_refuses_config_dims_that_differ_from_the_checkpoint(pb, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(engine, "patch_image_size", 384)
    with pytest.raises(SettingsError, match=r"'pixel_values' has dims \[3, 480, 480\].*patch_image_size 384"):
        load_adapter("ofa").TritonPythonModel().initialize(init_args("ofa"))


def test_initialize_without_a_checkpoint_names_the_setting(pb, engine):
    with pytest.raises(SettingsError, match="OFA_MODEL_DIR"):
        load_adapter("ofa").TritonPythonModel().initialize(init_args("ofa"))


def test_bad_setting_fails_at_load(pb, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OFA_TORCH_THREADS", "two")
    with pytest.raises(SettingsError, match="OFA_TORCH_THREADS: expected an integer, got 'two'"):
        load_adapter("ofa").TritonPythonModel().initialize(init_args("ofa"))


def test_cancelled_requests_are_not_computed(pb, model):
    gone = pb.InferenceRequest(pixel_values=pixels(7))
    gone.is_cancelled = lambda: True
    live = request(pb, 1)
    live.is_cancelled = lambda: False
    responses = model.execute([gone, live, request(pb, 2)])
    assert responses[0].error().code() == pb.TritonError.CANCELLED
    assert "cancelled" in responses[0].error().message()
    assert [captions(pb, r) for r in responses[1:]] == [["image 1 beam 5 len 16"], ["image 2 beam 5 len 16"]]
    assert model.captioner.calls == [((2, 3, 480, 480), 5, 16)]  # image 7 never reached the engine
    assert ("info", "ofa: 1 cancelled request(s) not computed") in pb.Logger.records


def test_work_over_the_cost_bound_is_invalid_argument_naming_the_setting(pb, model):
    responses = model.execute(
        [request(pb, 1, beam_size=16, max_length=64), request(pb, 2, beam_size=5, max_length=64)]
    )
    assert responses[0].error().code() == pb.TritonError.INVALID_ARG
    assert responses[0].error().message() == (
        "beam_size x max_length = 16 x 64 = 1024 is over this server's limit of 320 "
        "(setting OFA_MAX_BEAM_TOKENS / max_beam_tokens)"
    )
    assert captions(pb, responses[1]) == ["image 2 beam 5 len 64"]  # 5 x 64 = 320: at the bound


def test_the_cost_bound_is_a_setting(pb, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OFA_MAX_BEAM_TOKENS", "1024")
    m = load_adapter("ofa").TritonPythonModel()
    m.initialize(init_args("ofa"))
    (response,) = m.execute([request(pb, 1, beam_size=16, max_length=64)])
    assert captions(pb, response) == ["image 1 beam 16 len 64"]


def test_an_engine_failing_every_batch_unloads_its_model(pb, model, monkeypatch):
    unloaded = []
    monkeypatch.setattr(pb, "unload_model", unloaded.append, raising=False)
    model.execute([request(pb, -1)])
    model.execute([request(pb, 1)])  # a success resets the count
    for _ in range(2):
        model.execute([request(pb, -1)])
    assert unloaded == []
    model.execute([request(pb, -1)])  # the third failed batch in a row
    for _ in range(50):
        if unloaded:
            break
        time.sleep(0.01)
    assert unloaded == ["ofa"]
    assert any(level == "error" and "failed 3 batches in a row" in msg for level, msg in pb.Logger.records)
    model.execute([request(pb, -1)])
    assert unloaded == ["ofa"], "asked once"
