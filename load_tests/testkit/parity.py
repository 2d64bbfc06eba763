"""The project's one rule for comparing the captions of two different computations.

Two computations of the same captions (an image alone or in a batch, served or in-process, engine or reference,
chunked or whole, two kernel paths, two processes) must give the same tokens and the same text, and scores equal
within :data:`SCORE_ATOL`. No library promises bit-identical float results across batch sizes, kernels or
machines, so scores are never compared with ``==`` there; bit-exact equality is for the very same computation run
twice.

A result is anything with ``text`` (or ``caption``) and ``score``, and optionally ``tokens``: the engine's
``Caption`` and ``Hypothesis``, the client's ``Caption``, the reference's ``RefHypothesis``, a prediction dict
``{"caption": ..., "score": ...}`` or a ``(text, score)`` pair; or a list of such results (n-best lists, batches),
nested to any depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SCORE_ATOL", "scores_close", "result_differences", "same_results", "assert_same_results"]

#: Parity tolerance on scores (sums of log-probabilities, |score| ~ 1-20): float32 rounding of another batch
#: composition or kernel moves them by ~1e-6.
SCORE_ATOL = 1e-4


def scores_close(a: float, b: float, atol: float = SCORE_ATOL) -> bool:
    """``a`` and ``b`` within ``atol``; equal infinities (a hypothesis that never finished) are equal, NaN never."""
    a, b = float(a), float(b)
    return a == b or abs(a - b) <= atol


def _is_result(x: Any) -> bool:
    if isinstance(x, Mapping):
        return "score" in x
    if hasattr(x, "score"):
        return True
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def _fields(x: Any) -> tuple[str, float, tuple[int, ...] | None]:
    """(text, score, tokens or None) of one result."""
    if isinstance(x, Mapping):
        text = x.get("caption", x.get("text"))
        tokens = x.get("tokens")
        return text, float(x["score"]), tuple(tokens) if tokens is not None else None
    if hasattr(x, "score"):
        text = getattr(x, "text", getattr(x, "caption", None))
        tokens = getattr(x, "tokens", None)
        return text, float(x.score), tuple(int(t) for t in tokens) if tokens is not None else None
    text, score = x
    return text, float(score), None


def result_differences(got: Any, want: Any, atol: float = SCORE_ATOL, where: str = "") -> list[str]:
    """Every way ``got`` differs from ``want`` under the parity rule, one line each (empty when they agree).

    Tokens are compared where both sides carry them; texts always; scores within ``atol``.
    """
    if _is_result(got) and _is_result(want):
        (gt, gs, gk), (wt, ws, wk) = _fields(got), _fields(want)
        out = []
        if gk is not None and wk is not None and gk != wk:
            out.append(f"{where or 'result'}: tokens {gk} != {wk}")
        if gt != wt:
            out.append(f"{where or 'result'}: text {gt!r} != {wt!r}")
        if not scores_close(gs, ws, atol):
            out.append(f"{where or 'result'}: score {gs!r} vs {ws!r} (|diff| > {atol:g})")
        return out
    if _is_result(got) or _is_result(want) or isinstance(got, str | bytes) or isinstance(want, str | bytes):
        return [f"{where or 'result'}: {got!r} and {want!r} are not comparable results"]
    if not isinstance(got, Sequence) or not isinstance(want, Sequence):
        return [f"{where or 'result'}: {type(got).__name__} and {type(want).__name__} are not result lists"]
    if len(got) != len(want):
        return [f"{where or 'list'}: {len(got)} results != {len(want)}"]
    out = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        out += result_differences(g, w, atol, f"{where}[{i}]")
    return out


def same_results(got: Any, want: Any, atol: float = SCORE_ATOL) -> bool:
    """Whether ``got`` and ``want`` agree under the parity rule (see :func:`result_differences`)."""
    return not result_differences(got, want, atol)


def assert_same_results(
    got: Any, want: Any, atol: float = SCORE_ATOL, names: Sequence[str] | None = None
) -> None:
    """Assert that ``got`` and ``want`` agree under the parity rule, naming each difference.

    An empty list on either side fails: a comparison of nothing proves nothing. ``names`` labels the items of
    top-level lists in the message (image names).
    """
    for side, value in (("got", got), ("want", want)):
        if not _is_result(value):
            assert isinstance(value, Sequence) and len(value) > 0, f"{side} holds no result: {value!r}"
    problems = result_differences(got, want, atol)
    if names is not None and problems:
        labelled = []
        for p in problems:
            if p.startswith("[") and "]" in p:
                index = p[1 : p.index("]")]
                if index.isdigit() and int(index) < len(names):
                    p = f"{names[int(index)]} {p}"
            labelled.append(p)
        problems = labelled
    assert not problems, "results differ:\n  " + "\n  ".join(problems)
