"""The tensors of the served models, stated once: names, Triton data types and dims (without the batch
dimension).

Public (the ``caption`` ensemble, what clients send and receive): inputs ``image`` and the optional generation
settings ``beam_size``, ``max_length``, ``num_captions``; outputs ``caption``, ``score`` (the best caption) and
``captions``, ``scores`` (the n best). Internal: ``pixel_values``, ``preprocess`` -> ``ofa``, uint8
``[3, S, S]`` with S the checkpoint's ``patch_image_size`` (:func:`pixel_values`).

The committed ``model_repository/*/config.pbtxt`` files spell these out, since tritonserver reads nothing else;
tests/serving/test_model_repository.py parses them and checks that they say what :data:`MODEL_TENSORS` says.
The adapters check ``pixel_values`` against their checkpoint at load and ``ofa_serving.repository`` sizes it for
each generated model, both through :func:`pixel_values`. No import beyond the standard library: the adapters
import this module in the Python backend's stub.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BEAM_SIZE",
    "CAPTION",
    "CAPTIONS",
    "COMMITTED_IMAGE_SIZE",
    "ENSEMBLE_STEPS",
    "GENERATION_SETTINGS",
    "IMAGE",
    "MAX_LENGTH",
    "MODEL_TENSORS",
    "ModelTensors",
    "NUM_CAPTIONS",
    "OUTPUTS",
    "PIXEL_VALUES",
    "SCORE",
    "SCORES",
    "Tensor",
    "pixel_values",
]


@dataclass(frozen=True)
class Tensor:
    """One input or output as a config.pbtxt declares it."""

    name: str
    #: Triton's data type name (``TYPE_STRING`` is Triton's variable-length bytes, BYTES on the wire).
    data_type: str
    #: Without the batch dimension; -1 = varies per request.
    dims: tuple[int, ...]
    #: An input the request may leave out.
    optional: bool = False


#: One encoded image file per row (or its base64 text).
IMAGE = Tensor("image", "TYPE_STRING", (1,))
#: Generation settings, one per row; absent = the checkpoint's defaults. Tensors, not request parameters, so
#: that the response cache keys on them.
BEAM_SIZE = Tensor("beam_size", "TYPE_INT32", (1,), optional=True)
MAX_LENGTH = Tensor("max_length", "TYPE_INT32", (1,), optional=True)
NUM_CAPTIONS = Tensor("num_captions", "TYPE_INT32", (1,), optional=True)
GENERATION_SETTINGS = (BEAM_SIZE, MAX_LENGTH, NUM_CAPTIONS)

#: The best caption of each image (UTF-8) and its beam-search score.
CAPTION = Tensor("caption", "TYPE_STRING", (1,))
SCORE = Tensor("score", "TYPE_FP32", (1,))
#: The ``num_captions`` best captions of each image and their scores, best first.
CAPTIONS = Tensor("captions", "TYPE_STRING", (-1,))
SCORES = Tensor("scores", "TYPE_FP32", (-1,))
OUTPUTS = (CAPTION, SCORE, CAPTIONS, SCORES)

#: S of the committed configs: the ``patch_image_size`` of the published checkpoint and of the demo one.
COMMITTED_IMAGE_SIZE = 480


def pixel_values(size: int = COMMITTED_IMAGE_SIZE) -> Tensor:
    """``pixel_values`` for a checkpoint whose ``patch_image_size`` is ``size``: the resized RGB bytes, uint8
    ``[3, size, size]`` (``ofa`` normalizes them on the model's device)."""
    return Tensor("pixel_values", "TYPE_UINT8", (3, size, size))


#: ``pixel_values`` as committed (S = :data:`COMMITTED_IMAGE_SIZE`).
PIXEL_VALUES = pixel_values()


@dataclass(frozen=True)
class ModelTensors:
    """The inputs and outputs of one model, in the order its config.pbtxt lists them."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


#: The tensors of each committed model.
MODEL_TENSORS = {
    "caption": ModelTensors(inputs=(IMAGE, *GENERATION_SETTINGS), outputs=OUTPUTS),
    "preprocess": ModelTensors(inputs=(IMAGE,), outputs=(PIXEL_VALUES,)),
    "ofa": ModelTensors(inputs=(PIXEL_VALUES, *GENERATION_SETTINGS), outputs=OUTPUTS),
}

#: The steps of the ``caption`` ensemble, in order; each maps its model's tensors to ensemble tensors of the
#: same name.
ENSEMBLE_STEPS = ("preprocess", "ofa")
