"""What the engine reads from, and refuses in, config.json / configuration.json / the weights of a family checkpoint.

Every switch the engine does not implement stops the load with a message naming the field and its value (never a
silent fallback); weights are accepted unprefixed or with the ``model.`` prefix of ModelScope's trainer output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ofa_captioning.captioner import Captioner
from ofa_captioning.checkpoint import load_state_dict, strip_trainer_prefix
from ofa_captioning.config import (
    BEAM_SEARCH_REFUSED,
    UNSUPPORTED_SWITCHES,
    ModelConfig,
    TaskConfig,
)


def _variant(demo_checkpoint: Path, out: Path, config: dict | None = None, task: dict | None = None) -> Path:
    """The demo checkpoint (files linked) with config.json / configuration.json fields replaced."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_checkpoint.iterdir():
        if f.is_file() and f.name not in ("config.json", "configuration.json") and not f.name.startswith("."):
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((demo_checkpoint / "config.json").read_text())
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((demo_checkpoint / "configuration.json").read_text())
    for key, value in (task or {}).items():
        section = tcfg
        *parents, leaf = key.split(".")
        for p in parents:
            section = section.setdefault(p, {})
        section[leaf] = value
    (out / "configuration.json").write_text(json.dumps(tcfg))
    return out


REFUSED_CONFIG = [
    *[({name: not expected}, name) for name, (expected, _) in UNSUPPORTED_SWITCHES.items()],
    ({"resnet_type": "resnet200"}, "resnet_type='resnet200'"),
    ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
    ({"encoder_attention_heads": 5}, "encoder_attention_heads=5"),
    ({"decoder_attention_heads": 7}, "decoder_attention_heads=7"),
    ({"d_model": 250}, "does not divide d_model=250"),
    ({"tie_encoder_decoder": True}, "tie_encoder_decoder=True"),
    ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
    ({"decoder_layers": 0}, "decoder_layers=0"),
]


@pytest.mark.parametrize(("change", "named"), REFUSED_CONFIG, ids=[str(c) for c, _ in REFUSED_CONFIG])
def test_unsupported_config_json_is_refused(demo_checkpoint, tmp_path, change, named):
    path = _variant(demo_checkpoint, tmp_path / "ckpt", config=change)
    with pytest.raises(NotImplementedError, match="config.json") as err:
        Captioner.from_pretrained(path)
    message = str(err.value)
    assert named in message
    field = next(iter(change))
    assert f"{field}=" in message or field in message


def test_every_unsupported_switch_named_with_its_value():
    for name, (expected, _) in UNSUPPORTED_SWITCHES.items():
        problems = ModelConfig(**{name: not expected}).unsupported()
        assert len(problems) == 1 and f"{name}={not expected!r}" in problems[0], problems
    assert ModelConfig().unsupported() == []


REFUSED_TASK = [
    *[
        (f"model.beam_search.{name}", value)
        for name, value in [
            ("match_source_len", True),
            ("constraint_range", "4,100"),
            ("search_strategy", "sampling"),
            ("lm_model", "lm.pt"),
            ("gen_code", True),
            ("gen_box", True),
            ("ignore_eos", True),
            ("zero_shot", True),
            ("constraint_trie", "x"),
            ("sampling_topk", 10),
        ]
    ],
    ("model.language", "fr"),
    ("model.multimodal_type", "mmspeech"),
    ("model.gen_type", "traverse"),
    ("model.answer2label", "ans2label.json"),
    ("task", "visual-question-answering"),
]


@pytest.mark.parametrize(("key", "value"), REFUSED_TASK, ids=[k for k, _ in REFUSED_TASK])
def test_unsupported_configuration_json_is_refused(demo_checkpoint, tmp_path, key, value):
    path = _variant(demo_checkpoint, tmp_path / "ckpt", task={key: value})
    with pytest.raises(NotImplementedError, match="configuration.json") as err:
        Captioner.from_pretrained(path)
    assert f"{key.split('.')[-1]}={value!r}" in str(err.value)


@pytest.mark.reference
def test_refused_generator_fields_cover_the_reference_keywords():
    """Every SequenceGenerator keyword is either implemented, inert in the reference, or refused."""
    import inspect

    from load_tests.testkit.reference import install_stand_ins
    from ofa_captioning.config import BEAM_SEARCH_FIELDS, BEAM_SEARCH_INERT

    install_stand_ins()
    from modelscope.models.multi_modal.ofa.generate.sequence_generator import SequenceGenerator

    keywords = set(inspect.signature(SequenceGenerator.__init__).parameters) - {"self", "tokenizer"}
    assert keywords == set(BEAM_SEARCH_FIELDS) | set(BEAM_SEARCH_INERT) | set(BEAM_SEARCH_REFUSED)


@pytest.mark.parametrize(
    ("beam", "model", "message"),
    [
        ({"temperature": 0}, {}, "temperature=0.0 must be greater than 0"),
        ({"beam_size": 2}, {"num_return_sequences": 3}, "num_return_sequences=3 is larger than"),
        ({"beam_size": "5"}, {}, "beam_size='5' must be an integer"),
        ({"normalize_scores": "yes"}, {}, "normalize_scores='yes' must be true or false"),
        ({"max_len_b": 2.5}, {}, "max_len_b=2.5 must be an integer"),
    ],
)
def test_malformed_generator_values(beam, model, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig.from_dict({"task": "image-captioning", "model": {"beam_search": beam, **model}})


def test_generator_fields_and_defaults():
    defaults = TaskConfig.from_dict({})
    assert (defaults.beam_size, defaults.max_len_a, defaults.max_len_b, defaults.min_len) == (5, 0.0, 16, 1)
    assert (defaults.no_repeat_ngram_size, defaults.len_penalty, defaults.temperature) == (3, 1.0, 1.0)
    assert (defaults.unk_penalty, defaults.normalize_scores, defaults.num_return_sequences) == (0.0, True, 1)
    assert (defaults.language, defaults.prompt, defaults.patch_image_size) == (
        "en",
        " what does the image describe?",
        480,
    )
    cfg = TaskConfig.from_dict(
        {
            "task": "image-captioning",
            "model": {
                "language": "cn",
                "num_return_sequences": 2,
                "beam_search": {
                    "beam_size": 10,
                    "max_len_a": 1.5,
                    "max_len_b": 128,
                    "temperature": 0.98,
                    "len_penalty": 0.98,
                    "unk_penalty": 0.5,
                    "normalize_scores": False,
                    # inert in the reference: accepted and ignored as there
                    "max_len": 7,
                    "lm_weight": 2.0,
                    "constraint_range": None,
                    "match_source_len": False,
                },
            },
        }
    )
    assert (cfg.language, cfg.num_return_sequences, cfg.beam_size, cfg.max_len_b) == ("cn", 2, 10, 128)
    assert (cfg.temperature, cfg.len_penalty, cfg.unk_penalty, cfg.normalize_scores) == (
        0.98,
        0.98,
        0.5,
        False,
    )
    # SequenceGenerator: max_len = int(max_len_a * src_len + max_len_b), src_len = prompt tokens with <s>, </s>.
    assert cfg.max_len(8) == 140 and cfg.max_len(9) == 141 and cfg.max_len(8, max_len_b=3) == 15


def test_config_aliases_override_like_ofaconfig():
    """``hidden_size``/``num_attention_heads`` are OFAConfig attribute_map aliases and win over the fields."""
    cfg = ModelConfig.from_dict({"d_model": 256, "hidden_size": 320, "num_attention_heads": 5})
    assert (cfg.d_model, cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (320, 5, 8)


def test_trainer_prefixed_state_dict(demo_checkpoint, tmp_path):
    """ModelScope's trainer saves OfaForAllTasks.state_dict(): every key prefixed ``model.``; it loads as is."""
    state = load_state_dict(demo_checkpoint)
    path = _variant(demo_checkpoint, tmp_path / "prefixed")
    (path / "pytorch_model.bin").unlink()
    torch.save({f"model.{k}": v for k, v in state.items()}, path / "pytorch_model.bin")
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    model = Captioner.from_pretrained(path).model
    params = model.state_dict()
    assert params.keys() == state.keys() and all(torch.equal(params[k], state[k]) for k in state)
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight


def test_mixed_prefixes_are_refused():
    state = {
        "model.encoder.a": torch.zeros(1),
        "model.encoder.b": torch.zeros(1),
        "decoder.c": torch.zeros(1),
    }
    with pytest.raises(ValueError, match="mixes keys") as err:
        strip_trainer_prefix(state, "pytorch_model.bin")
    msg = str(err.value)
    assert "model.encoder.a" in msg and "decoder.c" in msg and "2 prefixed" in msg and "1 unprefixed" in msg
    assert strip_trainer_prefix({"encoder.a": 1}) == {"encoder.a": 1}
    assert strip_trainer_prefix({"model.encoder.a": 1}) == {"encoder.a": 1}
