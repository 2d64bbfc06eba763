"""Gather the requests of one ``execute()`` into engine batches and split the results back.

Triton's dynamic batcher hands a Python backend model a *list* of requests; it does not merge their tensors.
:func:`run_batched` turns that list into as few engine calls as possible: every row of every request goes into
the batch of its key (for ``ofa``: the generation settings), each batch runs once, and the results go back to
their requests in row order. A request that was already found bad keeps its own error; an engine call that
fails fails only the requests that had rows in it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

__all__ = ["RequestError", "run_batched"]

R = TypeVar("R")


class RequestError(ValueError):
    """Something wrong with one request (reported to its client as INVALID_ARG; its neighbours go on)."""


Rows = Sequence[tuple[Hashable, Any]]


def run_batched(
    requests: Sequence[Rows | BaseException],
    run: Callable[[Hashable, list[Any]], Sequence[R]],
) -> list[list[R] | BaseException]:
    """Run ``run(key, payloads)`` once per distinct key and return each request's results or its error.

    ``requests[i]`` is either the rows of request ``i`` as ``(key, payload)`` pairs, or the exception already
    raised while reading it. Keys are batched in order of first appearance and the payloads of one key keep
    request order, then row order. ``run`` must return one result per payload; an exception it raises (or a
    wrong result count) becomes the error of every request that had a row in that batch.
    """
    results: list[list[Any] | BaseException] = []
    batches: dict[Hashable, list[tuple[int, int, Any]]] = {}
    for i, rows in enumerate(requests):
        if isinstance(rows, BaseException):
            results.append(rows)
            continue
        results.append([None] * len(rows))
        for j, (key, payload) in enumerate(rows):
            batches.setdefault(key, []).append((i, j, payload))
    for key, members in batches.items():
        live = [(i, j, p) for i, j, p in members if not isinstance(results[i], BaseException)]
        if not live:
            continue
        try:
            outputs = list(run(key, [p for _, _, p in live]))
            if len(outputs) != len(live):
                raise RuntimeError(f"engine returned {len(outputs)} results for a batch of {len(live)}")
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            for i, _, _ in live:
                results[i] = exc
            continue
        for (i, j, _), out in zip(live, outputs, strict=True):
            target = results[i]
            if not isinstance(target, BaseException):
                target[j] = out
    return results
