"""OFA image captioning engine: ModelScope's OFA captioning reimplemented for fast, exact batched inference.

>>> from ofa_captioning import Captioner
>>> captioner = Captioner.from_pretrained("checkpoints/ofa-tiny-demo")
>>> captioner.caption([image_bytes])  # [Caption(text=..., score=...)]

Modules:

* ``captioner`` - the API: :class:`Captioner` (checkpoint directory in, captions out) and :class:`Caption`;
* ``config`` - config.json (network hyper-parameters) and configuration.json (task and generation settings),
  the accepted languages and dtypes;
* ``checkpoint`` - loading the weights (``pytorch_model.bin`` or ``model.safetensors``);
* ``tokenizer`` - OFA's English (BPE) and Chinese (WordPiece) tokenizers and the caption clean-up;
* ``images`` - image decoding and pixels: float32 in one step, or uint8 resized then normalized on the device;
* ``model`` - :class:`~ofa_captioning.model.OFAModel`, the network assembled and prepared for inference;
* ``resnet`` - the image embedding (ResNet stem and three bottleneck stages, BatchNorm folding);
* ``transformer`` - attention, encoder and decoder layers, and the incremental decoder state;
* ``kernels`` - how convolutions and linear layers run: oneDNN fast paths on a CPU, plain-PyTorch fallback;
* ``beam_search`` - the batched beam search with the reference generator's semantics;
* ``demo_checkpoint`` - a small random-weight checkpoint in the published layout (offline stand-in);
* ``demo_vocab`` - the demo checkpoints' vocabularies (a small-corpus BPE, a Chinese ``vocab.txt``);
* ``download`` - fetching the published checkpoint from ModelScope.

Attributes below are imported lazily, so ``import ofa_captioning.images`` stays light (no torch).
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
