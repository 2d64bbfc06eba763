"""``python -m ofa_eval run`` with the in-process engine: resume after an interruption, clear errors, the
Karpathy format, comparisons. The demo checkpoint's captions are meaningless; these tests check the mechanics."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from load_tests.testkit.parity import assert_same_results
from ofa_eval import DatasetError, load_caption_set
from ofa_eval.cli import main
from ofa_eval.predict import EnginePredictor

from .evalset import FAST, SAMPLES_DIR, SAMPLES_SET, run_eval

METRICS = ("--metrics", "bleu,rouge,cider")  # METEOR's start-up is the slow part; test_scores covers it


@pytest.fixture(scope="module")
def engine(demo_checkpoint):
    """The demo checkpoint's captioner, loaded once: ``Captioner.from_pretrained`` returns it in this module."""
    from ofa_captioning import Captioner

    captioner = Captioner.from_pretrained(demo_checkpoint)

    def cached(cls, path, device=None, dtype=None):
        assert (Path(path), device, dtype) == (demo_checkpoint, None, None)
        return captioner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Captioner, "from_pretrained", classmethod(cached))
        yield captioner


def engine_args(checkpoint, output) -> list[str]:
    """``run`` over the first 4 sample images with the engine (in-process, through :func:`main`)."""
    args = [
        "run",
        str(SAMPLES_SET),
        "--images",
        str(SAMPLES_DIR),
        "--limit",
        "4",
        "--engine",
        str(checkpoint),
    ]
    return [*args, *FAST, *METRICS, "-o", str(output)]


@pytest.fixture(scope="module")
def full_run(engine, demo_checkpoint, tmp_path_factory):
    """An uninterrupted engine run over 4 sample images: (results dict, stdout)."""
    output = tmp_path_factory.mktemp("eval") / "full.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(engine_args(demo_checkpoint, output)) == 0
    return json.loads(output.read_text()), stdout.getvalue()


def test_engine_run_writes_every_caption(full_run, engine, demo_checkpoint):
    results, stdout = full_run
    files = [p["file"] for p in results["predictions"]]
    assert files == ["gradient.png", "grayscale.png", "portrait.jpg", "rotated_exif6.jpg"]
    want = engine.caption([(SAMPLES_DIR / f).read_bytes() for f in files[:2]], beam_size=1, max_length=4)
    assert_same_results(results["predictions"][:2], want)
    assert results["source"] == {
        "kind": "engine",
        "checkpoint": str(demo_checkpoint.resolve()),
        "device": "cpu",
        "dtype": "float32",
        "beam_size": 1,
        "max_length": 4,
        "demo_checkpoint": True,
    }
    assert "DEMO CHECKPOINT: random weights, the scores mean nothing" in stdout
    assert results["dataset"]["limit"] == 4 and results["dataset"]["images"] == 4
    assert list(results["metrics"]) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"]
    assert all(set(p["metrics"]) == set(results["metrics"]) for p in results["predictions"])
    assert "CIDEr-D" in stdout and "4 images" in stdout


def test_resume_after_interruption_gives_the_same_scores(
    full_run, demo_checkpoint, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "resumed.json"
    args = engine_args(demo_checkpoint, output)
    predict = EnginePredictor.predict
    captioned: list = []

    def interrupted(self, samples):
        for i, prediction in enumerate(predict(self, samples)):
            if i == 2:
                raise KeyboardInterrupt
            captioned.append(prediction.sample.image_id)
            yield prediction

    monkeypatch.setattr(EnginePredictor, "predict", interrupted)
    assert main(args) == 130
    partial = output.with_name("resumed.json.partial.jsonl")
    assert len(partial.read_text().splitlines()) == 1 + 2  # the run's header and 2 captions
    assert not output.exists()
    assert "interrupted: 2 of 4 images captioned" in capsys.readouterr().err

    with partial.open("a") as f:  # a line cut short by a crash is ignored
        f.write('{"image_id": 1003, "capt')

    def counting(self, samples):
        captioned.extend(s.image_id for s in samples)
        return predict(self, samples)

    monkeypatch.setattr(EnginePredictor, "predict", counting)
    assert main(args) == 0
    assert "resuming: 2 of 4 images already captioned" in capsys.readouterr().err
    assert sorted(captioned) == sorted(p["image_id"] for p in full_run[0]["predictions"])  # each image once
    assert not partial.exists()

    resumed, full = json.loads(output.read_text()), full_run[0]

    # The resumed images ran as a smaller engine batch; the GEMM kernels oneDNN picks for a different row count
    # may round the last bits differently, so the model's own score may move by ~1e-6 (nothing else may).
    def without_score(predictions: list[dict]) -> list[dict]:
        return [{k: v for k, v in p.items() if k != "score"} for p in predictions]

    assert_same_results(resumed["predictions"], full["predictions"])
    assert without_score(resumed["predictions"]) == without_score(full["predictions"])
    assert resumed["metrics"] == full["metrics"]


def test_a_different_run_does_not_resume_foreign_captions(demo_checkpoint, tmp_path):
    output = tmp_path / "r.json"
    partial = tmp_path / "r.json.partial.jsonl"
    partial.write_text(json.dumps({"run": {"dataset": "other"}}) + "\n")
    proc = run_eval(
        "run", SAMPLES_SET, "--images", SAMPLES_DIR, "--engine", demo_checkpoint, *FAST, "-o", output
    )
    assert proc.returncode == 1
    assert "holds captions of a different run" in proc.stderr and "--restart" in proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a caption set"),
        (
            '{"images": [{"id": 1, "file_name": "shapes.jpg"}], "annotations": [{"image_id": 1}]}',
            "missing field 'caption'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "shapes.jpg"}], "annotations": []}',
            "image 1 has no reference captions",
        ),
        ('{"images": [{"filename": "shapes.jpg", "cocoid": 1, "sentences": []}]}', "missing field 'split'"),
        (
            '{"images": [{"filename": "shapes.jpg", "cocoid": 1, "split": "val", "sentences": []}]}',
            "no images in split 'test'",
        ),
    ],
)
def test_malformed_dataset_file_is_a_clear_error(tmp_path, content, message):
    dataset = tmp_path / "captions.json"
    dataset.write_text(content)
    proc = run_eval("run", dataset, "--images", SAMPLES_DIR, "--url", "127.0.0.1:1")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {dataset}") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_and_missing_images(tmp_path):
    proc = run_eval("run", tmp_path / "absent.json")
    assert proc.returncode == 1 and "absent.json: no such dataset file" in proc.stderr

    images = tmp_path / "images"
    shutil.copytree(SAMPLES_DIR, images)
    (images / "shapes.jpg").unlink()
    (images / "square.webp").unlink()
    proc = run_eval("run", SAMPLES_SET, "--images", images, "--url", "127.0.0.1:1")
    assert proc.returncode == 1
    assert "error: 2 of 8 images not found" in proc.stderr
    assert str(images / "shapes.jpg") in proc.stderr and str(images / "square.webp") in proc.stderr


def test_unreachable_server_is_a_clear_error(tmp_path):
    from ofa_serving.launcher import free_port

    port = free_port()
    proc = run_eval(
        "run", SAMPLES_SET, "--images", SAMPLES_DIR, "--url", f"127.0.0.1:{port}", "-o", tmp_path / "r.json"
    )
    assert proc.returncode == 1
    want = f"error: cannot reach the server at grpc://127.0.0.1:{port} (is it running? `make serve`)\n"
    assert proc.stderr == want
    assert list(tmp_path.iterdir()) == []  # neither results nor a partial file


def test_without_the_eval_packages_it_says_which_make_target_before_captioning(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pycocoevalcap" else real_find_spec(name, *a),
    )
    code = main(["run", str(SAMPLES_SET), "--images", str(SAMPLES_DIR), "-o", str(tmp_path / "r.json")])
    assert code == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: scoring needs the package 'pycocoevalcap', which `make eval` installs (requirements/eval.txt)\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing captioned


def test_karpathy_format_and_split(tmp_path):
    coco = json.loads(SAMPLES_SET.read_text())
    images = []
    for i, image in enumerate(coco["images"]):
        refs = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        images.append(
            {
                "filepath": "val2014",
                "filename": image["file_name"],
                "cocoid": image["id"],
                "split": "test" if i % 2 else "val",
                "sentences": [{"raw": r, "tokens": r.lower().split()} for r in refs],
            }
        )
    (tmp_path / "val2014").mkdir()
    for image in images:
        shutil.copy(SAMPLES_DIR / image["filename"], tmp_path / "val2014" / image["filename"])
    dataset = tmp_path / "dataset_coco.json"
    dataset.write_text(json.dumps({"images": images, "dataset": "coco"}))

    test = load_caption_set(dataset)
    assert (test.format, test.split) == ("karpathy", "test")
    assert [s.image_id for s in test.samples] == [1002, 1004, 1006, 1008]
    assert test.samples[0].path == tmp_path / "val2014" / "grayscale.png"
    assert test.samples[0].references[0] == "A gray picture with the word gray written on it."
    assert [s.image_id for s in load_caption_set(dataset, split="val", limit=3).samples] == [1001, 1003, 1005]
    with pytest.raises(DatasetError, match="--split must be one of"):
        load_caption_set(dataset, split="testing")
    with pytest.raises(DatasetError, match="has no splits"):
        load_caption_set(SAMPLES_SET, SAMPLES_DIR, split="test")


def _results(metrics: dict, captions: list[str], digest: str = "d") -> dict:
    return {
        "dataset": {
            "path": "set.json",
            "format": "coco",
            "split": None,
            "images": 2,
            "references_sha256": digest,
        },
        "source": {"kind": "file", "path": "x.json"},
        "metrics": metrics,
        "predictions": [{"image_id": i, "caption": c} for i, c in enumerate(captions)],
    }


def test_compare_prints_per_metric_differences(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results({"BLEU-4": 0.30, "CIDEr-D": 1.20}, ["a cat", "a dog"])))
    b.write_text(json.dumps(_results({"BLEU-4": 0.31, "CIDEr-D": 1.15}, ["a cat", "two dogs"])))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert any(line.split() == ["BLEU-4", "30.00", "31.00", "+1.00"] for line in out.splitlines()), out
    assert any(line.split() == ["CIDEr-D", "120.00", "115.00", "-5.00"] for line in out.splitlines()), out
    assert "captions differ on 1 of 2 images" in out

    b.write_text(json.dumps(_results({"BLEU-4": 0.31}, ["a cat", "a dog"], digest="other")))
    assert main(["compare", str(a), str(b)]) == 1
    assert "not the same caption set" in capsys.readouterr().err
