"""Terminal tables: one run's scores, and two runs side by side with the per-metric differences."""

from __future__ import annotations

from typing import Any

from .results import ResultsError
from .scoring import ALL_METRICS

__all__ = ["compare_table", "describe_source", "scores_table"]


def describe_source(source: dict[str, Any]) -> str:
    """One line: where the captions came from."""
    settings = f"beam_size {source.get('beam_size') or 'default'}, max_length {source.get('max_length') or 'default'}"
    if source.get("kind") == "served":
        return f"served model {source['model']!r} at {source['url']} ({settings})"
    if source.get("kind") == "engine":
        demo = (
            " [DEMO CHECKPOINT: random weights, the scores mean nothing]"
            if source.get("demo_checkpoint")
            else ""
        )
        return f"engine {source['checkpoint']} on {source['device']}, {source['dtype']} ({settings}){demo}"
    if source.get("kind") == "file":
        return f"captions read from {source['path']}"
    return str(source)


def _title(results: dict[str, Any]) -> str:
    d = results["dataset"]
    split = f", split {d['split']}" if d.get("split") else ""
    return f"{d['path']} ({d['format']}{split}): {d['images']} images"


def scores_table(results: dict[str, Any]) -> str:
    """The scores of one results dict, x100 as papers print them, and the metrics skipped with why."""
    lines = [
        _title(results),
        f"captions: {describe_source(results['source'])}",
        "",
        f"{'metric':<10} {'score':>8}",
    ]
    for name in ALL_METRICS:
        if name in results["metrics"]:
            lines.append(f"{name:<10} {100 * results['metrics'][name]:>8.2f}")
    lines.append("(pycocoevalcap's scores x 100)")
    for reason in results.get("skipped", {}).values():
        if "not requested" not in reason:
            lines.append(reason)
    return "\n".join(lines)


def compare_table(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Per-metric scores of two results on the same set and ``B - A``; :class:`ResultsError` when the sets differ.

    Also counts the images whose captions differ.
    """
    da, db = a["dataset"], b["dataset"]
    if da.get("references_sha256") != db.get("references_sha256"):
        raise ResultsError(
            f"not the same caption set: {names[0]} has {da.get('images')} images of {da.get('path')}, "
            f"{names[1]} has {db.get('images')} images of {db.get('path')} (images or references differ)"
        )
    caps_a = {str(p["image_id"]): p["caption"] for p in a["predictions"]}
    caps_b = {str(p["image_id"]): p["caption"] for p in b["predictions"]}
    differ = sum(caps_a[k] != caps_b.get(k) for k in caps_a)
    wa, wb = max(8, len(names[0])), max(8, len(names[1]))
    lines = [
        _title(a),
        f"{names[0]}: {describe_source(a['source'])}",
        f"{names[1]}: {describe_source(b['source'])}",
        "",
        f"{'metric':<10} {names[0]:>{wa}} {names[1]:>{wb}} {'B - A':>8}",
    ]
    for name in ALL_METRICS:
        va, vb = a["metrics"].get(name), b["metrics"].get(name)
        if va is None and vb is None:
            continue
        fa = f"{100 * va:>{wa}.2f}" if va is not None else f"{'-':>{wa}}"
        fb = f"{100 * vb:>{wb}.2f}" if vb is not None else f"{'-':>{wb}}"
        diff = f"{100 * (vb - va):>+8.2f}" if va is not None and vb is not None else f"{'-':>8}"
        lines.append(f"{name:<10} {fa} {fb} {diff}")
    lines.append(f"(pycocoevalcap's scores x 100; captions differ on {differ} of {len(caps_a)} images)")
    return "\n".join(lines)
