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
        """Build from a config.json dictionary; unknown keys go to ``extra``, missing ones take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The OFAConfig fields as a JSON-serialisable dictionary (``extra`` merged back in)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        """Bottleneck counts of ResNet stages 1-3 for ``resnet_type``."""
        try:
            return RESNET_LAYERS[self.resnet_type]
        except KeyError:
            raise ValueError(
                f"unsupported resnet_type {self.resnet_type!r}; known: {sorted(RESNET_LAYERS)}"
            ) from None

    def check_supported(self) -> None:
        """Raise ``NotImplementedError`` for switches this engine does not implement (all off in OFA captioning)."""
        unsupported = {
            "use_ofasys": self.use_ofasys,
            "entangle_position_embedding": self.entangle_position_embedding,
            "interpolate_position": self.interpolate_position,
            "use_image_feature=False": not self.use_image_feature,
        }
        on = [name for name, value in unsupported.items() if value]
        if on:
            raise NotImplementedError(f"OFA options not supported by this engine: {', '.join(on)}")
        if self.activation_function not in ("gelu", "relu", "gelu_new", "gelu_fast", "tanh", "silu", "swish"):
            raise NotImplementedError(f"activation_function {self.activation_function!r} not supported")
        self.resnet_layers  # noqa: B018 - validates resnet_type


@dataclass(frozen=True)
class TaskConfig:
    """Captioning task settings from ModelScope's configuration.json (``model`` section)."""

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        """Read the fields with the defaults ModelScope's OFA preprocessor and OfaForAllTasks use."""
        model = data.get("model") or {}
        beam = model.get("beam_search") or {}
        if model.get("imagenet_default_mean_and_std", False):
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        else:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return cls(
            patch_image_size=int(model.get("patch_image_size", 480)),
            mean=mean,
            std=std,
            prompt=str(model.get("prompt", DEFAULT_PROMPT)),
            beam_size=int(beam.get("beam_size", 5)),
            max_len_b=int(beam.get("max_len_b", 16)),
            min_len=int(beam.get("min_len", 1)),
            no_repeat_ngram_size=int(beam.get("no_repeat_ngram_size", 3)),
            max_src_length=int(model.get("max_src_length", 256)),
            len_penalty=float(beam.get("len_penalty", 1.0)),
            language=str(model.get("language", "en")),
            num_return_sequences=int(model.get("num_return_sequences", 1)),
            task=str(data.get("task", "image-captioning")),
        )


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
