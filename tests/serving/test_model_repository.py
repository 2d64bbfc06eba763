"""The committed model repository is consistent: each config.pbtxt, parsed through Triton's schema, declares the
tensors that ``ofa_serving.tensors`` states (names, data types, dims), the ensemble wires its steps by those names,
and every config block carries a comment that says what and why."""

from __future__ import annotations

import re

import pytest

from ofa_serving.model_config import data_type_name, instance_group, read_config
from ofa_serving.tensors import (
    COMMITTED_IMAGE_SIZE,
    ENSEMBLE_STEPS,
    GENERATION_SETTINGS,
    MODEL_TENSORS,
    OUTPUTS,
    PIXEL_VALUES,
    Tensor,
    pixel_values,
)

from .conftest import MODEL_REPOSITORY

MODELS = sorted(MODEL_TENSORS)


def committed(name):
    return read_config(MODEL_REPOSITORY / name / "config.pbtxt")


def declared(entries):
    """The inputs or outputs of a parsed config as :class:`Tensor` values, in file order."""
    return [
        Tensor(t.name, data_type_name(t.data_type), tuple(t.dims), getattr(t, "optional", False))
        for t in entries
    ]


def test_the_repository_holds_the_stated_models():
    assert sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_each_config_declares_the_stated_tensors(name):
    config = committed(name)
    assert declared(config.input) == list(MODEL_TENSORS[name].inputs)
    assert declared(config.output) == list(MODEL_TENSORS[name].outputs)


def test_the_stated_tensors():
    assert [t.name for t in MODEL_TENSORS["caption"].inputs] == [
        "image",
        "beam_size",
        "max_length",
        "num_captions",
    ]
    assert [t.name for t in OUTPUTS] == ["caption", "score", "captions", "scores"]
    assert [(t.optional, t.data_type, t.dims) for t in GENERATION_SETTINGS] == [
        (True, "TYPE_INT32", (1,))
    ] * 3
    assert (
        PIXEL_VALUES
        == Tensor("pixel_values", "TYPE_UINT8", (3, 480, 480))
        == pixel_values(COMMITTED_IMAGE_SIZE)
    )
    assert pixel_values(384).dims == (3, 384, 384)
    for model in MODEL_TENSORS.values():
        for t in model.inputs + model.outputs:
            assert re.fullmatch(r"[a-z][a-z_]*", t.name), t.name


def test_the_ensemble_wires_each_step_by_tensor_name():
    caption = committed("caption")
    steps = caption.ensemble_scheduling.step
    assert [s.model_name for s in steps] == list(ENSEMBLE_STEPS)
    available = {t.name: t for t in MODEL_TENSORS["caption"].inputs}
    for step in steps:
        model = MODEL_TENSORS[step.model_name]
        assert dict(step.input_map) == {t.name: t.name for t in model.inputs}
        assert dict(step.output_map) == {t.name: t.name for t in model.outputs}
        for t in model.inputs:  # fed by the client or an earlier step, with the same type and shape
            assert available[t.name] == t, t.name
        available.update({t.name: t for t in model.outputs})
    for t in MODEL_TENSORS["caption"].outputs:  # what the client gets is what the last step produced
        assert available[t.name] == t, t.name


def test_batch_sizes_cache_and_placement():
    caption, pre, ofa = committed("caption"), committed("preprocess"), committed("ofa")
    assert caption.platform == "ensemble" and pre.backend == ofa.backend == "python"
    assert 1 <= caption.max_batch_size <= min(pre.max_batch_size, ofa.max_batch_size)
    assert caption.response_cache.enable
    assert pre.HasField("dynamic_batching") and ofa.HasField("dynamic_batching")
    assert instance_group(pre) == ("KIND_CPU", 1)
    assert instance_group(ofa) == ("KIND_MODEL", 1)  # loads without a GPU, uses one where present


@pytest.mark.parametrize("name", MODELS)
def test_every_config_block_is_commented(name):
    lines = (MODEL_REPOSITORY / name / "config.pbtxt").read_text().splitlines()
    blocks = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+\s*[:{\[]", line)]
    assert blocks
    for i in blocks:  # a top-level block or field
        assert i > 0 and lines[i - 1].startswith("# "), (
            f"{name}/config.pbtxt:{i + 1} {lines[i]!r} has no comment"
        )


@pytest.mark.parametrize("name", MODELS)
def test_comments_say_what_and_why_not_history(name):
    comments = [
        line for line in (MODEL_REPOSITORY / name / "config.pbtxt").read_text().splitlines() if "#" in line
    ]
    assert comments
    history = re.compile(
        r"\btuned when\b|\bissue \d|#\d|\b20\d\d\b|\bused to\b|\bwas\b|\bverified with\b", re.I
    )
    for line in comments:
        assert not history.search(line), f"{name}/config.pbtxt: {line!r}"
