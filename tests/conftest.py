"""Session fixtures shared by the engine and serving tests.

* ``demo_checkpoint``: the deterministic random-weight OFA-tiny demo checkpoint, built once under
  ``checkpoints/ofa-tiny-demo`` (or ``$DEMO_CHECKPOINT``, relative to the repository root) and reused.
* ``demo_checkpoint_zh``: the Chinese demo checkpoint (``--language zh``), under ``checkpoints/ofa-tiny-demo-zh``
  (or ``$DEMO_CHECKPOINT_ZH``).
* ``image_corpus``: ``[(name, encoded bytes), ...]``, 18 synthetic images covering formats, modes, sizes,
  aspect ratios and EXIF orientations (see ``load_tests.testkit.images``).
* ``reference``: ModelScope's OFA (``load_tests.testkit.reference``) on the demo checkpoint. ``make test`` always
  installs it, so a failing import is an error of every test that uses it, never a skip.

``make test-kernels`` runs the tests marked ``kernel_parity`` once more with the CPU math libraries held to
another kernel path (``OFA_KERNEL_PATH`` names it); :func:`pytest_configure` refuses to run that tier unless torch
really took the instruction set and thread count asked for, so it can never pass on the default path unnoticed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from load_tests.testkit.images import image_corpus as _build_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]


def _kernel_path() -> str | None:
    """What torch runs on, where ``OFA_KERNEL_PATH`` asks for a kernel path; None otherwise."""
    if not os.environ.get("OFA_KERNEL_PATH"):
        return None
    import torch

    return f"ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("OFA_KERNEL_PATH"):
        return
    import torch

    want_isa = os.environ.get("ATEN_CPU_CAPABILITY")
    got_isa = torch.backends.cpu.get_cpu_capability()
    if want_isa and got_isa.lower() != want_isa.lower():
        raise pytest.UsageError(
            f"OFA_KERNEL_PATH: ATEN_CPU_CAPABILITY={want_isa} asked, torch runs {got_isa}"
        )
    want_threads = os.environ.get("OMP_NUM_THREADS")
    if want_threads and torch.get_num_threads() != int(want_threads):
        raise pytest.UsageError(
            f"OFA_KERNEL_PATH: OMP_NUM_THREADS={want_threads} asked, torch runs {torch.get_num_threads()} threads"
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    path = _kernel_path()
    return f"kernel path {os.environ['OFA_KERNEL_PATH']}: {path}" if path else None


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """Path of the demo checkpoint (built on first use, then reused across sessions)."""
    from load_tests.testkit.servers import demo_checkpoint_dir
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

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
    """ModelScope's OFA captioning reference (load_tests.testkit.reference.Reference) on the demo checkpoint."""
    from load_tests.testkit.reference import Reference

    return Reference(demo_checkpoint)
