"""The committed model repository is consistent: what the ensemble wires together fits, names are lowercase,
every config block carries a comment."""

from __future__ import annotations

import re

from .conftest import MODEL_REPOSITORY, model_config


def tensors(config, kind):
    return {t["name"]: t for t in config.get(kind, [])}


def test_tensor_names_are_lowercase_semantic():
    for name in ("preprocess", "ofa", "caption"):
        config = model_config(name)
        for t in config.get("input", []) + config.get("output", []):
            assert re.fullmatch(r"[a-z][a-z_]*", t["name"]), (name, t["name"])


def test_ensemble_wires_the_steps_with_matching_tensors():
    caption, pre, ofa = model_config("caption"), model_config("preprocess"), model_config("ofa")
    steps = caption["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocess", "ofa"]
    assert tensors(pre, "output")["pixel_values"]["dims"] == tensors(ofa, "input")["pixel_values"]["dims"]
    for name in ("image", "beam_size", "max_length", "num_captions"):
        assert name in tensors(caption, "input")
    for name in ("beam_size", "max_length", "num_captions"):
        assert tensors(caption, "input")[name].get("optional") and tensors(ofa, "input")[name].get("optional")
        assert (
            tensors(caption, "input")[name]["data_type"]
            == tensors(ofa, "input")[name]["data_type"]
            == "TYPE_INT32"
        )
    outputs = {"caption", "score", "captions", "scores"}
    assert tensors(caption, "output").keys() == tensors(ofa, "output").keys() == outputs
    for name in outputs:
        assert tensors(caption, "output")[name] == tensors(ofa, "output")[name]
    assert tensors(ofa, "output")["captions"]["dims"] == ["-1"]  # n varies per request
    ofa_step = steps[1]
    assert ofa_step["input_map"] == {
        n: n for n in ("pixel_values", "beam_size", "max_length", "num_captions")
    }
    assert ofa_step["output_map"] == {n: n for n in outputs}
    assert int(caption["max_batch_size"]) <= min(int(pre["max_batch_size"]), int(ofa["max_batch_size"]))
    assert caption["response_cache"]["enable"] is True


def test_pixels_travel_as_uint8_between_the_steps():
    pre, ofa = model_config("preprocess"), model_config("ofa")
    assert tensors(pre, "output")["pixel_values"]["data_type"] == "TYPE_UINT8"
    assert tensors(ofa, "input")["pixel_values"]["data_type"] == "TYPE_UINT8"


def test_models_batch_and_place_themselves_as_documented():
    pre, ofa = model_config("preprocess"), model_config("ofa")
    assert "dynamic_batching" in pre and "dynamic_batching" in ofa
    assert pre["instance_group"][0]["kind"] == "KIND_CPU"
    assert ofa["instance_group"][0]["kind"] == "KIND_MODEL"  # loads without a GPU, uses one where present


def test_every_config_block_is_commented():
    for name in ("preprocess", "ofa", "caption"):
        lines = (MODEL_REPOSITORY / name / "config.pbtxt").read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^[a-z_]+\s*[:{\[]", line):  # a top-level block or field
                assert i > 0 and lines[i - 1].startswith("#"), (
                    f"{name}/config.pbtxt:{i + 1} {line!r} has no comment"
                )
