"""Caption sets in the two COCO formats: Karpathy's ``dataset_coco.json`` and COCO's ``captions_*.json``.

Both load into :class:`CaptionSet`: the images to caption (id, file) and each image's reference captions. Every
problem (unreadable JSON, a missing field, an image without references, a missing image file) is a
:class:`DatasetError` that names the file and the entry, raised before anything is captioned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CaptionSet", "DatasetError", "Sample", "load_caption_set"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_MAX_LISTED = 5


class DatasetError(ValueError):
    """The caption set cannot be used as given; the message says which file and which entry."""


@dataclass(frozen=True)
class Sample:
    """One image of the set: its COCO id, its file and its reference captions."""

    image_id: int | str
    path: Path
    references: tuple[str, ...]


@dataclass
class CaptionSet:
    """The images to caption, in the order of the dataset file, with what identifies the selection."""

    path: Path
    format: str  # "karpathy" or "coco"
    split: str | None
    samples: list[Sample] = field(default_factory=list)

    @property
    def references(self) -> dict[int | str, list[str]]:
        """``{image_id: [reference, ...]}`` of every sample."""
        return {s.image_id: list(s.references) for s in self.samples}


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such dataset file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset file: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc


def _field(entry: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise DatasetError(f"{where}: missing field {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _reference(text: str, where: str) -> str:
    if not text.strip():
        raise DatasetError(f"{where}: empty reference caption")
    return text


def _karpathy(path: Path, data: dict, images_dir: Path, split: str) -> list[Sample]:
    if split not in KARPATHY_SPLITS:
        raise DatasetError(
            f"--split must be one of {', '.join(KARPATHY_SPLITS)} for {path.name}, got {split!r}"
        )
    images = _field(data, "images", list, str(path))
    samples = []
    seen: set = set()
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if _field(entry, "split", str, where) != split:
            continue
        name = _field(entry, "filename", str, where)
        image_id = entry.get("cocoid", entry.get("imgid"))
        if image_id is None:
            raise DatasetError(f"{where}: missing field 'cocoid'")
        if image_id in seen:
            raise DatasetError(f"{where}: image id {image_id} appears twice")
        seen.add(image_id)
        sentences = _field(entry, "sentences", list, where)
        refs = tuple(
            _reference(_field(s, "raw", str, f"{where}.sentences[{j}]"), f"{where}.sentences[{j}]")
            for j, s in enumerate(sentences)
        )
        if not refs:
            raise DatasetError(f"{where}: no reference captions")
        # The Karpathy file names each image's COCO folder (filepath: val2014/train2014); accept the images
        # either under that folder or directly in images_dir.
        sub = entry.get("filepath") or ""
        candidate = images_dir / sub / name
        samples.append(Sample(image_id, candidate if candidate.exists() else images_dir / name, refs))
    if not samples:
        raise DatasetError(f"{path}: no images in split {split!r}")
    return samples


def _coco(path: Path, data: dict, images_dir: Path) -> list[Sample]:
    images = _field(data, "images", list, str(path))
    annotations = _field(data, "annotations", list, str(path))
    refs: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        image_id = _field(ann, "image_id", (int, str), where)
        refs.setdefault(image_id, []).append(_reference(_field(ann, "caption", str, where), where))
    samples = []
    seen: set = set()
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _field(entry, "id", (int, str), where)
        name = _field(entry, "file_name", str, where)
        if image_id in seen:
            raise DatasetError(f"{where}: image id {image_id} appears twice")
        seen.add(image_id)
        if image_id not in refs:
            raise DatasetError(f"{where}: image {image_id} has no reference captions in 'annotations'")
        samples.append(Sample(image_id, images_dir / name, tuple(refs[image_id])))
    orphans = sorted(set(refs) - seen, key=str)
    if orphans:
        raise DatasetError(
            f"{path}: annotations refer to images not listed in 'images': {orphans[:_MAX_LISTED]}"
        )
    if not samples:
        raise DatasetError(f"{path}: no images")
    return samples


def load_caption_set(
    path: str | Path,
    images_dir: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> CaptionSet:
    """Read a caption set: Karpathy's ``dataset_coco.json`` (``split`` defaults to ``test``) or a COCO
    ``captions_*.json`` (no splits: the file is the split).

    ``images_dir`` (default: the dataset file's folder) holds the images: for Karpathy's file either
    ``<images_dir>/<filepath>/<filename>`` (COCO's ``val2014/`` layout) or ``<images_dir>/<filename>``.
    ``limit`` keeps the first ``limit`` images in file order. With ``check_images``, every selected image must
    exist, else :class:`DatasetError` lists the missing ones.
    """
    path = Path(path)
    images_dir = Path(images_dir) if images_dir is not None else path.parent
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DatasetError(
            f"{path}: not a caption set: expected Karpathy's dataset_coco.json ({{'images': [...]}} with "
            "'sentences') or COCO's captions_*.json ({'images': [...], 'annotations': [...]})"
        )
    if "annotations" in data:
        if split is not None:
            raise DatasetError(f"{path}: a COCO captions file has no splits; drop --split {split}")
        fmt, samples = "coco", _coco(path, data, images_dir)
    else:
        split = split or "test"
        fmt, samples = "karpathy", _karpathy(path, data, images_dir, split)
    if limit is not None:
        samples = samples[:limit]
    if check_images:
        missing = [s.path for s in samples if not s.path.is_file()]
        if missing:
            listed = ", ".join(str(p) for p in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise DatasetError(
                f"{len(missing)} of {len(samples)} images not found (images folder {images_dir}): {listed}{more}"
            )
    return CaptionSet(path=path, format=fmt, split=split, samples=samples)
