"""The CPU kernels (ofa_captioning.kernels): the oneDNN fast paths and their plain-PyTorch fallback agree, and a
torch build without one of the private oneDNN operators falls back with a logged notice instead of failing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from load_tests.testkit.parity import assert_same_results
from ofa_captioning import kernels
from ofa_captioning.captioner import Captioner

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU torch build)"
)

# Every private operator the kernels use, by its top-level name under torch.ops.mkldnn.
PRIVATE_OPS = (
    "_linear_pointwise",
    "_reorder_linear_weight",
    "_convolution_pointwise",
    "_reorder_convolution_weight",
)
# Another kernel, another summation order: the network's float32 outputs (magnitude up to ~3 on the demo
# checkpoint) agree to float32 rounding accumulated over the layers (2.5e-6 at most, measured), far below what
# changes a caption.
RTOL, ATOL = 1e-5, 2e-5


class _MkldnnWithout:
    """``torch.ops.mkldnn`` as a torch build without the operators ``missing`` would have it."""

    def __init__(self, real, missing: tuple[str, ...]):
        self._real = real
        self._missing = missing

    def __getattr__(self, name: str):
        if name in self._missing:
            raise AttributeError(f"'_OpNamespace' 'mkldnn' object has no attribute {name!r}")
        return getattr(self._real, name)


@pytest.fixture
def without_ops(monkeypatch):
    """Hide private oneDNN operators from the kernels (``without_ops("_linear_pointwise", ...)``), with a fresh
    record of the notices already logged."""
    real = torch.ops.mkldnn
    monkeypatch.setattr(kernels, "_reported_missing", set())

    def hide(*names: str) -> None:
        monkeypatch.setattr(torch.ops, "mkldnn", _MkldnnWithout(real, names))

    return hide


@pytest.fixture(scope="module")
def fast(demo_checkpoint: Path) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def images(image_corpus) -> list[bytes]:
    return [data for _name, data in image_corpus[:3]]


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ofa_captioning.kernels"]


def _outputs(captioner: Captioner, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output and the decoder's logits over a fixed prefix, one row per image."""
    ids = captioner._prompt_ids.unsqueeze(0).expand(pixels.shape[0], -1)
    prefix = torch.tensor([[0, 5, 6, 7, 8]]).expand(pixels.shape[0], -1)
    with torch.inference_mode():
        enc = captioner.model.encode(ids, pixels)
        return enc.last_hidden_state, captioner.model.decoder_logits(prefix, enc)


def _packed(captioner: Captioner) -> tuple[bool, bool]:
    """Whether the prepared model holds oneDNN-packed linear weights, and packed convolution weights."""
    model = captioner.model
    return (
        model.decoder.projection.packed is not None,
        model.encoder.embed_images._fused_stem.packed is not None,
    )


def test_fast_path_and_fallback_give_equal_outputs(fast, images, demo_checkpoint, without_ops):
    assert _packed(fast) == (True, True)  # the fast path is what a CPU engine runs
    without_ops(*PRIVATE_OPS)
    plain = Captioner.from_pretrained(demo_checkpoint)
    assert _packed(plain) == (False, False)

    pixels = fast.preprocess(images)
    fast_enc, fast_logits = _outputs(fast, pixels)
    plain_enc, plain_logits = _outputs(plain, pixels)

    torch.testing.assert_close(plain_enc, fast_enc, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(plain_logits, fast_logits, rtol=RTOL, atol=ATOL)
    assert_same_results(plain.caption(images), fast.caption(images))


@pytest.mark.parametrize("missing", PRIVATE_OPS)
def test_a_missing_private_op_falls_back_with_one_logged_notice(
    missing, fast, images, demo_checkpoint, without_ops, caplog
):
    without_ops(missing)
    with caplog.at_level(logging.WARNING, logger="ofa_captioning.kernels"):
        captioner = Captioner.from_pretrained(demo_checkpoint)
        captions = captioner.caption(images)
        captioner.caption(images)

    # The linear path needs both linear operators, the convolution path both convolution ones.
    linear_packed, conv_packed = _packed(captioner)
    assert linear_packed == ("linear" not in missing)
    assert conv_packed == ("convolution" not in missing)
    notices = _notices(caplog)
    assert notices, "no notice logged"
    assert all(f"torch.ops.mkldnn.{missing}" in n for n in notices), notices
    assert len(notices) == len(set(notices)), f"a notice logged twice: {notices}"
    assert_same_results(captions, fast.caption(images))


def test_an_op_missing_after_preparing_falls_back_at_call_time(fast, images, without_ops, caplog):
    want = fast.caption(images)
    without_ops("_convolution_pointwise")
    with caplog.at_level(logging.WARNING, logger="ofa_captioning.kernels"):
        got = fast.caption(images)

    assert any("torch.ops.mkldnn._convolution_pointwise" in n for n in _notices(caplog))
    assert_same_results(got, want)


def test_with_every_op_present_nothing_is_logged(demo_checkpoint, images, without_ops, caplog):
    without_ops()
    with caplog.at_level(logging.WARNING, logger="ofa_captioning.kernels"):
        Captioner.from_pretrained(demo_checkpoint).caption(images[:1])
    assert _notices(caplog) == []


def test_only_the_kernel_module_names_onednn():
    """The network modules call the kernels' interface; torch's private oneDNN operators stay in kernels.py."""
    package = Path(kernels.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {"model.py", "resnet.py", "transformer.py", "kernels.py"} <= {m.name for m in modules}
    users = [m.name for m in modules if "mkldnn" in m.read_text()]
    assert users == ["kernels.py"]
