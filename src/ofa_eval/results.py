"""Results files: the partial-results file a run appends to (for resuming) and the final JSON.

The partial file (``<output>.partial.jsonl``) starts with a line identifying the run (dataset, split, where
the captions come from) and then holds one JSON line per captioned image, flushed as each arrives. A run
that finds it resumes: it keeps the captions of the images it still has to score and captions only the rest.
A line cut short by a crash is ignored. The file is removed once the final JSON is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

from .dataset import CaptionSet, Sample
from .predict import Prediction

__all__ = ["PartialResults", "ResultsError", "load_results", "references_digest", "write_results"]

RESULTS_VERSION = 1


class ResultsError(ValueError):
    """A results or partial-results file cannot be used."""


def references_digest(samples: list[Sample]) -> str:
    """SHA-256 over the image ids and references, in order: two results are of the same set iff it matches."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.image_id)):
        h.update(json.dumps([s.image_id, list(s.references)]).encode())
    return h.hexdigest()


class PartialResults:
    """The append-only partial-results file of one run (identified by ``run``)."""

    def __init__(self, path: Path, run: dict[str, Any]) -> None:
        self.path = path
        self.run = run
        self._file: IO[str] | None = None

    def load(self) -> dict[Any, dict[str, Any]]:
        """The captions saved by an earlier run of the same ``run``: ``{image_id: {caption, score}}``."""
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or "run" not in header:
            raise ResultsError(f"{self.path}: not a partial-results file; delete it to start over")
        if header["run"] != self.run:
            raise ResultsError(
                f"{self.path} holds captions of a different run ({json.dumps(header['run'])}); "
                "pass --restart to discard them, or another --output"
            )
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                done[entry["image_id"]] = {"caption": str(entry["caption"]), "score": float(entry["score"])}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the line being written when the run stopped
        return done

    def open(self, done: dict[Any, dict[str, Any]]) -> None:
        """Rewrite the file with the header and ``done`` (dropping a cut line), then append from there."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"run": self.run}) + "\n")
            for image_id, entry in done.items():
                f.write(json.dumps({"image_id": image_id, **entry}) + "\n")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, prediction: Prediction) -> None:
        """Save one caption (flushed: an interruption loses at most the line being written)."""
        assert self._file is not None, "open() first"
        entry = {
            "image_id": prediction.sample.image_id,
            "caption": prediction.caption,
            "score": prediction.score,
        }
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def write_results(
    path: Path,
    caption_set: CaptionSet,
    limit: int | None,
    source: dict[str, Any],
    captions: dict[Any, dict[str, Any]],
    scores,
) -> dict[str, Any]:
    """Write the final JSON (atomically) and return it: scores, skipped metrics, every image's caption."""
    data = {
        "version": RESULTS_VERSION,
        "dataset": {
            "path": str(caption_set.path),
            "format": caption_set.format,
            "split": caption_set.split,
            "limit": limit,
            "images": len(caption_set.samples),
            "references_sha256": references_digest(caption_set.samples),
        },
        "source": source,
        "metrics": scores.metrics,
        "skipped": scores.skipped,
        "note": "pycocoevalcap's raw scores; papers print them x100 (CIDEr-D 1.201 = 120.1)",
        "predictions": [
            {
                "image_id": s.image_id,
                "file": s.path.name,
                "caption": captions[s.image_id]["caption"],
                "score": captions[s.image_id]["score"],
                "metrics": scores.per_image.get(s.image_id, {}),
            }
            for s in caption_set.samples
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; :class:`ResultsError` naming ``what`` file it should have been."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read the {what} file: {exc}") from exc


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON written by :func:`write_results`, checked for the fields a comparison needs."""
    path = Path(path)
    data = _read_json(path, "results")
    if not isinstance(data, dict) or not all(k in data for k in ("dataset", "metrics", "predictions")):
        raise ResultsError(
            f"{path}: not a results file of `python -m ofa_eval` (no dataset/metrics/predictions)"
        )
    return data


def load_predictions(path: str | Path, image_ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """``{image_id: {caption, score}}`` for ``image_ids`` from a COCO results file (``[{"image_id", "caption"}]``)
    or a results JSON of ``python -m ofa_eval run``; :class:`ResultsError` if an image has no caption."""
    path = Path(path)
    data = _read_json(path, "predictions")
    entries = data.get("predictions") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ResultsError(f"{path}: expected a list of {{'image_id', 'caption'}} (COCO results format)")
    captions: dict[Any, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("caption"), str)
            or "image_id" not in entry
        ):
            raise ResultsError(f"{path}: entry {i} is not {{'image_id': ..., 'caption': '...'}}")
        if entry["image_id"] in captions:
            raise ResultsError(f"{path}: image {entry['image_id']} has two captions")
        score = entry.get("score")
        captions[entry["image_id"]] = {
            "caption": entry["caption"],
            "score": float(score) if score is not None else None,
        }
    missing = [i for i in image_ids if i not in captions]
    if missing:
        raise ResultsError(
            f"{path}: no caption for {len(missing)} of {len(image_ids)} images, e.g. {missing[:5]}"
        )
    return {i: captions[i] for i in image_ids}
