"""Chinese checkpoints: the Chinese demo checkpoint, ModelScope loading it, and caption parity with ModelScope on it.

The reference runs ModelScope's own zh path: ``OfaForAllTasks`` with ``language: zh`` (``OFATokenizerZH``, its
generator, its post-processing with the detokenizer regex) and ``OfaImageCaptioningPreprocessor``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from load_tests.testkit.parity import assert_same_results
from ofa_captioning.captioner import Captioner
from ofa_captioning.demo_checkpoint import FILES_ZH, build_demo_checkpoint_zh
from ofa_captioning.tokenizer import NUM_BINS, NUM_CODES, OFATokenizerZH, postprocess_caption

# Two images of different formats and shapes; both are clear of beam-search near-ties on this checkpoint.
PARITY_IMAGES = (2, 9)  # panorama_1200x200.jpg, exif_orient8.jpg
CJK = re.compile("[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def engine(demo_checkpoint_zh: Path) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint_zh)


@pytest.fixture(scope="module")
def reference_zh(demo_checkpoint_zh: Path):
    """ModelScope's OFA captioning (load_tests.testkit.reference.Reference) on the Chinese demo checkpoint."""
    from load_tests.testkit.reference import Reference

    return Reference(demo_checkpoint_zh)


# ---------------------------------------------------------------------------------------------- the checkpoint


def test_demo_checkpoint_zh_layout(demo_checkpoint_zh: Path) -> None:
    for name in FILES_ZH:
        assert (demo_checkpoint_zh / name).is_file(), name
    assert (
        not (demo_checkpoint_zh / "vocab.json").exists() and not (demo_checkpoint_zh / "merges.txt").exists()
    )
    config = json.loads((demo_checkpoint_zh / "config.json").read_text(encoding="utf-8"))
    task = json.loads((demo_checkpoint_zh / "configuration.json").read_text(encoding="utf-8"))
    tok = OFATokenizerZH.from_pretrained(demo_checkpoint_zh)
    assert config["vocab_size"] == len(tok) == tok.vocab_size + 1 + NUM_CODES + NUM_BINS
    assert task["task"] == "image-captioning"
    assert task["model"]["language"] == "zh"
    assert task["model"]["prompt"] == " 图片描述了什么内容?"
    lines = (demo_checkpoint_zh / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert sum(bool(CJK.fullmatch(t)) for t in lines) >= 3000
    assert {"[UNK]", "[CLS]", "##s", "，", "。", "iphone", "12"} <= set(lines)


def test_demo_checkpoint_zh_is_deterministic(tmp_path: Path, demo_checkpoint_zh: Path) -> None:
    out = build_demo_checkpoint_zh(tmp_path / "again")
    for name in ("vocab.txt", "config.json", "configuration.json", "README.md"):
        assert (out / name).read_bytes() == (demo_checkpoint_zh / name).read_bytes(), name
    a = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    b = torch.load(demo_checkpoint_zh / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys() and len(a) == 541
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_engine_loads_demo_zh(engine: Captioner) -> None:
    assert isinstance(engine.tokenizer, OFATokenizerZH)
    assert engine.task_config.language == "zh"
    assert engine.model.config.vocab_size == len(engine.tokenizer)
    ids = engine.tokenizer.encode_prompt(engine.task_config.prompt, engine.task_config.max_src_length)
    assert len(ids) == 12 and engine.tokenizer.unk_id not in ids


# ---------------------------------------------------------------------------------------------- ModelScope


@pytest.mark.reference
def test_modelscope_loads_demo_zh(demo_checkpoint_zh: Path) -> None:
    """ModelScope's own OFAModel.from_pretrained and OFATokenizerZH.from_pretrained load the directory unchanged."""
    from load_tests.testkit.reference import install_stand_ins

    install_stand_ins()
    from modelscope.models.multi_modal.ofa import OFAModel
    from modelscope.models.multi_modal.ofa import OFATokenizerZH as RefTokenizer

    model, info = OFAModel.from_pretrained(str(demo_checkpoint_zh), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = torch.load(demo_checkpoint_zh / "pytorch_model.bin", map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    assert not [k for k in state if not torch.equal(state[k], loaded[k])]
    tok = RefTokenizer.from_pretrained(str(demo_checkpoint_zh))
    tok.add_tokens([f"<code_{i}>" for i in range(NUM_CODES)])
    tok.add_tokens([f"<bin_{i}>" for i in range(NUM_BINS)])
    assert len(tok) == model.config.vocab_size


@pytest.mark.reference
def test_prompt_ids_equal_reference(engine: Captioner, reference_zh) -> None:
    ids = engine.tokenizer.encode_prompt(engine.task_config.prompt, engine.task_config.max_src_length)
    assert ids == reference_zh.source_tokens()
    assert type(reference_zh.tokenizer).__name__ == "OFATokenizerZH"


@pytest.mark.reference
def test_caption_parity_zh(engine: Captioner, reference_zh, image_corpus) -> None:
    """Whole path (image bytes -> caption) of both, in one batch: captions identical, scores within 1e-4."""
    picks = [image_corpus[i][1] for i in PARITY_IMAGES]
    ref = reference_zh.caption_images(picks)
    got = engine.caption(picks)
    assert_same_results(got, ref, names=[image_corpus[i][0] for i in PARITY_IMAGES])
    for text, _ in ref:
        # Chinese captions, and the decoder's spaces between characters are gone (the detokenizer ran).
        assert len(CJK.findall(text)) >= 3, text
        assert not re.search(r"[\u4e00-\u9fff] +[\u4e00-\u9fff]", text), text
    # The scores carry the image (a preprocessing error would show).
    assert len({round(s, 4) for _, s in ref}) == len(ref)


@pytest.mark.reference
def test_all_hypotheses_match_zh(engine: Captioner, reference_zh, image_corpus) -> None:
    """Every finished hypothesis (tokens and score, best first) equals the reference generator's."""
    pixels = reference_zh.pixels([image_corpus[3][1]])
    ref = reference_zh.generate(pixels, beam_size=3, max_length=6)
    got = engine.generate_hypotheses(pixels, 3, 6)
    assert len(ref) == len(got) == 1
    assert len(got[0]) == len(ref[0]) == 3
    assert_same_results(
        got[0], [{"tokens": r["tokens"].tolist(), "score": float(r["score"])} for r in ref[0]]
    )


def _detokenizer_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "图",
        "片",
        "，",
        "。",
        "！",
        "iphone",
        "12",
        "a",
        "B",
        ".",
        ",",
        ":",
        "!",
        "?",
        "<code_5>",
        "-",
        "é",
        "😀",
    ]
    spaces = ["", " ", "  ", "   ", "\t"]
    return [
        "".join(rng.choice(spaces) + rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(n)
    ]


@pytest.mark.reference
def test_postprocess_equals_modelscope_detokenizer(reference_zh) -> None:
    strings = ["一 款 时 尚 女 包", "iphone 12 手 机", "a dog ， on 草 地 !"] + _detokenizer_strings(
        2000, seed=4
    )
    bad = [(s, reference_zh.task_model.detokenizer(s)) for s in strings]
    bad = [(s, r, postprocess_caption(s, "zh")) for s, r in bad if r != postprocess_caption(s, "zh")]
    assert not bad, bad[:5]
