"""Locating and loading the weights of a checkpoint directory in ModelScope's layout."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_weights(checkpoint_dir: str | Path) -> Path:
    """Path of the weights file of ``checkpoint_dir`` (``model.safetensors`` preferred over ``pytorch_model.bin``)."""
    directory = Path(checkpoint_dir)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {directory}")


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load the state dict of a checkpoint directory onto the CPU.

    ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, so a pickle can only hold tensors and
    plain containers, never code. Tensors that shared storage in the file (the tied token embeddings) may share
    it in the result too; callers copy into their own parameters.
    """
    path = find_weights(checkpoint_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # Some exports nest the weights under "state_dict" or "model".
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict) and not isinstance(state[key], torch.Tensor):
            state = state[key]
    return state
