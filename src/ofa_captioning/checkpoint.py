"""Locating and loading the weights of a checkpoint directory in ModelScope's layout."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: Prefix of every key of a state dict saved by ModelScope's trainer: it saves ``OfaForAllTasks.state_dict()``,
#: which holds the network as ``self.model``. ModelScope itself loads such a file because transformers strips the
#: base-model prefix ``model`` when every checkpoint key starts with it.
TRAINER_PREFIX = "model."


def find_weights(checkpoint_dir: str | Path) -> Path:
    """Path of the weights file of ``checkpoint_dir`` (``model.safetensors`` preferred over ``pytorch_model.bin``)."""
    directory = Path(checkpoint_dir)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {directory}")


def strip_trainer_prefix(
    state: dict[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """The network's state dict from an unprefixed one (published checkpoints) or a ``model.``-prefixed one
    (ModelScope's trainer output: ``OfaForAllTasks.state_dict()``).

    Either every key carries the prefix or none does; a mix is refused with examples of both kinds, since it means
    the file holds something other than one OFA network.
    """
    prefixed = [k for k in state if k.startswith(TRAINER_PREFIX)]
    if not prefixed:
        return state
    if len(prefixed) != len(state):
        plain = [k for k in state if not k.startswith(TRAINER_PREFIX)]
        raise ValueError(
            f"{source} mixes keys with and without the {TRAINER_PREFIX!r} prefix of ModelScope's trainer output "
            f"({len(prefixed)} prefixed, e.g. {prefixed[:3]}; {len(plain)} unprefixed, e.g. {plain[:3]}); "
            "expected all keys prefixed or none"
        )
    return {k[len(TRAINER_PREFIX) :]: v for k, v in state.items()}


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load the network's state dict of a checkpoint directory onto the CPU.

    ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, so a pickle can only hold tensors and
    plain containers, never code. Tensors that shared storage in the file (the tied token embeddings) may share
    it in the result too; callers copy into their own parameters. Keys prefixed ``model.`` (a fine-tuned output
    of ModelScope's trainer) are returned without the prefix (see :func:`strip_trainer_prefix`).
    """
    path = find_weights(checkpoint_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_trainer_prefix(load_file(str(path), device="cpu"), str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # Some exports nest the weights under "state_dict" or "model".
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict) and not isinstance(state[key], torch.Tensor):
            state = state[key]
    return strip_trainer_prefix(state, str(path))
