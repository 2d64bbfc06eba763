"""Configuration of an OFA checkpoint directory in ModelScope's layout.

Two files describe a checkpoint:

* ``config.json`` holds the network's hyper-parameters (the fields of ModelScope's ``OFAConfig``); any field it
  omits takes ``OFAConfig``'s default, exactly as ``OFAConfig(**json)`` would.
* ``configuration.json`` is ModelScope's task configuration: image size, prompt, normalisation and the beam-search
  defaults under ``model``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bottleneck counts of the three ResNet stages OFA uses (it drops stage 4). resnet18/34 keep the Bottleneck
# block too, as in OFA's own code.
RESNET_LAYERS: dict[str, tuple[int, int, int]] = {
    "resnet18": (2, 2, 2),
    "resnet34": (3, 4, 6),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

DEFAULT_PROMPT = " what does the image describe?"

#: ``OFAConfig.attribute_map``: config.json keys that set another field.
CONFIG_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

#: ``activation_function`` values (transformers' ``ACT2FN`` names, which ModelScope's layers use) the engine
#: implements, with the function each is (the parity tests compare them with ``ACT2FN``).
ACTIVATIONS = {
    "gelu": "exact GELU",
    "gelu_new": "tanh-approximated GELU",
    "gelu_fast": "tanh-approximated GELU",
    "gelu_pytorch_tanh": "tanh-approximated GELU",
    "relu": "ReLU",
    "silu": "SiLU",
    "swish": "SiLU",
    "tanh": "tanh",
}

#: Switches of OFAConfig the engine does not implement: field -> (the only value accepted, what the other does).
#: Every published ResNet caption checkpoint (tiny ... huge, English and Chinese) has the accepted values.
UNSUPPORTED_SWITCHES: dict[str, tuple[Any, str]] = {
    "use_ofasys": (False, "the 6B model's ViT backbone and position layout"),
    "entangle_position_embedding": (False, "absolute positions added to the token and patch embeddings"),
    "interpolate_position": (False, "bilinearly resized image position embeddings"),
    "use_image_feature": (True, "a text-only encoder without the image branch"),
}

#: Size fields that must be positive integers.
POSITIVE_INTS = (
    "d_model",
    "vocab_size",
    "encoder_layers",
    "decoder_layers",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
    "token_bucket_size",
    "image_bucket_size",
)


@dataclass(frozen=True)
class ModelConfig:
    """Network hyper-parameters; field names and defaults are those of ModelScope's ``OFAConfig``."""

    vocab_size: int = 59457
    max_position_embeddings: int = 1024
    encoder_layers: int = 4
    encoder_ffn_dim: int = 512 * 4
    encoder_attention_heads: int = 8
    decoder_layers: int = 4
    decoder_ffn_dim: int = 512 * 4
    decoder_attention_heads: int = 8
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    use_cache: bool = True
    is_encoder_decoder: bool = True
    activation_function: str = "gelu"
    d_model: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    classifier_dropout: float = 0.0
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    decoder_start_token_id: int = 0
    eos_token_id: int = 2
    forced_eos_token_id: int = 2
    encoder_normalize_before: bool = True
    decoder_normalize_before: bool = True
    normformer: bool = True
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    layernorm_embedding: bool = True
    patch_layernorm_embedding: bool = True
    resnet_type: str = "resnet101"
    resnet_model_path: str | None = None
    resnet_drop_path_rate: float = 0.0
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    add_type_embedding: bool = True
    share_decoder_input_output_embed: bool = True
    attn_scale_factor: float = 2.0
    code_layernorm_embedding: bool = True
    code_image_size: int = 128
    entangle_position_embedding: bool = False
    interpolate_position: bool = False
    orig_patch_image_size: int = 224
    share_attn_bias: bool = False
    use_image_feature: bool = True
    disable_entangle: bool = False
    use_ofasys: bool = False
    vit_type: str = "vit_base"
    vit_drop_path_rate: float = 0.0
    use_gamma_feature: bool = False
    gamma: float = 1.0
    exclude_mlp: bool = True
    temperature_init_value: float | None = None
    remove_decoder_type_embedding: bool = False
    mlp_dim: int = 512
    # Keys of config.json that are not OFAConfig fields (architectures, model_type, ...), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dictionary; unknown keys go to ``extra``, missing ones take the defaults.

        ``hidden_size`` and ``num_attention_heads`` are ``OFAConfig``'s aliases (its ``attribute_map``) of
        ``d_model`` and ``encoder_attention_heads``; as in ``OFAConfig(**json)``, an alias overrides the field.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for alias, name in CONFIG_ALIASES.items():
            if alias in data:
                known[name] = data[alias]
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The OFAConfig fields as a JSON-serialisable dictionary (``extra`` merged back in)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        extra = {k: v for k, v in self.extra.items() if k not in CONFIG_ALIASES}
        return {**extra, **out}

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        """Bottleneck counts of ResNet stages 1-3 for ``resnet_type``."""
        try:
            return RESNET_LAYERS[self.resnet_type]
        except KeyError:
            raise ValueError(
                f"config.json: resnet_type={self.resnet_type!r} is not supported; known: {sorted(RESNET_LAYERS)}"
            ) from None

    def unsupported(self) -> list[str]:
        """One message per config.json field whose value this engine does not implement (empty: supported).

        Every message names the field and its value. Switches the engine implements (NormFormer on/off, pre- or
        post-LN, embedding layer norms, type embedding, ``scale_embedding``, ``share_attn_bias``,
        ``use_gamma_feature``, untied output projection, the activations of :data:`ACTIVATIONS`, any sizes)
        are verified against ModelScope's OFAModel by the parity tests and are not listed here.
        """
        problems = [
            f"config.json: {name}={getattr(self, name)!r} is not supported by this engine ({why})"
            for name, (expected, why) in UNSUPPORTED_SWITCHES.items()
            if getattr(self, name) != expected
        ]
        if self.resnet_type not in RESNET_LAYERS:
            problems.append(
                f"config.json: resnet_type={self.resnet_type!r} is not supported; known: {sorted(RESNET_LAYERS)}"
            )
        if self.activation_function not in ACTIVATIONS:
            problems.append(
                f"config.json: activation_function={self.activation_function!r} is not supported; "
                f"implemented: {sorted(ACTIVATIONS)}"
            )
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if not isinstance(heads, int) or heads < 1 or self.d_model % heads:
                problems.append(
                    f"config.json: {side}_attention_heads={heads!r} does not divide d_model={self.d_model!r}"
                )
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"config.json: {name}={value!r} must be a positive integer")
        # PretrainedConfig fields that would change the network when OFAModel.from_pretrained builds it.
        if self.extra.get("tie_encoder_decoder"):
            problems.append(
                f"config.json: tie_encoder_decoder={self.extra['tie_encoder_decoder']!r} is not supported "
                "(transformers would tie the encoder's weights to the decoder's)"
            )
        if self.extra.get("pruned_heads"):
            problems.append(
                f"config.json: pruned_heads={self.extra['pruned_heads']!r} is not supported (attention heads removed)"
            )
        return problems

    def check_supported(self) -> None:
        """Raise ``NotImplementedError`` naming every field (and its value) this engine cannot run exactly."""
        problems = self.unsupported()
        if problems:
            raise NotImplementedError("; ".join(problems))


#: ``model.beam_search`` fields of configuration.json: each is a keyword of ModelScope's ``SequenceGenerator``.
#: These are implemented with the reference's semantics (defaults: OfaForAllTasks' own, else the generator's).
BEAM_SEARCH_FIELDS = (
    "beam_size",
    "max_len_a",
    "max_len_b",
    "min_len",
    "no_repeat_ngram_size",
    "len_penalty",
    "temperature",
    "unk_penalty",
    "normalize_scores",
)

#: Generator keywords that ask for behaviour the engine lacks: field -> (values that ask for nothing, meaning).
BEAM_SEARCH_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "match_source_len": ((False, None), "output length tied to the source length"),
    "constraint_range": ((None,), "vocabulary constraints"),
    "constraint_trie": ((None,), "vocabulary constraints"),
    "search_strategy": ((None,), "another search (sampling, constrained search, ...)"),
    "lm_model": ((None,), "language-model fusion"),
    "gen_code": ((False, None), "image-code generation"),
    "gen_box": ((False, None), "box generation"),
    "ignore_eos": ((False, None), "generation past EOS"),
    "zero_shot": ((False, None), "zero-shot constraints"),
}

#: Generator keywords ModelScope accepts but never uses on this path (stored only), so they change nothing.
BEAM_SEARCH_INERT = ("max_len", "eos", "symbols_to_strip_from_output", "lm_weight")

#: configuration.json ``model.language`` values ModelScope accepts (OfaForAllTasks / OfaBasePreprocessor).
LANGUAGES = ("en", "zh", "cn")

#: Floating-point types the engine runs in (``Captioner.from_pretrained(dtype=...)``, the ``dtype`` setting).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Each accepted spelling (lower case, without a ``torch.`` prefix) and the type it names.
_DTYPE_SPELLINGS = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def parse_dtype(value: object) -> str:
    """The name in :data:`DTYPE_NAMES` that ``value`` spells (``"fp16"``, ``"torch.bfloat16"``, ``torch.float32``,
    any case); ``ValueError`` naming the accepted types otherwise."""
    name = _DTYPE_SPELLINGS.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
    return name


def _number(section: str, name: str, value: Any, kind: type, low: float | None = None) -> Any:
    """``value`` as ``kind`` (int or float), refusing booleans, strings and non-integral ints."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int and not float(value).is_integer():
        ok = False
    if ok and low is not None and value < low:
        ok = False
    if not ok:
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(
            f"configuration.json: {section}{name}={value!r} must be a{'n integer' if kind is int else ' number'}{bound}"
        )
    return kind(value)


@dataclass(frozen=True)
class TaskConfig:
    """Captioning task settings from ModelScope's configuration.json (``task`` and the ``model`` section).

    Defaults are the reference's: ``OfaForAllTasks`` / the OFA preprocessor for the ``model`` fields, its generator
    arguments (beam 5, max_len_b 16, min_len 1, no_repeat_ngram_size 3) updated from ``model.beam_search``, and
    ``SequenceGenerator``'s own defaults for the rest (max_len_a 0, len_penalty 1, temperature 1, unk_penalty 0,
    normalize_scores true). The longest caption is ``int(max_len_a * source_length + max_len_b)`` tokens before
    EOS, where the source length counts the prompt's tokens including ``<s>`` and ``</s>`` (see
    :meth:`max_len`).
    """

    patch_image_size: int = 480
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    prompt: str = DEFAULT_PROMPT
    beam_size: int = 5
    max_len_b: int = 16
    min_len: int = 1
    no_repeat_ngram_size: int = 3
    max_src_length: int = 256
    len_penalty: float = 1.0
    language: str = "en"
    num_return_sequences: int = 1
    task: str = "image-captioning"
    max_len_a: float = 0.0
    temperature: float = 1.0
    unk_penalty: float = 0.0
    normalize_scores: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        """Read configuration.json; refuse (``NotImplementedError`` naming the field and value) what the engine
        cannot reproduce, ``ValueError`` for malformed values."""
        task = data.get("task", "image-captioning")
        if task != "image-captioning":
            raise NotImplementedError(
                f"configuration.json: task={task!r} is not supported (image-captioning only)"
            )
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"configuration.json: model must be an object, got {model!r}")
        language = model.get("language", "en")
        if language not in LANGUAGES:
            raise NotImplementedError(
                f"configuration.json: model.language={language!r} is not supported; known: {list(LANGUAGES)}"
            )
        refused = {
            "multimodal_type": (("default", None), "speech or text2sql models"),
            "gen_type": (("generation", None), "classification by traversal"),
            "answer2label": ((None, "", {}), "answers constrained by a label trie"),
        }
        for name, (ok, meaning) in refused.items():
            if model.get(name) not in ok:
                raise NotImplementedError(
                    f"configuration.json: model.{name}={model.get(name)!r} is not supported ({meaning})"
                )
        beam = model.get("beam_search") or {}
        if not isinstance(beam, dict):
            raise ValueError(f"configuration.json: model.beam_search must be an object, got {beam!r}")
        for name, value in beam.items():
            if name in BEAM_SEARCH_REFUSED:
                ok, meaning = BEAM_SEARCH_REFUSED[name]
                if value not in ok:
                    raise NotImplementedError(
                        f"configuration.json: model.beam_search.{name}={value!r} is not supported ({meaning})"
                    )
            elif name not in BEAM_SEARCH_FIELDS and name not in BEAM_SEARCH_INERT:
                # ModelScope would fail too: SequenceGenerator takes no such keyword.
                raise NotImplementedError(
                    f"configuration.json: model.beam_search.{name}={value!r} is not a generator setting this "
                    f"engine implements; known: {sorted(BEAM_SEARCH_FIELDS)}"
                )
        if model.get("imagenet_default_mean_and_std", False):
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        else:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        b = "model.beam_search."
        normalize = beam.get("normalize_scores", True)
        if not isinstance(normalize, bool):
            raise ValueError(f"configuration.json: {b}normalize_scores={normalize!r} must be true or false")
        config = cls(
            patch_image_size=_number(
                "model.", "patch_image_size", model.get("patch_image_size", 480), int, 16
            ),
            mean=mean,
            std=std,
            prompt=str(model.get("prompt", DEFAULT_PROMPT)),
            beam_size=_number(b, "beam_size", beam.get("beam_size", 5), int, 1),
            max_len_b=_number(b, "max_len_b", beam.get("max_len_b", 16), int),
            min_len=_number(b, "min_len", beam.get("min_len", 1), int),
            no_repeat_ngram_size=_number(b, "no_repeat_ngram_size", beam.get("no_repeat_ngram_size", 3), int),
            max_src_length=_number("model.", "max_src_length", model.get("max_src_length", 256), int, 0),
            len_penalty=_number(b, "len_penalty", beam.get("len_penalty", 1.0), float),
            language=language,
            num_return_sequences=_number(
                "model.", "num_return_sequences", model.get("num_return_sequences", 1), int, 1
            ),
            task=task,
            max_len_a=_number(b, "max_len_a", beam.get("max_len_a", 0), float),
            temperature=_number(b, "temperature", beam.get("temperature", 1.0), float),
            unk_penalty=_number(b, "unk_penalty", beam.get("unk_penalty", 0.0), float),
            normalize_scores=normalize,
        )
        if config.temperature <= 0:  # SequenceGenerator asserts it
            raise ValueError(
                f"configuration.json: {b}temperature={config.temperature!r} must be greater than 0"
            )
        if config.num_return_sequences > config.beam_size:  # OfaForAllTasks.inference asserts it
            raise ValueError(
                f"configuration.json: model.num_return_sequences={config.num_return_sequences} is larger than "
                f"{b}beam_size={config.beam_size}"
            )
        return config

    def max_len(self, source_length: int, max_len_b: int | None = None) -> int:
        """The most tokens before EOS, as ``SequenceGenerator``: ``int(max_len_a * source_length + max_len_b)``.

        ``source_length`` is the width of the encoder's text input (prompt tokens with ``<s>`` and ``</s>``);
        ``max_len_b`` defaults to the configured one.
        """
        b = self.max_len_b if max_len_b is None else max_len_b
        return int(self.max_len_a * source_length + b)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def load_model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` of a checkpoint directory."""
    return ModelConfig.from_dict(_read_json(Path(checkpoint_dir) / "config.json"))


def load_task_config(checkpoint_dir: str | Path) -> TaskConfig:
    """Read ``configuration.json`` of a checkpoint directory (defaults when the file is absent)."""
    path = Path(checkpoint_dir) / "configuration.json"
    return TaskConfig.from_dict(_read_json(path) if path.exists() else {})


def load_configs(checkpoint_dir: str | Path) -> tuple[ModelConfig, TaskConfig]:
    """Read ``config.json`` and ``configuration.json`` of a checkpoint directory."""
    return load_model_config(checkpoint_dir), load_task_config(checkpoint_dir)
