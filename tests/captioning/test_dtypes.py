"""One dtype parser (ofa_captioning.config.parse_dtype) for the engine's argument and the serving setting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ofa_captioning.captioner import _resolve_dtype
from ofa_captioning.config import DTYPE_NAMES, parse_dtype
from ofa_serving.settings import OFASettings, SettingsError, resolve_dtype


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("float32", "float32"),
        ("FP32", "float32"),
        ("float", "float32"),
        ("torch.float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("BFloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        (torch.bfloat16, "bfloat16"),
    ],
)
def test_every_spelling_names_one_engine_dtype(spelling, name):
    assert parse_dtype(spelling) == name
    assert _resolve_dtype(spelling) == getattr(torch, name)


@pytest.mark.parametrize("bad", ["float64", "int8", "", torch.float64, 16])
def test_anything_else_is_refused_naming_the_accepted_types(bad):
    message = f"dtype must be one of float32, float16, bfloat16, got {bad!r}"
    with pytest.raises(ValueError) as engine:
        _resolve_dtype(bad)
    assert str(engine.value) == message
    with pytest.raises(ValueError) as parser:
        parse_dtype(bad)
    assert str(parser.value) == message


def test_the_engine_default_is_float32():
    assert _resolve_dtype(None) == torch.float32


def test_the_dtype_setting_offers_auto_and_the_engine_dtypes():
    field = next(f for f in dataclasses.fields(OFASettings) if f.name == "dtype")
    assert field.metadata["choices"] == ("auto", *DTYPE_NAMES)


def test_the_setting_resolves_through_the_engine_parser():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:0") == "float16"
    assert resolve_dtype("fp16", "cuda") == "float16"
    with pytest.raises(
        SettingsError, match=r"^OFA_DTYPE / parameter 'dtype': dtype must be one of .*got 'fp64'$"
    ):
        resolve_dtype("fp64", "cpu")
