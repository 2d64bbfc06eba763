"""The engine as it was at commit 0741503, importable beside the current one: the "before" of the decode loop.

:func:`baseline_package` writes that commit's ``src/ofa_captioning`` (``git archive``) under
``.cache/baseline/`` (gitignored) as the package :data:`PACKAGE` and imports it from there, so that one process
holds both engines; :func:`load_baseline` loads a checkpoint with its ``Captioner.from_pretrained``. The package
imports its own modules relatively; an absolute ``ofa_captioning`` import in it would be renamed on the way out.

Where the checkout has no git history (a tarball) or lacks the commit, the baseline is unavailable:
:class:`BaselineUnavailable`, whose message is one sentence (a benchmark's red ``[FAIL]`` line, a test's skip).

The baseline's public names as the callers use them: ``Captioner`` (``from_pretrained``, ``generate``,
``generate_hypotheses``, ``search_settings``, ``normalize_pixels``, ``model.encode``) and, in the module
``generate``, ``beam_search(model, encoder_out, settings)`` (no ``cuda_graphs`` keyword).
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["COMMIT", "PACKAGE", "BaselineUnavailable", "baseline_package", "load_baseline"]

#: The commit whose decode loop is the baseline, and the package name it is imported under.
COMMIT = "0741503"
PACKAGE = f"ofa_captioning_{COMMIT}"
_SOURCE = "src/ofa_captioning"
_REPO = Path(__file__).resolve().parents[2]
_ABSOLUTE_IMPORT = re.compile(r"^(\s*)(from|import) ofa_captioning\b", re.MULTILINE)


class BaselineUnavailable(RuntimeError):
    """The baseline cannot be built here; the message is one sentence saying why."""


def default_cache_dir() -> Path:
    """Where the baseline package is written: ``.cache/baseline`` under the checkout (gitignored)."""
    return _REPO / ".cache" / "baseline"


def _git_archive(repo: Path) -> bytes:
    """The baseline commit's engine sources as a tar archive; :class:`BaselineUnavailable` without git history."""
    git = shutil.which("git")
    if git is None or not (repo / ".git").exists():
        raise BaselineUnavailable(f"baseline {COMMIT} unavailable (no git history)")
    found = subprocess.run(
        [git, "-C", str(repo), "cat-file", "-e", f"{COMMIT}^{{commit}}"], capture_output=True, check=False
    )
    if found.returncode != 0:
        raise BaselineUnavailable(f"baseline {COMMIT} unavailable (commit not in this clone's git history)")
    out = subprocess.run(
        [git, "-C", str(repo), "archive", "--format=tar", COMMIT, _SOURCE], capture_output=True, check=False
    )
    if out.returncode != 0:
        raise BaselineUnavailable(
            f"baseline {COMMIT} unavailable (git archive: {out.stderr.decode().strip()})"
        )
    return out.stdout


def _write_package(archive: bytes, target: Path) -> None:
    """Unpack the archive's ``.py`` files into ``target`` (a fresh directory), absolute self-imports renamed."""
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if not member.isfile() or path.suffix != ".py" or path.parent != Path(_SOURCE):
                continue
            text = tar.extractfile(member).read().decode()
            (target / path.name).write_text(_ABSOLUTE_IMPORT.sub(rf"\1\2 {PACKAGE}", text))
    if not (target / "__init__.py").is_file():
        raise BaselineUnavailable(f"baseline {COMMIT} unavailable (no {_SOURCE} package in that commit)")


def materialise(cache_dir: Path | None = None, repo: Path = _REPO) -> Path:
    """The baseline package's directory, written on first use (atomically: concurrent callers are safe)."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / PACKAGE
    if (target / "__init__.py").is_file():
        return target
    archive = _git_archive(repo)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}-", dir=cache_dir))
    try:
        _write_package(archive, staging / PACKAGE)
        try:
            (staging / PACKAGE).rename(target)
        except OSError:
            if not (target / "__init__.py").is_file():  # not another process's copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def baseline_package(cache_dir: Path | None = None, repo: Path = _REPO) -> ModuleType:
    """The baseline engine as the package :data:`PACKAGE` (imported once per process; no ``sys.path`` change)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = materialise(cache_dir, repo)
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module


def baseline_module(name: str) -> ModuleType:
    """One module of the baseline package, e.g. ``baseline_module("generate")`` for its beam search."""
    baseline_package()
    return importlib.import_module(f"{PACKAGE}.{name}")


def load_baseline(checkpoint: str | Path, **kwargs: Any) -> Any:
    """The baseline's ``Captioner.from_pretrained(checkpoint, **kwargs)`` (e.g. ``dtype="float32"``)."""
    return baseline_module("captioner").Captioner.from_pretrained(checkpoint, **kwargs)
