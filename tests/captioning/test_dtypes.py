"""One dtype parser (ofa_captioning.config.parse_dtype) for the engine's argument and the serving setting; the
precision switches of the engine: TF32 (float32 on CUDA) and CUDA graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ofa_captioning import captioner as captioner_module
from ofa_captioning.captioner import Captioner, _resolve_dtype, tf32_flag
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
    with pytest.raises(
        SettingsError, match=r"^OFA_DTYPE / parameter 'dtype': float16 is only served on CUDA"
    ):
        resolve_dtype("float16", "cpu")


# ------------------------------------------------------------------------------------- TF32 and CUDA graphs


@pytest.mark.parametrize(
    ("device", "dtype", "allow", "expected"),
    [
        ("cuda", torch.float32, False, False),
        ("cuda:1", torch.float32, True, True),
        ("cuda", torch.float16, False, None),  # TF32 only changes float32 maths: flags left alone
        ("cuda", torch.bfloat16, True, None),
        ("cpu", torch.float32, False, None),
        ("cpu", torch.float32, True, None),
    ],
)
def test_tf32_is_off_for_float32_on_cuda_unless_allowed(device, dtype, allow, expected):
    assert tf32_flag(torch.device(device), dtype, allow) is expected


def record_beam_search(monkeypatch) -> list[bool]:
    """Replace the engine's beam_search by one that records its ``cuda_graphs`` keyword, then runs."""
    seen: list[bool] = []
    real = captioner_module.beam_search

    def recording(model, encoder_out, settings, *, cuda_graphs=False):
        seen.append(cuda_graphs)
        return real(model, encoder_out, settings, cuda_graphs=cuda_graphs)

    monkeypatch.setattr(captioner_module, "beam_search", recording)
    return seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_float32_sets_tf32_and_cuda_graphs_reach_beam_search(demo_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    Captioner.from_pretrained(demo_checkpoint, device="cuda")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    engine = Captioner.from_pretrained(demo_checkpoint, device="cuda", allow_tf32=True, cuda_graphs=True)
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    Captioner.from_pretrained(demo_checkpoint, device="cuda", dtype="float16")  # leaves them as they are
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    assert engine.cuda_graphs is True
    seen = record_beam_search(monkeypatch)
    engine.generate(torch.zeros(1, 3, 32, 32), beam_size=2, max_length=3)
    assert seen == [True]
