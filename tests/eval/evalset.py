"""The evaluation tests' sample caption set (the repository's ``samples/`` images with written reference
captions, COCO format) and a runner of ``python -m ofa_eval``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
#: COCO captions format: 8 images of samples/ with 3 written references each.
SAMPLES_SET = DATA / "captions_samples.json"
#: A written caption per image of SAMPLES_SET (COCO results format), for scores that are not all zero.
SAMPLES_PREDICTIONS = DATA / "predictions_samples.json"
SAMPLES_DIR = REPO_ROOT / "samples"
#: Settings that keep the demo checkpoint's captioning short (the scores of random weights mean nothing).
FAST = ("--beam-size", "1", "--max-length", "4", "--no-progress")


def run_eval(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m ofa_eval ARGS`` in a subprocess of this checkout (``src/`` first on the path); text output."""
    paths = [str(REPO_ROOT / "src"), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "ofa_eval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
        env=env,
    )
