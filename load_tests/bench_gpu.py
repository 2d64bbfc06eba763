#!/usr/bin/env python
"""``make bench-gpu``: the GPU deployment measured: the engine on decoded pixels, then the ``gpu`` serving profile.

(a) ``engine``: ``Captioner.from_pretrained(dir, device, dtype)`` timed on pixels decoded and preprocessed once,
    outside the timing (the image corpus, or random pixels with ``--random-pixels``), at batches 1, 8, 32 and 64
    (``--batches``) in float16, float32 and bfloat16 (``--dtypes``): images/s and p50/p99 per call;
(b) the per-step split: one ``torch.profiler`` run of beam search (batch ``--profile-batch``, each dtype): on
    CUDA the kernels a decoder step launches and its host synchronisations (``cudaStreamSynchronize``,
    ``cudaDeviceSynchronize``, synchronous ``cudaMemcpy``, device-to-host copies, ``aten::_local_scalar_dense``);
    on the CPU the operators of a step and its ``aten::_local_scalar_dense`` reads;
(c) ``served``: a model repository generated with the ``gpu`` profile (:mod:`ofa_serving.profiles`: KIND_GPU
    ``ofa``, batches of 64, several ``preprocess`` instances), served by a tritonserver this run starts, measured
    by ``make bench``'s closed loop (``bench_served.served_phase``: N threads, one gRPC request in flight each) at
    concurrency 1, 8, 32 and 64 (``--concurrency``), the server in ``--served-dtype`` (float16);
(d) GPU utilisation and memory sampled every 200 ms during each engine row and each served phase
    (``nvidia-smi -lms``, else NVML through ``pynvml``);
(e) the card's name, driver, torch and CUDA versions head the report.

Targets: the served best >= 90 % of the engine's best images/s in the served dtype; the engine >= 1,000 images/s
at batch 64 in float16, gated only where the card is an H100 (elsewhere an ``[n/a]`` line says why). A missed
target prints a red ``[FAIL]`` line and exits 1 (``--report-only``: exit 0).

Without a CUDA device the run is refused in one sentence (exit 2), except ``--device cpu --quick``: the smoke
test of the engine part (batches 1 and 2, float32, two calls each, the per-step split; no server), whose check is
that every image got a caption. Writes ``load_tests/results/bench_gpu.json`` and ``bench_gpu.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from load_tests import loadlib, tool
from load_tests.bench_report import TARGET_THROUGHPUT_RATIO, display_path, ints, log, phase_result
from load_tests.corpus import load_images

DTYPES = ("float16", "float32", "bfloat16")
#: The engine target: images/s at this batch and dtype, gated on this card only (where it was set).
ENGINE_TARGET = {"images_per_s": 1000.0, "batch": 64, "dtype": "float16", "card": "H100"}
#: ``--quick`` (the CPU smoke test): tiny batches, one dtype, a few calls, the engine part only.
QUICK = {"batches": "1,2", "calls": 2, "profile_batch": 1}
#: Timed calls per row before ``--seconds`` may end it.
MIN_CALLS = 3
SMI_QUERY = "index,utilization.gpu,memory.used"


# ------------------------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``make bench-gpu``: the server's (``loadlib.add_server_arguments``), the engine's, the
    served phase's."""
    loadlib.add_server_arguments(p, "bench_gpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: only with --quick")
    p.add_argument("--quick", action="store_true", help="smoke test: batches 1,2, one dtype, engine only")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="engine dtypes, in order")
    p.add_argument("--batches", default="1,8,32,64", help="engine batch sizes")
    p.add_argument("--calls", type=int, default=20, help="timed calls per (dtype, batch), after a warm-up")
    p.add_argument(
        "--seconds", type=float, default=30.0, help=f"time bound of a row once {MIN_CALLS} calls ran"
    )
    p.add_argument("--profile-batch", type=int, default=8, help="batch of the profiled beam search")
    p.add_argument("--no-profile", action="store_true", help="no per-step split")
    p.add_argument("--random-pixels", action="store_true", help="random pixels instead of the image corpus")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="decode step as CUDA graphs (engine and server)"
    )
    p.add_argument("--allow-tf32", action="store_true", help="float32 on CUDA with TF32 (engine and server)")
    p.add_argument("--beam-size", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--max-length", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--sample-ms", type=int, default=200, help="GPU utilisation sampling interval")
    p.add_argument("--skip-served", action="store_true", help="the engine part only")
    p.add_argument("--served-dtype", choices=DTYPES, default="float16", help="OFA_DTYPE of the server")
    p.add_argument("--concurrency", default="1,8,32,64", help="served concurrency levels")
    p.add_argument("--served-requests", type=int, default=20000, help="max requests per served phase")
    p.add_argument(
        "--min-served-requests", type=int, default=64, help="requests per phase even past the time"
    )
    p.add_argument("--phase-seconds", type=float, default=30.0, help="time bound of each served phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before each phase (x concurrency)")
    p.add_argument("--report-only", action="store_true", help="report missed targets but exit 0")


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: batches 1 and 2, the first of ``--dtypes`` (on the CPU, float32 unless ``--dtypes`` is given),
    two calls per row, the profile at batch 1, no served phase."""
    if not args.quick:
        return
    args.batches, args.calls, args.profile_batch = QUICK["batches"], QUICK["calls"], QUICK["profile_batch"]
    default = args.dtypes == ",".join(DTYPES)
    args.dtypes = "float32" if args.device == "cpu" and default else args.dtypes.split(",")[0]
    args.skip_served = True


def refusal(
    args: argparse.Namespace, cuda_available: bool, torch_version: str, cuda_build: str | None
) -> str | None:
    """The one sentence refusing the run, or ``None``: an unknown dtype, the CPU without ``--quick``, or no CUDA
    device (unless ``--device cpu --quick``)."""
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        return f"--dtypes names {', '.join(unknown)}, which is not one of {', '.join(DTYPES)}, so nothing was run."
    if args.device == "cpu" and not args.quick:
        return (
            "--device cpu runs only as the smoke test (add --quick), because the GPU benchmark's batches, dtypes "
            "and targets are set for a CUDA device, so nothing was run."
        )
    if args.device == "cuda" and not cuda_available:
        return (
            f"bench-gpu needs a CUDA device but torch {torch_version} (CUDA build: {cuda_build or 'none'}) sees "
            "none, so nothing was run (on a CPU, `--device cpu --quick` runs its smoke test)."
        )
    return None


# ------------------------------------------------------------------------------------------------ card


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version, or ``None`` where no driver answers: ``make setup``'s own reading
    (``requirements/platform_check.py``: /proc/driver/nvidia/version, else ``nvidia-smi``)."""
    path = Path(__file__).resolve().parents[1] / "requirements" / "platform_check.py"
    spec = importlib.util.spec_from_file_location("platform_check", path)
    if spec is None or spec.loader is None:
        return None
    check = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("platform_check", check)  # its dataclasses resolve their module by name
    spec.loader.exec_module(check)
    return check.detect_nvidia_driver() or None


def card_info(device: str) -> dict:
    """The machine of the run: the card (name, compute capability, memory, count), driver, torch, CUDA, cuDNN."""
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "measured_at_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "card": None,
        "driver": None,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            card=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            driver=nvidia_driver(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# -------------------------------------------------------------------------------------- GPU utilisation


def parse_samples(lines: Iterable[str]) -> dict:
    """``index, utilization %, memory MiB`` lines (``nvidia-smi --format=csv,noheader,nounits``) -> per GPU the
    mean and max utilisation and the max memory, and the busiest GPU's figures at the top level."""
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for line in lines:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            util, memory = float(parts[1]), float(parts[2])
        except ValueError:  # "[N/A]", "[Not Supported]"
            continue
        per_gpu.setdefault(parts[0], []).append((util, memory))
    gpus = {
        index: {
            "samples": len(values),
            "util_mean_pct": round(sum(u for u, _ in values) / len(values), 1),
            "util_max_pct": max(u for u, _ in values),
            "memory_max_mib": max(m for _, m in values),
        }
        for index, values in per_gpu.items()
    }
    busiest = max(gpus.values(), key=lambda g: g["util_mean_pct"], default=None)
    return {"gpus": gpus, **(busiest or {"samples": 0})}


class GpuSampler:
    """GPU utilisation and memory every ``interval_ms`` while the ``with`` block runs: ``nvidia-smi -lms`` in a
    process of its own, else NVML (``pynvml``) in a thread. :meth:`summary` is :func:`parse_samples` of what was
    read, with its source, or says why nothing was sampled (the CPU, neither tool)."""

    def __init__(self, enabled: bool, interval_ms: int = 200):
        self.enabled = enabled
        self.interval_ms = interval_ms
        self.lines: list[str] = []
        self.source: str | None = None
        self.why: str | None = None if enabled else "the engine ran on the CPU"
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        if not self.enabled:
            return self
        smi = shutil.which("nvidia-smi")
        if smi is not None:
            cmd = [
                smi,
                f"--query-gpu={SMI_QUERY}",
                "--format=csv,noheader,nounits",
                "-lms",
                str(self.interval_ms),
            ]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
            self.source = "nvidia-smi"
        elif importlib.util.find_spec("pynvml") is not None:
            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
            self.source = "pynvml"
        else:
            self.why = "neither nvidia-smi nor pynvml (nvidia-ml-py) is available"
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)

    def _poll_nvml(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            while not self._stop.is_set():
                for i, handle in enumerate(handles):
                    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                    self.lines.append(f"{i}, {util}, {used:.0f}")
                self._stop.wait(self.interval_ms / 1000)
        except Exception as exc:  # a sampler failure is reported, not fatal to the benchmark
            self.why = f"NVML failed: {exc!r}"

    def summary(self) -> dict:
        """What was sampled (:func:`parse_samples`) and from where, or why nothing was."""
        return {"source": self.source, "why_none": self.why, **parse_samples(self.lines)}


# ------------------------------------------------------------------------------------------- engine


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def engine_pixels(captioner, named: Sequence[tuple[str, bytes]], n: int, random: bool):
    """``n`` float32 CPU pixel images [n,3,S,S]: the corpus decoded and preprocessed once (each image once, then
    repeated round robin), or uniform random pixels in [-1, 1) (seeded)."""
    import torch

    size = captioner.patch_image_size
    if random:
        return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    base = captioner.preprocess([data for _name, data in named[:n]])
    return base[torch.arange(n) % base.shape[0]].contiguous()


def engine_row(captioner, pixels, dtype: str, args: argparse.Namespace) -> dict:
    """One (dtype, batch) row: a warm-up call, then up to ``--calls`` timed calls of ``generate`` on ``pixels``
    (already on the device, in the dtype), each ended by a device synchronisation; GPU utilisation over them."""
    batch = int(pixels.shape[0])

    def call() -> list:
        captions = captioner.generate(pixels, args.beam_size, args.max_length)
        synchronize(captioner.device)
        return captions

    call()  # warm-up at this shape
    latencies: list[float] = []
    captions = 0
    with GpuSampler(captioner.device.type == "cuda", args.sample_ms) as gpu, tool.Stopwatch() as watch:
        for i in range(args.calls):
            if i >= MIN_CALLS and watch.seconds > args.seconds:
                break
            out, seconds = tool.timed(call)
            latencies.append(seconds)
            captions += len(out)
    row = phase_result(
        "engine",
        f"{dtype}, batch {batch}",
        latencies,
        batch * len(latencies),
        sum(latencies),
        dtype=dtype,
        batch=batch,
        captions=captions,
        gpu=gpu.summary(),
    )
    log(f"engine {dtype} batch {batch}: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms per call")
    return row


def count_per_step(
    events: Iterable[tuple[str, bool]], steps: int, cuda: bool, own_device_syncs: int = 0
) -> dict:
    """The per-step split of a profiled beam search from its events ``(name, ran on the device)``.

    Everywhere: ATen operators and ``aten::_local_scalar_dense`` reads (``.item()``, ``bool()``) per step. On
    CUDA also kernels (device events other than copies and memsets), ``cudaStreamSynchronize``,
    ``cudaDeviceSynchronize`` (less ``own_device_syncs``, the profiler run's own), synchronous ``cudaMemcpy`` and
    device-to-host copies per step; ``host_syncs_per_step`` counts the calls that block the host (on the CPU:
    the scalar reads).
    """
    per = max(steps, 1)
    host: Counter[str] = Counter()
    device: Counter[str] = Counter()
    for name, on_device in events:
        (device if on_device else host)[name] += 1
    scalar_reads = host["aten::_local_scalar_dense"]
    row: dict = {
        "decoder_steps": steps,
        "aten_ops_per_step": round(sum(c for n, c in host.items() if n.startswith("aten::")) / per, 1),
        "local_scalar_dense_per_step": round(scalar_reads / per, 2),
    }
    if not cuda:
        row["host_syncs_per_step"] = row["local_scalar_dense_per_step"]
        return row
    stream_syncs = host["cudaStreamSynchronize"]
    device_syncs = max(host["cudaDeviceSynchronize"] - own_device_syncs, 0)
    sync_copies = host["cudaMemcpy"]
    row.update(
        kernels_per_step=round(
            sum(c for n, c in device.items() if not n.startswith(("Memcpy", "Memset"))) / per, 1
        ),
        stream_syncs_per_step=round(stream_syncs / per, 2),
        device_syncs_per_step=round(device_syncs / per, 2),
        sync_memcpy_per_step=round(sync_copies / per, 2),
        memcpy_dtoh_per_step=round(sum(c for n, c in device.items() if n.startswith("Memcpy DtoH")) / per, 2),
        host_syncs_per_step=round((stream_syncs + device_syncs + sync_copies) / per, 2),
    )
    return row


def step_split(captioner, pixels, dtype: str, args: argparse.Namespace) -> dict:
    """(b) One ``torch.profiler`` run of beam search on ``pixels`` (CUDA activity too on a GPU), after an
    unprofiled one: :func:`count_per_step` of its events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ofa_captioning.beam_search import beam_search

    cuda = captioner.device.type == "cuda"
    settings = captioner.search_settings(*captioner.validate_settings(args.beam_size, args.max_length))
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch.inference_mode():
        ids = captioner._prompt_ids.unsqueeze(0).expand(pixels.shape[0], -1)
        encoder_out = captioner.model.encode(ids, pixels)
        graphs = args.cuda_graphs and cuda  # the decode step as served with --cuda-graphs
        hyps = beam_search(captioner.model, encoder_out, settings, cuda_graphs=graphs)
        synchronize(captioner.device)
        with profile(activities=activities) as prof:
            beam_search(captioner.model, encoder_out, settings, cuda_graphs=graphs)
            synchronize(captioner.device)  # the kernels finish inside the profile: one device sync of its own
    device_type = torch.autograd.DeviceType.CUDA
    events = [(e.name, e.device_type == device_type) for e in prof.events()]
    steps = max((len(h.tokens) for hs in hyps for h in hs), default=0)
    row = {"dtype": dtype, "batch": int(pixels.shape[0]), "beam_size": settings.beam_size}
    row.update(count_per_step(events, steps, cuda, own_device_syncs=1 if cuda else 0))
    log(f"step split {dtype} batch {row['batch']}: {row}")
    return row


def engine_phase(model_dir: Path, named, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(a) and (b): for each dtype, the engine loaded, the pixels preprocessed once and moved to the device, one
    row per batch, then the per-step split. Returns the rows and the splits."""
    import torch

    from ofa_captioning.captioner import Captioner

    batches = ints(args.batches)
    rows, splits = [], []
    for dtype in args.dtypes.split(","):
        log(f"engine: loading {model_dir} on {args.device} in {dtype}")
        captioner = Captioner.from_pretrained(
            model_dir, args.device, dtype, allow_tf32=args.allow_tf32, cuda_graphs=args.cuda_graphs
        )
        pixels = engine_pixels(captioner, named, max(batches), args.random_pixels)
        pixels = pixels.to(device=captioner.device, dtype=captioner.dtype)
        rows += [engine_row(captioner, pixels[:batch], dtype, args) for batch in batches]
        if not args.no_profile:
            splits.append(step_split(captioner, pixels[: min(args.profile_batch, max(batches))], dtype, args))
        del captioner, pixels
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows, splits


# ------------------------------------------------------------------------------------------- served


def served_phase(model_dir: Path, named, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """(c) A repository generated with the ``gpu`` profile (unless ``--model-repository`` or ``--no-start``),
    its server started with ``OFA_DTYPE=--served-dtype``, one closed-loop phase per ``--concurrency`` level with
    GPU utilisation sampled over it. Returns the rows and the server's description."""
    from load_tests import bench_served
    from load_tests.corpus import UniqueImages
    from ofa_serving.repository import DEFAULT_NAME, ServedModel, generate_repository, step_names

    generated = None
    if args.model_repository is None and not args.no_start:
        generated = Path(tempfile.mkdtemp(prefix="bench-gpu-repository-"))
        model = ServedModel(DEFAULT_NAME, model_dir, *step_names(DEFAULT_NAME))
        generate_repository([model], generated, profile="gpu")
        args.model_repository = str(generated)
    given = {item.split("=", 1)[0] for item in args.server_env}
    wanted = {"OFA_DTYPE": args.served_dtype}
    wanted.update({"OFA_CUDA_GRAPHS": "true"} if args.cuda_graphs else {})
    wanted.update({"OFA_ALLOW_TF32": "true"} if args.allow_tf32 else {})
    args.server_env += [f"{key}={value}" for key, value in wanted.items() if key not in given]
    corpus = UniqueImages(named, unique=True)
    loadlib.assign_free_ports(args)
    rows: list[dict] = []
    try:
        with loadlib.server_from_args(args) as server:
            repository = Path(args.model_repository or loadlib.REPO_ROOT / "model_repository")
            info = {
                "started_by_bench": server.started,
                "profile": "gpu" if generated else "as given (--model-repository or a running server)",
                "server_env": args.server_env,
                "configs": bench_served.model_configs(repository),
            }
            for concurrency in ints(args.concurrency):
                with GpuSampler(True, args.sample_ms) as gpu:
                    row = bench_served.served_phase(server, corpus, concurrency, args)
                row["gpu"] = gpu.summary()
                rows.append(row)
                log(
                    f"served c={concurrency}: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, "
                    f"ofa batch {row['ofa_avg_batch']}, failures {row['failures']}"
                )
    finally:
        if generated is not None:
            shutil.rmtree(generated, ignore_errors=True)
    return rows, info


# ------------------------------------------------------------------------------------------- targets


def _best(rows: Sequence[dict]) -> dict | None:
    return max(rows, key=lambda r: r.get("images_per_s") or 0, default=None)


def targets(
    engine: Sequence[dict], served: Sequence[dict], card: str | None, served_dtype: str, quick: bool
) -> dict:
    """The checks: in ``--quick``, that every image got a caption; the served best >= 90 % of the engine's best
    in ``served_dtype``; the engine target at its batch and dtype, gated only on its card (``None``: n/a, the
    name says why)."""
    checks: dict[str, bool | None] = {}
    if quick:
        checks["smoke: the engine captioned every image of every call"] = bool(engine) and all(
            r["captions"] == r["images"] and r["images"] > 0 for r in engine
        )
    engine_best = _best([r for r in engine if r["dtype"] == served_dtype])
    served_best = _best(served)
    name = f"served best >= {TARGET_THROUGHPUT_RATIO:.0%} of the engine's best images/s in {served_dtype}"
    if engine_best and served_best and engine_best["images_per_s"]:
        checks[name] = (served_best["images_per_s"] or 0) >= TARGET_THROUGHPUT_RATIO * engine_best[
            "images_per_s"
        ]
    else:
        checks[f"{name} (n/a: {'no served phase' if not served else 'no engine row in ' + served_dtype})"] = (
            None
        )
    t = ENGINE_TARGET
    name = f"engine {t['dtype']} batch {t['batch']} >= {t['images_per_s']:,.0f} images/s on an {t['card']}"
    row = next((r for r in engine if r["dtype"] == t["dtype"] and r["batch"] == t["batch"]), None)
    if not card or t["card"] not in card:
        checks[
            f"{name} (n/a: this run's device is {card or 'the CPU'}; the target is set for an {t['card']})"
        ] = None
    elif row is None:
        checks[f"{name} (n/a: {t['dtype']} at batch {t['batch']} was not measured)"] = None
    else:
        checks[name] = (row["images_per_s"] or 0) >= t["images_per_s"]
    return checks


# --------------------------------------------------------------------------------------------- report


def run(args: argparse.Namespace, server: loadlib.ServerHandle | None = None) -> dict:
    """(a) to (e) as the arguments ask, and the targets (the report's checks)."""
    import torch

    apply_quick(args)
    reason = refusal(args, torch.cuda.is_available(), torch.__version__, torch.version.cuda)
    if reason:
        raise tool.Refused(reason)
    model_dir = loadlib.resolve_model_dir(args.model_dir).resolve()
    named = load_images(args.image_dir)
    card = card_info(args.device)
    log(f"{card['card'] or 'CPU'}; torch {card['torch']}, CUDA {card['cuda_build']}, driver {card['driver']}")
    engine, splits = engine_phase(model_dir, named, args)
    served, server_info = ([], None) if args.skip_served else served_phase(model_dir, named, args)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "card": card,
        "settings": {
            "checkpoint": display_path(model_dir),
            "images": display_path(args.image_dir),
            "pixels": "random" if args.random_pixels else "corpus, decoded and preprocessed once",
            "quick": args.quick,
            "dtypes": args.dtypes,
            "batches": args.batches,
            "calls": args.calls,
            "beam_size": args.beam_size,
            "max_length": args.max_length,
            "served_dtype": args.served_dtype,
            "cuda_graphs": args.cuda_graphs,
            "allow_tf32": args.allow_tf32,
        },
        "engine": engine,
        "step_split": splits,
        "served": served,
        "server": server_info,
        "checks": targets(engine, served, card["card"], args.served_dtype, args.quick),
    }


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _gpu_cells(row: dict) -> list:
    """GPU utilisation mean / max % and memory max MiB of a row (``-`` where nothing was sampled)."""
    gpu = row.get("gpu") or {}
    if not gpu.get("samples"):
        return [None, None]
    return [f"{gpu['util_mean_pct']} / {gpu['util_max_pct']}", f"{gpu['memory_max_mib']:.0f}"]


GPU_COLUMNS = ("GPU util mean / max %", "GPU memory max MiB")
#: The served table's columns: the row's key and its label.
SERVED_COLUMNS = (
    ("concurrency", "concurrency"), ("images_per_s", "images/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
    ("ofa_avg_batch", "ofa batch"), ("ofa_queue_ms", "ofa queue ms"), ("ofa_compute_ms", "ofa compute ms"),
    ("failures", "failures"),
)  # fmt: skip


def markdown(report: dict) -> str:
    """The report as markdown: the card, the engine rows, the per-step split, the served rows, the checks."""
    c = report["card"]
    device = c["card"] or f"CPU ({c.get('cpu')})"
    lines = [
        "# bench-gpu",
        "",
        f"Device: {device}; driver {_cell(c['driver'])}; torch {c['torch']}; CUDA build {_cell(c['cuda_build'])}; "
        f"Python {c['python']}; {c['measured_at_utc']} UTC.",
        "",
        f"Settings: {report['settings']}",
        "",
        "## Engine (in-process, pixels decoded once)",
        "",
        *_table(
            ("dtype", "batch", "images/s", "p50 ms/call", "p99 ms/call", *GPU_COLUMNS),
            (
                [r["dtype"], r["batch"], r["images_per_s"], r["p50_ms"], r["p99_ms"], *_gpu_cells(r)]
                for r in report["engine"]
            ),
        ),
    ]
    if report["step_split"]:
        keys = [k for k in report["step_split"][0] if k not in ("dtype", "batch", "beam_size")]
        rows = (
            [s["dtype"], s["batch"], s["beam_size"], *(s.get(k) for k in keys)] for s in report["step_split"]
        )
        lines += ["", "## Per decoder step (one profiled beam search)", ""]
        lines += _table(("dtype", "batch", "beam", *keys), rows)
    if report["served"]:
        lines += ["", "## Served (gpu profile, gRPC closed loop)", ""]
        keys, labels = zip(*SERVED_COLUMNS, strict=True)
        rows = ([*(r.get(k) for k in keys), *_gpu_cells(r)] for r in report["served"])
        lines += _table((*labels, *GPU_COLUMNS), rows)
    lines += ["", "## Checks", ""]
    lines += [
        f"- {'n/a' if ok is None else 'ok' if ok else 'FAIL'}: {name}"
        for name, ok in report["checks"].items()
    ]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    """The markdown report on stdout."""
    print("\n" + markdown(report))


TOOL = tool.Tool(
    name="bench_gpu",
    description=__doc__.split("\n\n")[0],
    add_arguments=add_arguments,
    run=run,
    summarize=print_report,
    needs_server=False,  # the served phase generates its repository and starts the server after the engine's
    markdown=markdown,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``make bench-gpu``; the exit status of :func:`load_tests.tool.main`."""
    return tool.main(TOOL, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
