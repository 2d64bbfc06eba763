"""``python -m ofa_eval`` against the real server: a served run over gRPC interrupted and resumed gives the
scores of an uninterrupted run over HTTP; the captions are the engine's; a refused image stops the run (that one
through the command line)."""

from __future__ import annotations

import json

import pytest

from ofa_eval.cli import main
from ofa_eval.predict import ServedPredictor
from tests.eval.evalset import FAST, SAMPLES_DIR, SAMPLES_SET, run_eval

pytestmark = pytest.mark.integration

METRICS = ("--metrics", "bleu,cider")


def served_args(url: str, output) -> list[str]:
    args = ["run", str(SAMPLES_SET), "--images", str(SAMPLES_DIR), "--limit", "4", "--url", url]
    return [*args, "--concurrency", "2", *FAST, *METRICS, "-o", str(output)]


def test_served_run_resumes_and_matches_http_and_the_engine(
    triton_server, captioner, tmp_path, monkeypatch, capsys
):
    grpc_output = tmp_path / "grpc.json"
    predict = ServedPredictor.predict

    def interrupted(self, samples):
        for i, prediction in enumerate(predict(self, samples)):
            if i == 2:
                raise KeyboardInterrupt
            yield prediction

    monkeypatch.setattr(ServedPredictor, "predict", interrupted)
    assert main(served_args(triton_server.grpc_address, grpc_output)) == 130
    assert "interrupted: 2 of 4 images captioned" in capsys.readouterr().err
    monkeypatch.setattr(ServedPredictor, "predict", predict)
    assert main(served_args(triton_server.grpc_address, grpc_output)) == 0
    assert "resuming: 2 of 4 images already captioned" in capsys.readouterr().err
    resumed = json.loads(grpc_output.read_text())
    assert resumed["source"]["url"] == f"grpc://{triton_server.grpc_address}"

    http_output = tmp_path / "http.json"
    assert main(served_args(triton_server.http_url, http_output)) == 0
    assert "CIDEr-D" in capsys.readouterr().out
    uninterrupted = json.loads(http_output.read_text())
    assert uninterrupted["source"]["url"] == f"http://{triton_server.http_address}"

    first = uninterrupted["predictions"][:2]
    want = captioner.caption(
        [(SAMPLES_DIR / p["file"]).read_bytes() for p in first], beam_size=1, max_length=4
    )
    assert [p["caption"] for p in first] == [c.text for c in want]
    assert [p["caption"] for p in resumed["predictions"]] == [
        p["caption"] for p in uninterrupted["predictions"]
    ]
    assert list(uninterrupted["metrics"]) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"]
    assert resumed["metrics"] == uninterrupted["metrics"]


def test_an_image_the_server_refuses_stops_the_run(triton_server, tmp_path):
    (tmp_path / "good.png").write_bytes((SAMPLES_DIR / "gradient.png").read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = tmp_path / "captions.json"
    dataset.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "good.png"}, {"id": 2, "file_name": "broken.jpg"}],
                "annotations": [
                    {"image_id": 1, "caption": "a gradient"},
                    {"image_id": 2, "caption": "noise"},
                ],
            }
        )
    )
    output = tmp_path / "r.json"
    proc = run_eval("run", dataset, "--url", triton_server.grpc_address, *FAST, "-o", output)
    assert proc.returncode == 1
    assert f"error: {tmp_path / 'broken.jpg'} (image 2): InvalidInputError:" in proc.stderr, proc.stderr
    assert not output.exists()  # no score over part of the set
    assert "captions so far saved in" in proc.stderr
