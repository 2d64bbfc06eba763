"""OFA image captioning engine: ModelScope's OFA captioning reimplemented for fast, exact batched inference.

>>> from ofa_captioning import Captioner
>>> captioner = Captioner.from_pretrained("checkpoints/ofa-tiny-demo")
>>> captioner.caption([image_bytes])  # [Caption(text=..., score=...)]

Modules: ``config`` (config.json/configuration.json), ``checkpoint`` (weights), ``model`` (the network),
``generate`` (beam search), ``captioner`` (the API), ``tokenizer``, ``preprocess``, ``demo_checkpoint``,
``download``. Attributes below are imported lazily, so ``import ofa_captioning.images`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Caption",
    "Captioner",
    "ImageDecodeError",
    "ModelConfig",
    "OFATokenizer",
    "TaskConfig",
    "ensure_demo_checkpoint",
    "load_configs",
    "preprocess_images",
]

_LAZY = {
    "Caption": "captioner",
    "Captioner": "captioner",
    "ModelConfig": "config",
    "TaskConfig": "config",
    "load_configs": "config",
    "OFATokenizer": "tokenizer",
    "ImageDecodeError": "images",
    "preprocess_images": "images",
    "ensure_demo_checkpoint": "demo_checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ofa_captioning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
