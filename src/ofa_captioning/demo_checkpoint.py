"""An offline stand-in for the published checkpoint: a seeded random-weight OFA-tiny in the same layout.

``python -m ofa_captioning.demo_checkpoint DIR`` writes ``config.json``, ``configuration.json``,
``pytorch_model.bin`` (all 541 keys of ModelScope's OFA-tiny, tied embeddings stored once, buffers by formula),
``vocab.json`` + ``merges.txt`` (a BPE trained locally, see :func:`ofa_captioning.demo_vocab.train_demo_bpe`) and a
README. ModelScope's own ``OFAModel.from_pretrained`` and ``OFATokenizer.from_pretrained`` load it unchanged.

Its captions are meaningless. The weights are random but shaped so that the interesting code paths run:

* BatchNorm statistics, LayerNorm affine parameters, relative-position tables and per-head scales ``c_attn`` are
  random (not the identity/zero of a fresh model), so every term of the network is exercised;
* query/key projections are larger than ``init_std`` so attention is peaked and the captions' scores depend on
  the image (this is what lets tests tell images apart);
* the EOS row of the (tied) token embedding is aligned with the final decoder LayerNorm's bias, which adds
  ``EOS_LOGIT_BIAS`` to EOS's logit on top of an image-dependent term. EOS then competes with other tokens, so
  hypotheses finish at different steps and the beam search's finalisation logic runs, as with real weights.

``python -m ofa_captioning.demo_checkpoint --language zh DIR`` writes the Chinese counterpart, in the layout of
ModelScope's Chinese caption checkpoints: a BERT-style ``vocab.txt`` made locally
(:func:`ofa_captioning.demo_vocab.write_demo_vocab_txt`) instead of the BPE files, ``language: zh`` and a Chinese
prompt in configuration.json, ``vocab_size`` = the Chinese tokenizer's length, the same kind of random weights;
its ``<code_*>``/``<bin_*>`` embedding rows are scaled down (``ZH_ADDED_ROW_SCALE``) so that captions are mostly
Chinese characters and word pieces rather than image-code tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .model import OFAModel

__all__ = [
    "DEMO_MODEL_CONFIG",
    "DEMO_TASK_CONFIG",
    "DEMO_TASK_CONFIG_ZH",
    "build_demo_checkpoint",
    "build_demo_checkpoint_zh",
    "ensure_demo_checkpoint",
    "main",
]

FORMAT_VERSION = 3  # bump whenever the weight recipe changes: existing demo checkpoints get rebuilt
STAMP = ".demo-checkpoint.json"
FILES = ("config.json", "configuration.json", "pytorch_model.bin", "vocab.json", "merges.txt", "README.md")
FORMAT_VERSION_ZH = 1  # the Chinese demo checkpoint's recipe (weights or vocab.txt)
FILES_ZH = ("config.json", "configuration.json", "pytorch_model.bin", "vocab.txt", "README.md")
# Scale of the Chinese demo's <code_*>/<bin_*> embedding rows: with a small vocab.txt they would otherwise be
# more than half of the vocabulary and of the random captions.
ZH_ADDED_ROW_SCALE = 0.25

# EOS row norm (scale of the image-dependent part of EOS's logit) and constant EOS logit offset. With these, EOS
# wins some beam slots: hypotheses finish at different steps and the best caption's length varies per image,
# while most searches still run to max_len (the reference's worst case, as in the notes' measurements). Tests
# that need sentences to finish early boost EOS in memory (tests/test_generation.py, test_caption_parity.py).
EOS_LOGIT_BIAS = 0.3
EOS_ROW_NORM = 0.7

# OFA-tiny (OFA-Sys `ofa_tiny_architecture`) as OFAConfig fields; vocabulary = 50265 BPE + 8192 codes + 1000 bins.
DEMO_MODEL_CONFIG: dict = {
    "architectures": ["OFAModel"],
    "model_type": "ofa",
    "vocab_size": 59457,
    "max_position_embeddings": 1024,
    "d_model": 256,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "activation_function": "gelu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "init_std": 0.02,
    "scale_embedding": False,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "forced_eos_token_id": 2,
    "is_encoder_decoder": True,
    "use_cache": True,
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "normformer": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "resnet_type": "resnet50",
    "resnet_model_path": None,
    "resnet_drop_path_rate": 0.0,
    "encoder_drop_path_rate": 0.0,
    "decoder_drop_path_rate": 0.0,
    "token_bucket_size": 256,
    "image_bucket_size": 42,
    "add_type_embedding": True,
    "share_decoder_input_output_embed": True,
    "attn_scale_factor": 2.0,
    "code_image_size": 128,
    "entangle_position_embedding": False,
    "interpolate_position": False,
    "orig_patch_image_size": 224,
    "share_attn_bias": False,
    "use_image_feature": True,
    "disable_entangle": False,
    "use_ofasys": False,
    "use_gamma_feature": False,
    "exclude_mlp": True,
    "temperature_init_value": None,
}

# ModelScope task configuration of the English captioning model (iic/ofa_image-caption_coco_distilled_en).
DEMO_TASK_CONFIG: dict = {
    "framework": "pytorch",
    "task": "image-captioning",
    "pipeline": {"type": "image-captioning"},
    "model": {
        "type": "ofa",
        "language": "en",
        "gen_type": "generation",
        "patch_image_size": 480,
        "max_image_size": 480,
        "imagenet_default_mean_and_std": False,
        "max_src_length": 256,
        "prompt": " what does the image describe?",
        "beam_search": {"beam_size": 5, "max_len_b": 16, "min_len": 1, "no_repeat_ngram_size": 3},
        "seed": 7,
    },
    "preprocessor": {"type": "ofa-image-caption"},
}

# The Chinese demo: the same task configuration with ModelScope's language switch and the Chinese caption prompt
# of OFA-Sys (its training data code; the Tutorial tokenizes it with the leading space).
DEMO_TASK_CONFIG_ZH: dict = {
    **DEMO_TASK_CONFIG,
    "model": {**DEMO_TASK_CONFIG["model"], "language": "zh", "prompt": " 图片描述了什么内容?"},
}

README = """\
# OFA-tiny demo checkpoint (random weights)

Written by `python -m ofa_captioning.demo_checkpoint DIR` (seed {seed}, format {version}). It has exactly the
layout of ModelScope's `iic/ofa_image-caption_coco_distilled_en` (config.json, configuration.json,
pytorch_model.bin, vocab.json, merges.txt) so that the whole stack can be built and tested offline.

**Its captions are meaningless**: the weights are random and the BPE vocabulary was trained locally on
synthetic text (token ids are not BART's). Use `python -m ofa_captioning.download` for the real model.

The random weights are shaped for testing: random BatchNorm statistics, LayerNorm affine parameters,
relative-position tables and head scales; peaked attention so scores depend on the image; and the EOS
embedding row aligned with the final decoder LayerNorm bias (EOS logit offset {eos_bias}), so that EOS competes:
beam-search hypotheses finish at different steps and the best caption's length varies per image.
"""


README_ZH = """\
# OFA-tiny Chinese demo checkpoint (random weights)

Written by `python -m ofa_captioning.demo_checkpoint --language zh DIR` (seed {seed}, format {version}). It has
the layout of ModelScope's Chinese caption checkpoints (config.json, configuration.json with `language: zh`,
pytorch_model.bin, vocab.txt) so that the Chinese path can be built and tested offline.

**Its captions are meaningless**: the weights are random and vocab.txt ({vocab_lines} lines) was made locally
(token ids are not bert-base-chinese's). The random weights are shaped as in the English demo checkpoint; in
addition the `<code_*>`/`<bin_*>` embedding rows are scaled by {row_scale} so that captions are mostly Chinese
characters and word pieces.
"""


@torch.no_grad()
def _init_weights(model: OFAModel, seed: int) -> None:
    """Deterministic random weights (pure RNG draws, no data-dependent calibration)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.init_std

    def normal_(t: torch.Tensor, s: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * s + mean)

    def uniform_(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            normal_(module.weight, math.sqrt(2.0 / fan_in))
        elif isinstance(module, nn.BatchNorm2d):
            last_in_branch = name.endswith("bn3") or name.endswith("downsample.1")
            # Small residual-branch gains keep the activations of 13+ bottlenecks in a sane range.
            low, high = (0.2, 0.5) if last_in_branch else (0.7, 1.3)
            uniform_(module.weight, low, high)
            normal_(module.bias, 0.1)
            normal_(module.running_mean, 0.1)
            uniform_(module.running_var, 0.5, 2.0)
            module.num_batches_tracked.zero_()
        elif isinstance(module, nn.LayerNorm):
            normal_(module.weight, 0.1, mean=1.0)
            normal_(module.bias, 0.05)
        elif isinstance(module, nn.Linear):
            if name.endswith("output_projection"):
                continue  # tied to the token embedding
            is_qk = name.endswith(("q_proj", "k_proj", "pos_q_linear", "pos_k_linear"))
            normal_(module.weight, 0.1 if is_qk else std)
            if module.bias is not None:
                normal_(module.bias, std)
        elif isinstance(module, nn.Embedding):
            if "rel_pos_table" in name:
                normal_(module.weight, 0.5)
            else:
                normal_(module.weight, std)
    for name, param in model.named_parameters():
        if name.endswith("c_attn"):
            uniform_(param, 0.5, 1.5)

    # EOS competes: its embedding row points along the final LayerNorm's bias direction.
    eos = model.config.eos_token_id
    direction = torch.randn(model.config.d_model, generator=gen)
    direction /= direction.norm()
    final_ln = model.decoder.layer_norm
    bias_norm = EOS_LOGIT_BIAS / EOS_ROW_NORM
    final_ln.bias.copy_(final_ln.bias + direction * bias_norm)
    model.encoder.embed_tokens.weight[eos].copy_(direction * EOS_ROW_NORM)


def build_demo_checkpoint(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the demo checkpoint into ``out_dir`` (created; existing files are replaced). Returns its path."""
    from .demo_vocab import train_demo_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(DEMO_MODEL_CONFIG)
    model = OFAModel(config)
    _init_weights(model, seed)
    state = model.state_dict()
    # Files are written under temporary names and renamed, so a reader never sees a half-written file.
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tmp_dir = Path(tmp)
        torch.save(state, tmp_dir / "pytorch_model.bin")
        (tmp_dir / "config.json").write_text(json.dumps(DEMO_MODEL_CONFIG, indent=2) + "\n", encoding="utf-8")
        (tmp_dir / "configuration.json").write_text(
            json.dumps(DEMO_TASK_CONFIG, indent=2) + "\n", encoding="utf-8"
        )
        (tmp_dir / "README.md").write_text(
            README.format(seed=seed, version=FORMAT_VERSION, eos_bias=EOS_LOGIT_BIAS), encoding="utf-8"
        )
        train_demo_bpe(tmp_dir, vocab_size=config.vocab_size - 8192 - 1000, seed=seed)
        for name in FILES:
            os.replace(tmp_dir / name, out / name)
    _write_stamp(out, seed, "en")
    return out


def build_demo_checkpoint_zh(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the Chinese demo checkpoint into ``out_dir`` (created; existing files are replaced). Returns its path."""
    from .demo_vocab import write_demo_vocab_txt
    from .tokenizer import OFATokenizerZH

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tmp_dir = Path(tmp)
        vocab_path = write_demo_vocab_txt(tmp_dir)
        tokenizer = OFATokenizerZH.from_pretrained(tmp_dir)
        model_config = {**DEMO_MODEL_CONFIG, "vocab_size": len(tokenizer)}
        model = OFAModel(ModelConfig.from_dict(model_config))
        _init_weights(model, seed)
        with torch.no_grad():
            first_added = tokenizer.mask_id + 1
            model.encoder.embed_tokens.weight[first_added:] *= ZH_ADDED_ROW_SCALE
        torch.save(model.state_dict(), tmp_dir / "pytorch_model.bin")
        (tmp_dir / "config.json").write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
        (tmp_dir / "configuration.json").write_text(
            json.dumps(DEMO_TASK_CONFIG_ZH, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp_dir / "README.md").write_text(
            README_ZH.format(
                seed=seed,
                version=FORMAT_VERSION_ZH,
                vocab_lines=tokenizer.vocab_size,
                row_scale=ZH_ADDED_ROW_SCALE,
            ),
            encoding="utf-8",
        )
        assert vocab_path.name in FILES_ZH
        for name in FILES_ZH:
            os.replace(tmp_dir / name, out / name)
    _write_stamp(out, seed, "zh")
    return out


def _stamp(seed: int, language: str) -> dict:
    if language == "en":
        return {"seed": seed, "format": FORMAT_VERSION}
    return {"seed": seed, "format": FORMAT_VERSION_ZH, "language": language}


def _file_sizes(out: Path, language: str) -> dict[str, int]:
    return {name: (out / name).stat().st_size for name in (FILES if language == "en" else FILES_ZH)}


def _write_stamp(out: Path, seed: int, language: str) -> None:
    # The files' sizes go into the stamp, so that a file truncated or emptied later is noticed and rebuilt.
    stamp = {**_stamp(seed, language), "sizes": _file_sizes(out, language)}
    (out / STAMP).write_text(json.dumps(stamp) + "\n", encoding="utf-8")


def _check_demo_language(language: str) -> None:
    if language not in ("en", "zh"):
        raise ValueError(f"demo checkpoints exist for languages en and zh, not {language!r}")


def is_complete(out_dir: str | os.PathLike, seed: int = 0, language: str = "en") -> bool:
    """Whether ``out_dir`` holds a complete demo checkpoint of ``language`` built with ``seed`` by this format,
    every file of the size it was written with."""
    _check_demo_language(language)
    out = Path(out_dir)
    try:
        stamp = json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict):
        return False
    sizes = stamp.pop("sizes", None)
    if stamp != _stamp(seed, language):
        return False
    try:
        return sizes == _file_sizes(out, language)
    except OSError:  # a file is missing
        return False


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_demo_checkpoint(out_dir: str | os.PathLike, seed: int = 0, language: str = "en") -> Path:
    """Build the demo checkpoint of ``language`` (en, zh) in ``out_dir`` unless a complete one is there (safe across
    processes)."""
    _check_demo_language(language)
    out = Path(out_dir)
    if is_complete(out, seed, language):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if not is_complete(out, seed, language):
            if out.exists() and (out / STAMP).exists():
                (out / STAMP).unlink()
            if language == "en":
                build_demo_checkpoint(out, seed)
            else:
                build_demo_checkpoint_zh(out, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m ofa_captioning.demo_checkpoint DIR [--language en|zh] [--seed N] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--language",
        choices=("en", "zh"),
        default="en",
        help="en: BPE vocabulary; zh: vocab.txt, Chinese prompt",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete checkpoint is there")
    args = parser.parse_args(argv)
    if args.force and args.directory.exists():
        (args.directory / STAMP).unlink(missing_ok=True)
    path = ensure_demo_checkpoint(args.directory, args.seed, args.language)
    print(f"demo checkpoint (random weights, captions are meaningless): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
