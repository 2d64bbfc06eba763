"""The OFA caption family beyond tiny: base, large and huge architectures captioned exactly like ModelScope.

Each member is built by ModelScope's own ``OFAModel(OFAConfig(...))`` with random weights (the demo checkpoint's
recipe, 2 encoder and 2 decoder layers so the suite stays fast) and written by its ``save_pretrained``; the
tokenizer files are the demo checkpoint's. The architecture numbers are the published ones (OFA-Sys
``ofa_{base,large,huge}_architecture``): base = resnet101, d_model 768, 12 heads (head dim 64); large =
resnet152, d_model 1024, 16 heads; huge = resnet152, d_model 1280, 16 heads (head dim 80). The images are 160 px
instead of the published 480 (the image size is a configuration.json value, tested on the tiny model; here it only
makes ModelScope's reference slow). The huge member carries the huge model's evaluation settings (beam 10,
temperature 0.98, len_penalty 0.98) and asks for two captions per image (``num_return_sequences``).

Built checkpoints are kept under ``checkpoints/test-family/`` and rebuilt when their recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from load_tests.testkit.reference import (
    Reference,
    assert_tie_aware_parity,
    build_modelscope_checkpoint,
    engine_results,
    write_prefixed_copy,
)
from ofa_captioning.captioner import Captioner
from ofa_captioning.checkpoint import load_state_dict
from ofa_captioning.demo_checkpoint import DEMO_TASK_CONFIG
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.reference

RECIPE_VERSION = 1
LAYERS = 2
PATCH = 160

ARCHITECTURES = {
    "base": dict(d_model=768, heads=12, ffn=3072, resnet_type="resnet101"),
    "large": dict(d_model=1024, heads=16, ffn=4096, resnet_type="resnet152"),
    "huge": dict(d_model=1280, heads=16, ffn=5120, resnet_type="resnet152"),
}
# configuration.json model.beam_search / num_return_sequences per member (others: the demo's, beam 5).
SETTINGS = {
    "base": ({}, 1),
    "large": ({}, 1),
    "huge": ({"beam_size": 10, "temperature": 0.98, "len_penalty": 0.98}, 2),
}
IMAGES = (4, 9)  # exact_480.png, exif_orient6.jpg


def model_config(name: str) -> dict:
    a = ARCHITECTURES[name]
    return dict(
        vocab_size=59457,
        d_model=a["d_model"],
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=a["heads"],
        decoder_attention_heads=a["heads"],
        encoder_ffn_dim=a["ffn"],
        decoder_ffn_dim=a["ffn"],
        resnet_type=a["resnet_type"],
    )


def task_config(name: str) -> dict:
    beam, n = SETTINGS[name]
    cfg = json.loads(json.dumps(DEMO_TASK_CONFIG))
    cfg["model"]["patch_image_size"] = PATCH
    cfg["model"]["max_image_size"] = PATCH
    cfg["model"]["beam_search"].update(beam)
    if n != 1:
        cfg["model"]["num_return_sequences"] = n
    return cfg


def ensure_family_checkpoint(name: str, tokenizer_dir: Path) -> Path:
    """The member's checkpoint under checkpoints/test-family/, built by ModelScope unless already there."""
    recipe = {"version": RECIPE_VERSION, "model": model_config(name), "task": task_config(name), "seed": 1}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    out = REPO_ROOT / "checkpoints" / "test-family" / f"{name}-{digest}"
    stamp = out / ".recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_modelscope_checkpoint(tmp, recipe["model"], recipe["task"], tokenizer_dir, seed=recipe["seed"])
    (tmp / ".recipe.json").write_text(json.dumps(recipe))
    tmp.rename(out)
    return out


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def member(request, demo_checkpoint, image_corpus):
    """(name, checkpoint dir, reference, engine, reference pixels, reference results) of one family member."""
    name = request.param
    path = ensure_family_checkpoint(name, demo_checkpoint)
    ref = Reference(path)
    engine = Captioner.from_pretrained(path)
    pixels = ref.pixels([image_corpus[i][1] for i in IMAGES])
    want = ref.results(pixels, num_return_sequences=SETTINGS[name][1])
    yield name, path, ref, engine, pixels, want
    del ref, engine


def test_architecture_read_from_config(member):
    name, path, _, engine, pixels, _ = member
    a = ARCHITECTURES[name]
    cfg = engine.model.config
    assert (cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (
        a["d_model"],
        a["heads"],
        a["ffn"],
    )
    assert engine.model.decoder.layers[0].self_attn.head_dim == (80 if name == "huge" else 64)
    assert (
        len(engine.model.encoder.embed_images.layer3) == {"resnet101": 23, "resnet152": 36}[a["resnet_type"]]
    )
    assert pixels.shape[-1] == PATCH
    # The checkpoint is ModelScope's save_pretrained output: config.json written by transformers, .bin weights.
    assert json.loads((path / "config.json").read_text())["d_model"] == a["d_model"]
    assert (path / "pytorch_model.bin").is_file()


def test_captions_match_reference(member):
    """Captions (n-best where configured), tokens and scores equal ModelScope's, near-ties excepted."""
    name, _, ref, engine, pixels, want = member
    n = SETTINGS[name][1]
    beam = SETTINGS[name][0].get("beam_size", 5)
    assert engine.default_beam_size == beam and engine.task_config.num_return_sequences == n
    got = engine_results(engine, pixels, num_captions=n)
    assert all(len(w) == n for w in want)
    diverged = assert_tie_aware_parity(ref, pixels, got, want, names=[f"{name}/{i}" for i in IMAGES])
    assert len(diverged) <= 1, diverged
    # Scores carry the image: the two images' best scores differ.
    assert abs(want[0][0].score - want[1][0].score) > 1e-4


def test_trainer_prefixed_weights(member, tmp_path):
    """The same checkpoint with every key prefixed ``model.`` (ModelScope's trainer output) loads to the same
    network and captions identically."""
    name, path, _, engine, pixels, _ = member
    prefixed = write_prefixed_copy(path, tmp_path / name)
    raw = torch.load(prefixed / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert raw and all(k.startswith("model.") for k in raw)
    del raw
    state = load_state_dict(prefixed)
    reference_state = load_state_dict(path)
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state)
    del state, reference_state
    other = Captioner.from_pretrained(prefixed)
    n = SETTINGS[name][1]
    assert engine_results(other, pixels, num_captions=n) == engine_results(engine, pixels, num_captions=n)
    if name == "base":
        # ModelScope reads the prefixed file too (transformers strips the base-model prefix): same captions.
        ref = Reference(prefixed)
        want = ref.results(pixels)
        assert_tie_aware_parity(ref, pixels, engine_results(other, pixels), want)
