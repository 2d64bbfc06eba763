"""``make bench-gpu`` (load_tests/bench_gpu.py): its refusal without CUDA, its CPU smoke run, and the pure parts
of its report (the per-step split of profiler events, the GPU samples, the targets) on fake inputs."""

from __future__ import annotations

import json

import pytest

from load_tests import bench_gpu


def one_sentence(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.strip()]
    sentence = line.split("refused: ", 1)[1]
    assert sentence.endswith(".") and ". " not in sentence, sentence
    return sentence


def test_without_cuda_it_refuses_in_one_sentence_before_loading_anything(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(bench_gpu, "engine_phase", lambda *a: ran.append("engine") or ([], []))
    monkeypatch.setattr(bench_gpu, "served_phase", lambda *a: ran.append("served") or ([], {}))

    assert bench_gpu.main(["--results-dir", str(tmp_path)]) == 2

    sentence = one_sentence(capsys.readouterr().err)
    assert sentence.startswith("bench-gpu needs a CUDA device") and "--device cpu --quick" in sentence
    assert ran == [] and not (tmp_path / "bench_gpu.json").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--device", "cpu"], "runs only as the smoke test (add --quick)"),
        (["--device", "cpu", "--quick", "--dtypes", "float8"], "--dtypes names float8"),
    ],
)
def test_contradicting_arguments_are_refused_in_one_sentence(argv, said, capsys, tmp_path):
    assert bench_gpu.main([*argv, "--results-dir", str(tmp_path)]) == 2
    assert said in one_sentence(capsys.readouterr().err)


def test_the_cpu_smoke_run_writes_the_engine_report(demo_checkpoint, capsys, tmp_path):
    argv = ["--device", "cpu", "--quick", "--max-length", "4", "--model-dir", str(demo_checkpoint)]
    argv += ["--results-dir", str(tmp_path)]

    assert bench_gpu.main(argv) == 0

    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [(r["dtype"], r["batch"]) for r in report["engine"]] == [("float32", 1), ("float32", 2)]
    for row in report["engine"]:
        assert row["calls"] == 2 and row["captions"] == row["images"] == 2 * row["batch"]
        assert row["images_per_s"] > 0 and row["p50_ms"] > 0 and row["gpu"]["why_none"]
    (split,) = report["step_split"]
    assert split["batch"] == 1 and split["decoder_steps"] > 0
    assert (
        split["aten_ops_per_step"] > 0
        and split["host_syncs_per_step"] == split["local_scalar_dense_per_step"]
    )
    assert report["served"] == [] and report["card"]["device"] == "cpu" and report["card"]["card"] is None
    assert report["checks"]["smoke: the engine captioned every image of every call"] is True
    assert report["passed"] is True
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "| float32 | 2 |" in md and "## Per decoder step" in md
    assert "[ok] smoke: the engine captioned every image" in capsys.readouterr().out


def test_the_per_step_split_counts_kernels_and_host_syncs_on_cuda():
    events = (
        [("aten::mm", False)] * 40
        + [("aten::_local_scalar_dense", False)] * 10
        + [("cudaStreamSynchronize", False)] * 10
        + [("cudaDeviceSynchronize", False)]  # the profiled run's own
        + [("cudaLaunchKernel", False)] * 60
        + [("ampere_sgemm_128x64_tn", True)] * 50
        + [("Memcpy DtoH (Device -> Pageable)", True)] * 10
        + [("Memset (Device)", True)] * 5
    )

    row = bench_gpu.count_per_step(events, steps=5, cuda=True, own_device_syncs=1)

    assert row["kernels_per_step"] == 10  # copies and memsets are not kernels
    assert row["stream_syncs_per_step"] == 2 and row["device_syncs_per_step"] == 0
    assert row["memcpy_dtoh_per_step"] == 2 and row["local_scalar_dense_per_step"] == 2
    assert row["host_syncs_per_step"] == 2 and row["aten_ops_per_step"] == 10


def test_the_per_step_split_on_the_cpu_counts_operators_and_scalar_reads():
    events = (
        [("aten::add", False)] * 9
        + [("aten::_local_scalar_dense", False)] * 3
        + [("cudaLaunchKernel", False)]
    )

    row = bench_gpu.count_per_step(events, steps=3, cuda=False)

    assert row == {
        "decoder_steps": 3,
        "aten_ops_per_step": 4.0,
        "local_scalar_dense_per_step": 1.0,
        "host_syncs_per_step": 1.0,
    }


def test_gpu_samples_are_summarized_per_gpu_with_the_busiest_on_top():
    lines = [
        "0, 20, 1000\n",
        "1, 90, 3000\n",
        "0, 40, 1200\n",
        "1, 70, 3500\n",
        "0, [N/A], [N/A]\n",
        "garbage\n",
    ]

    summary = bench_gpu.parse_samples(lines)

    assert summary["gpus"]["0"] == {
        "samples": 2,
        "util_mean_pct": 30.0,
        "util_max_pct": 40.0,
        "memory_max_mib": 1200.0,
    }
    assert summary["util_mean_pct"] == 80.0 and summary["memory_max_mib"] == 3500.0
    assert bench_gpu.parse_samples([]) == {"gpus": {}, "samples": 0}


def test_a_disabled_sampler_says_why():
    with bench_gpu.GpuSampler(enabled=False) as sampler:
        pass
    assert sampler.summary()["why_none"] == "the engine ran on the CPU" and sampler.summary()["samples"] == 0


def _engine(dtype: str, batch: int, ips: float) -> dict:
    return {"dtype": dtype, "batch": batch, "images_per_s": ips, "images": batch, "captions": batch}


H100 = "NVIDIA H100 80GB HBM3"
ENGINE_NAME = "engine float16 batch 64 >= 1,000 images/s on an H100"
SERVED_NAME = "served best >= 90% of the engine's best images/s in float16"


@pytest.mark.parametrize(("ips", "ok"), [(1200.0, True), (999.0, False)])
def test_the_engine_target_is_gated_on_an_h100(ips, ok):
    checks = bench_gpu.targets([_engine("float16", 64, ips)], [], H100, "float16", quick=False)
    assert checks[ENGINE_NAME] is ok


def test_the_engine_target_is_not_applicable_elsewhere_and_says_why():
    engine = [_engine("float16", 64, 10.0)]
    checks = bench_gpu.targets(engine, [], "NVIDIA A100-SXM4-40GB", "float16", quick=False)
    (name,) = [n for n in checks if n.startswith(ENGINE_NAME)]
    assert checks[name] is None and "this run's device is NVIDIA A100-SXM4-40GB" in name
    checks = bench_gpu.targets([_engine("float32", 64, 10.0)], [], H100, "float16", quick=False)
    (name,) = [n for n in checks if n.startswith(ENGINE_NAME)]
    assert checks[name] is None and "float16 at batch 64 was not measured" in name


@pytest.mark.parametrize(("served_ips", "ok"), [(905.0, True), (895.0, False)])
def test_served_is_held_to_90_percent_of_the_engines_best_in_the_served_dtype(served_ips, ok):
    engine = [_engine("float16", 8, 500.0), _engine("float16", 64, 1000.0), _engine("float32", 64, 5000.0)]
    served = [{"images_per_s": 100.0}, {"images_per_s": served_ips}]
    checks = bench_gpu.targets(engine, served, H100, "float16", quick=False)
    assert checks[SERVED_NAME] is ok


def test_the_served_phase_serves_a_generated_gpu_profile_and_removes_it(
    monkeypatch, demo_checkpoint, tmp_path
):
    import contextlib
    from pathlib import Path

    from load_tests import bench_served, loadlib, tool
    from load_tests.corpus import load_images

    seen: dict = {}

    @contextlib.contextmanager
    def server_from_args(args):
        seen["repository"] = Path(args.model_repository)
        seen["ofa"] = (seen["repository"] / "ofa" / "config.pbtxt").read_text()
        seen["env"] = list(args.server_env)
        yield loadlib.ServerHandle("127.0.0.1", 1, 2, 3, started=True)

    def served(server, corpus, concurrency, args):
        return {
            "concurrency": concurrency,
            "images_per_s": 1.0,
            "p50_ms": 1.0,
            "ofa_avg_batch": 1.0,
            "failures": 0,
        }

    monkeypatch.setattr(loadlib, "server_from_args", server_from_args)
    monkeypatch.setattr(bench_served, "served_phase", served)
    args = tool.parse_args(bench_gpu.TOOL, ["--cuda-graphs", "--server-env", "OFA_DTYPE=bfloat16"])

    rows, info = bench_gpu.served_phase(
        demo_checkpoint, load_images(bench_gpu.loadlib.REPO_ROOT / "samples"), args
    )

    assert [r["concurrency"] for r in rows] == [1, 8, 32, 64]
    assert all("why_none" in r["gpu"] for r in rows)
    assert "KIND_GPU" in seen["ofa"] and "max_batch_size: 64" in seen["ofa"]
    assert seen["env"] == ["OFA_DTYPE=bfloat16", "OFA_CUDA_GRAPHS=true"]  # an explicit server setting wins
    assert info["profile"] == "gpu" and "KIND_GPU" in info["configs"]["ofa"]
    assert not seen["repository"].exists()
