"""The 0741503 baseline engine (load_tests.testkit.baseline): written from git history under another package
name, importable beside the current engine; unavailable, in one sentence, without git history."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import pytest

from load_tests.testkit import baseline

needs_history = pytest.mark.skipif(
    shutil.which("git") is None or not (baseline._REPO / ".git").exists(),
    reason="baseline 0741503 unavailable (no git history)",
)


def test_without_git_history_the_baseline_is_unavailable_in_one_sentence(tmp_path):
    tarball = tmp_path / "unpacked-tarball"  # a checkout without .git
    tarball.mkdir()

    with pytest.raises(baseline.BaselineUnavailable) as err:
        baseline.materialise(tmp_path / "cache", repo=tarball)

    assert str(err.value) == "baseline 0741503 unavailable (no git history)"
    assert not (tmp_path / "cache").exists()


def _tar(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_absolute_imports_of_the_engine_are_renamed_and_nothing_else(tmp_path):
    archive = _tar(
        {
            "src/ofa_captioning/__init__.py": '"""ofa_captioning."""\n',
            "src/ofa_captioning/model.py": "from ofa_captioning.config import X\n"
            "import ofa_captioning.tokenizer\n"
            "from .config import Y\n"
            "NAME = 'ofa_captioning'\n",
            "src/ofa_captioning/data.json": "{}",
            "src/other/model.py": "x = 1\n",
        }
    )

    baseline._write_package(archive, tmp_path / "pkg")

    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["__init__.py", "model.py"]
    assert (tmp_path / "pkg" / "model.py").read_text() == (
        "from ofa_captioning_0741503.config import X\n"
        "import ofa_captioning_0741503.tokenizer\n"
        "from .config import Y\n"
        "NAME = 'ofa_captioning'\n"
    )


@needs_history
def test_the_commit_is_written_once_as_its_own_package(tmp_path):
    folder = baseline.materialise(tmp_path)

    assert folder == tmp_path / "ofa_captioning_0741503"
    assert {"__init__.py", "captioner.py", "generate.py", "model.py"} <= {p.name for p in folder.iterdir()}
    first = (folder / "generate.py").stat().st_mtime_ns
    assert baseline.materialise(tmp_path) == folder
    assert (folder / "generate.py").stat().st_mtime_ns == first  # reused, not written again
    assert [p.name for p in tmp_path.iterdir()] == ["ofa_captioning_0741503"]  # no staging left behind


@needs_history
def test_the_baseline_imports_beside_the_current_engine():
    from ofa_captioning.beam_search import beam_search

    package = baseline.baseline_package()
    generate = baseline.baseline_module("generate")

    assert package.__name__ == "ofa_captioning_0741503" and sys.modules["ofa_captioning_0741503"] is package
    assert generate.beam_search is not beam_search
    assert generate.beam_search.__module__ == "ofa_captioning_0741503.generate"
    assert baseline.baseline_module("model").OFAModel.__module__ == "ofa_captioning_0741503.model"
