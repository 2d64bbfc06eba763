"""Checkpoint layout, configuration reading and strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ofa_captioning.checkpoint import find_weights, load_state_dict
from ofa_captioning.config import ModelConfig, TaskConfig, load_configs
from ofa_captioning.demo_checkpoint import (
    DEMO_MODEL_CONFIG,
    FILES,
    _init_weights,
    ensure_demo_checkpoint,
    is_complete,
)
from ofa_captioning.model import OFAModel, make_image_bucket_position, make_token_bucket_position

TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


@pytest.fixture(scope="module")
def state(demo_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(demo_checkpoint)


def test_demo_checkpoint_files(demo_checkpoint: Path):
    for name in FILES:
        assert (demo_checkpoint / name).is_file(), name
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["vocab_size"] == 59457 and config["d_model"] == 256 and config["resnet_type"] == "resnet50"
    assert (config["encoder_layers"], config["decoder_layers"]) == (4, 4)
    task = json.loads((demo_checkpoint / "configuration.json").read_text())
    assert task["task"] == "image-captioning" and task["model"]["type"] == "ofa"
    assert task["model"]["beam_search"] == {
        "beam_size": 5,
        "max_len_b": 16,
        "min_len": 1,
        "no_repeat_ngram_size": 3,
    }
    assert "meaningless" in (demo_checkpoint / "README.md").read_text()


def test_demo_checkpoint_state_dict(state: dict[str, torch.Tensor]):
    assert len(state) == 541
    assert sum(k.startswith("encoder.embed_images.") for k in state) == 258
    # The tied embeddings are stored once: the three keys share one storage in the file.
    ptrs = {state[k].untyped_storage().data_ptr() for k in TIED}
    assert len(ptrs) == 1
    assert state[TIED[0]].shape == (59457, 256)
    # Buffers are what the formulas give (the reference computes them the same way at construction).
    assert torch.equal(state["encoder.token_rp_bucket"], make_token_bucket_position(256))
    assert torch.equal(state["encoder.image_rp_bucket"], make_image_bucket_position(42, 83 * 83 + 3))
    assert torch.equal(state["decoder.image_rp_bucket"], state["encoder.image_rp_bucket"])
    idx = state["decoder.image_position_idx"]
    assert (
        idx.shape == (1025,)
        and idx[0] == 0
        and idx[1] == 1
        and idx[16] == 16
        and idx[17] == 43
        and idx[-1] == 1024
    )
    assert state["encoder.token_rp_bucket"].dtype == torch.int64


def test_demo_weights_are_deterministic(state: dict[str, torch.Tensor]):
    model = OFAModel(ModelConfig.from_dict(DEMO_MODEL_CONFIG))
    _init_weights(model, seed=0)
    rebuilt = model.state_dict()
    assert rebuilt.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(rebuilt[key], value), key


def test_ensure_demo_checkpoint_is_idempotent(demo_checkpoint: Path):
    before = {f: (demo_checkpoint / f).stat().st_mtime_ns for f in FILES}
    assert ensure_demo_checkpoint(demo_checkpoint) == demo_checkpoint
    assert {f: (demo_checkpoint / f).stat().st_mtime_ns for f in FILES} == before
    assert is_complete(demo_checkpoint)
    assert not is_complete(demo_checkpoint, seed=1)


def test_a_truncated_demo_file_makes_the_checkpoint_incomplete(demo_checkpoint: Path, tmp_path: Path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_checkpoint, copy)
    assert is_complete(copy)
    weights = copy / "pytorch_model.bin"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])  # e.g. a full disk, or a copy cut short
    assert not is_complete(copy)

    weights.write_bytes(data)
    assert is_complete(copy)
    (copy / "vocab.json").unlink()
    assert not is_complete(copy)


@pytest.mark.reference
def test_modelscope_loads_demo_checkpoint_unchanged(demo_checkpoint: Path, state):
    """The layout proof: ModelScope's own OFAModel/OFATokenizer.from_pretrained read the directory as is."""
    from load_tests.testkit.reference import install_stand_ins

    install_stand_ins()
    from modelscope.models.multi_modal.ofa import OFAModel as RefOFAModel
    from modelscope.models.multi_modal.ofa import OFATokenizer

    ref = RefOFAModel.from_pretrained(str(demo_checkpoint))
    ref_state = ref.state_dict()
    assert ref_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(ref_state[key], value), key
    tok = OFATokenizer.from_pretrained(str(demo_checkpoint))
    assert len(tok) == 50265
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_strict_loading(state):
    model = OFAModel(ModelConfig.from_dict(DEMO_MODEL_CONFIG))
    model.load_state_dict(state, strict=True)
    missing = dict(state)
    del missing["encoder.layers.0.self_attn.c_attn"]
    with pytest.raises(RuntimeError, match="c_attn"):
        model.load_state_dict(missing, strict=True)
    extra = dict(state)
    extra["decoder.layers.0.weight_ffn"] = torch.ones(256)
    with pytest.raises(RuntimeError, match="weight_ffn"):
        model.load_state_dict(extra, strict=True)


def test_safetensors_checkpoint(demo_checkpoint: Path, state, tmp_path: Path):
    from safetensors.torch import save_file

    from ofa_captioning.captioner import Captioner

    for name in ("config.json", "configuration.json", "vocab.json", "merges.txt"):
        shutil.copy(demo_checkpoint / name, tmp_path / name)
    # safetensors refuses shared storage: store each tensor on its own.
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert find_weights(tmp_path).name == "model.safetensors"
    loaded = load_state_dict(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    pixels = torch.rand(2, 3, 480, 480, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from_bin = Captioner.from_pretrained(demo_checkpoint).generate(pixels, max_length=4)
    from_st = Captioner.from_pretrained(tmp_path).generate(pixels, max_length=4)
    assert from_st == from_bin
    model = Captioner.from_pretrained(tmp_path).model
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight


def test_missing_weights(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_state_dict(tmp_path)


def test_configs_from_files(demo_checkpoint: Path, tmp_path: Path):
    model_cfg, task_cfg = load_configs(demo_checkpoint)
    assert model_cfg.d_model == 256 and model_cfg.resnet_layers == (3, 4, 6)
    assert model_cfg.extra["model_type"] == "ofa"
    assert task_cfg == TaskConfig(
        patch_image_size=480,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        prompt=" what does the image describe?",
        beam_size=5,
        max_len_b=16,
        min_len=1,
        no_repeat_ngram_size=3,
        max_src_length=256,
    )
    # Missing OFAConfig fields take OFAConfig's defaults; task values come from the file.
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "resnet_type": "resnet18"}))
    (tmp_path / "configuration.json").write_text(
        json.dumps(
            {
                "task": "image-captioning",
                "model": {
                    "type": "ofa",
                    "patch_image_size": 384,
                    "imagenet_default_mean_and_std": True,
                    "prompt": " describe",
                    "max_src_length": 80,
                    "beam_search": {"beam_size": 3, "max_len_b": 20, "min_len": 2, "no_repeat_ngram_size": 0},
                },
            }
        )
    )
    model_cfg, task_cfg = load_configs(tmp_path)
    assert (
        model_cfg.d_model == 64 and model_cfg.encoder_layers == 4 and model_cfg.encoder_attention_heads == 8
    )
    assert model_cfg.vocab_size == 59457 and model_cfg.resnet_layers == (2, 2, 2)
    assert (
        task_cfg.patch_image_size == 384 and task_cfg.prompt == " describe" and task_cfg.max_src_length == 80
    )
    assert task_cfg.mean == (0.485, 0.456, 0.406) and task_cfg.std == (0.229, 0.224, 0.225)
    assert (task_cfg.beam_size, task_cfg.max_len_b, task_cfg.min_len, task_cfg.no_repeat_ngram_size) == (
        3,
        20,
        2,
        0,
    )


def test_unsupported_options_are_refused():
    with pytest.raises(NotImplementedError, match="use_ofasys"):
        OFAModel(ModelConfig(d_model=64, use_ofasys=True, vocab_size=100))
    with pytest.raises(ValueError, match="resnet_type"):
        ModelConfig(resnet_type="resnet7").resnet_layers  # noqa: B018
