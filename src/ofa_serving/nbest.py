"""n-best captions on the wire: the ``num_captions`` input and the ``captions``/``scores`` outputs of ``ofa``.

A request asks for up to beam_size captions per image with the optional INT32 ``[1]`` input ``num_captions``
(absent = the checkpoint's ``num_return_sequences``). Its answer holds them as ``captions`` (BYTES) and
``scores`` (FP32), both ``[images, n]``, best first; ``caption``/``score`` stay the best one. One request gets
one ``n`` for all its images: rows that ask for different values make the request INVALID_ARG (the outputs are
rectangular, and a padded row would look like an answer). An image for which the engine found fewer than ``n``
hypotheses (only after non-finite scores) is padded with an empty caption and a score of ``-inf``, the same
convention as the engine's ``generate`` for an image without any hypothesis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batching import RequestError
from .tensors import CAPTION, CAPTIONS, SCORE, SCORES

__all__ = ["EMPTY", "request_num_captions", "pad_captions", "n_best_arrays"]


@dataclass(frozen=True)
class _EmptyCaption:
    """A caption slot the engine could not fill: no text, the lowest score."""

    text: str = ""
    score: float = -math.inf


#: What fills a row the engine could not fill (no finite hypothesis left).
EMPTY = _EmptyCaption()


def request_num_captions(values: Sequence[int | None]) -> int | None:
    """The one ``num_captions`` of a request from its per-row values (``None`` = absent).

    Raises :class:`RequestError` when the rows of one request ask for different numbers.
    """
    distinct = sorted({v for v in values if v is not None})
    if len(distinct) > 1:
        raise RequestError(
            f"input 'num_captions' must be the same for every image of a request, got {distinct}; "
            "send images that need different numbers in separate requests"
        )
    return distinct[0] if distinct else None


def pad_captions(captions: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` of ``captions`` (best first), padded with :data:`EMPTY` to exactly ``n``."""
    out = list(captions[:n])
    return out + [EMPTY] * (n - len(out))


def n_best_arrays(rows: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    """``caption``/``score`` ``[rows, 1]`` (the best) and ``captions``/``scores`` ``[rows, n]`` of one request.

    ``rows`` holds, per image, its ``n`` captions (objects with ``text`` and ``score``), best first, all rows
    of the same length ``n >= 1`` (see :func:`pad_captions`).
    """
    widths = {len(r) for r in rows}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every image needs the same number (>= 1) of captions, got {sorted(widths)}")
    texts = np.array([[c.text.encode("utf-8") for c in r] for r in rows], dtype=np.object_)
    scores = np.array([[c.score for c in r] for r in rows], dtype=np.float32)
    return {CAPTION.name: texts[:, :1], SCORE.name: scores[:, :1], CAPTIONS.name: texts, SCORES.name: scores}
