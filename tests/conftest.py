"""Session fixtures shared by the engine and serving tests.

* ``demo_checkpoint``: the deterministic random-weight OFA-tiny demo checkpoint, built once under
  ``checkpoints/ofa-tiny-demo`` (or ``$DEMO_CHECKPOINT``, relative to the repository root) and reused.
* ``demo_checkpoint_zh``: the Chinese demo checkpoint (``--language zh``), under ``checkpoints/ofa-tiny-demo-zh``
  (or ``$DEMO_CHECKPOINT_ZH``).
* ``image_corpus``: ``[(name, encoded bytes), ...]``, 18 synthetic images covering formats, modes, sizes,
  aspect ratios and EXIF orientations (see ``ofa_testkit.images``).
* ``reference``: ModelScope's OFA (``ofa_testkit.reference``) on the demo checkpoint. ``make test`` always
  installs it, so a failing import is an error of every test that uses it, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ofa_testkit.images import image_corpus as _build_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """Path of the demo checkpoint (built on first use, then reused across sessions)."""
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint
    from ofa_serving.testing import demo_checkpoint_dir

    return Path(ensure_demo_checkpoint(demo_checkpoint_dir()))


@pytest.fixture(scope="session")
def demo_checkpoint_zh() -> Path:
    """Path of the Chinese demo checkpoint (built on first use, then reused across sessions)."""
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

    p = Path(os.environ.get("DEMO_CHECKPOINT_ZH") or "checkpoints/ofa-tiny-demo-zh")
    return Path(ensure_demo_checkpoint(p if p.is_absolute() else REPO_ROOT / p, language="zh"))


@pytest.fixture(scope="session")
def image_corpus() -> list[tuple[str, bytes]]:
    """At least 12 varied, deterministic encoded images as ``(name, bytes)``."""
    corpus = _build_corpus()
    assert len(corpus) >= 12
    return corpus


@pytest.fixture(scope="session")
def reference(demo_checkpoint: Path):
    """ModelScope's OFA captioning reference (ofa_testkit.reference.Reference) on the demo checkpoint."""
    from ofa_testkit.reference import Reference

    return Reference(demo_checkpoint)
