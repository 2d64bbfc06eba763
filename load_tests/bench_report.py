"""The reports of ``make bench``: result rows, ratios, targets, the markdown table.

Pure functions over the rows the phases return (``bench``'s in-process phases, ``bench_served``), so they are unit-tested
without a model or a server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import time
from pathlib import Path

from load_tests.loadlib import REPO_ROOT, latency_summary

TARGET_THROUGHPUT_RATIO = (
    0.90  # served images/s (closed loop at concurrency 8, and open loop) vs the engine's best
)
TARGET_LATENCY_RATIO = 1.15  # served p50 at concurrency 1 vs the engine's batch-1 p50


def log(message: str) -> None:
    """A timestamped progress line on stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ints(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def phase_result(path: str, setting: str, latencies: list[float], images: int, wall: float, **extra) -> dict:
    """One row of the results: throughput and latency percentiles of a phase."""
    return {
        "path": path,
        "setting": setting,
        "images": images,
        "calls": len(latencies),
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3) if wall > 0 else None,
        **latency_summary(latencies),
        **extra,
    }


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(rows: list[dict], open_loop: dict | None = None) -> dict:
    """Ratios between the paths and the serving targets (with ``open_loop``, the open-loop one too)."""

    def find(path: str, **match) -> dict | None:
        for row in rows:
            if row["path"] == path and all(row.get(k) == v for k, v in match.items()):
                return row
        return None

    ref = find("reference")
    engine1 = find("engine", batch=1)
    engines = [r for r in rows if r["path"] == "engine"]
    best = max(engines, key=lambda r: r["images_per_s"] or 0) if engines else None
    served = [r for r in rows if r["path"] == "served"]
    served_best = max(served, key=lambda r: r["images_per_s"] or 0) if served else None
    c1, c8 = find("served", concurrency=1), find("served", concurrency=8)

    out = {
        "engine_best": best["setting"] if best else None,
        "engine_best_images_per_s": best["images_per_s"] if best else None,
        "served_best": served_best["setting"] if served_best else None,
        "engine_batch1_vs_reference": _ratio(
            engine1 and engine1["images_per_s"], ref and ref["images_per_s"]
        ),
        "engine_best_vs_reference": _ratio(best and best["images_per_s"], ref and ref["images_per_s"]),
        "served_best_vs_reference": _ratio(
            served_best and served_best["images_per_s"], ref and ref["images_per_s"]
        ),
        "served_c8_vs_engine_best": _ratio(c8 and c8["images_per_s"], best and best["images_per_s"]),
        "served_c1_p50_vs_engine_batch1_p50": _ratio(c1 and c1["p50_ms"], engine1 and engine1["p50_ms"]),
    }
    for row in rows:
        row["vs_reference"] = _ratio(row["images_per_s"], ref and ref["images_per_s"])
        row["vs_engine_best"] = _ratio(row["images_per_s"], best and best["images_per_s"])
    out["targets"] = _targets(out, served, open_loop, best)
    return out


def _targets(out: dict, served: list[dict], open_loop: dict | None, best: dict | None) -> dict[str, bool]:
    """The serving targets the measured paths allow; adds the open loop's figures to ``out``."""
    targets = {}
    if out["served_c8_vs_engine_best"] is not None:
        targets["served c8 images/s >= 90% of engine best"] = (
            out["served_c8_vs_engine_best"] >= TARGET_THROUGHPUT_RATIO
        )
    if out["served_c1_p50_vs_engine_batch1_p50"] is not None:
        targets["served c1 p50 <= 1.15x engine batch-1 p50"] = (
            out["served_c1_p50_vs_engine_batch1_p50"] <= TARGET_LATENCY_RATIO
        )
    if served:
        targets["no served request failed"] = all(r["failures"] == 0 for r in served)
        targets["no response-cache hit in served phases"] = all(not r["cache_hits"] for r in served)
    if open_loop is not None:
        held = open_loop["highest_held_per_s"]
        out["open_loop_highest_held_per_s"] = held
        out["open_loop_p99_bound_ms"] = open_loop["p99_bound_ms"]
        reference = best["images_per_s"] if best else open_loop.get("reference_rate")
        out["open_loop_held_vs_engine_best"] = _ratio(held, reference) if held is not None else 0.0
        if reference:
            targets[
                f"open loop: highest rate held (p99 <= {open_loop['p99_bound_ms']:.0f} ms) >= 90% of engine best"
            ] = out["open_loop_held_vs_engine_best"] >= TARGET_THROUGHPUT_RATIO
        targets["open loop: no request failed"] = all(r["failures"] == 0 for r in open_loop["rows"])
    return targets


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    """The results as a markdown section (table, ratios, targets, how it was measured)."""
    env, summary = result["environment"], result["summary"]
    load_start = env["load_average_at_start"][0]
    load_end = env.get("load_average_at_end", [float("nan")])[0]
    busy = load_start > 0.5 * (env["cpus"] or 1)  # at the end it includes the bench's own load
    quiet_note = (
        ": **other processes were running, these numbers are not those of a quiet machine**" if busy else ""
    )
    lines = [
        f"Measured {env['date']} on {env['cpu']} ({env['cpus']} CPUs"
        f"{', GPU ' + env['gpu'] if env.get('gpu') else ', no GPU'}), engine on {env.get('device')} "
        f"({env.get('dtype')}), torch {env['torch']} "
        f"({env['torch_threads']} threads in-process), checkpoint `{env['checkpoint']}`, "
        f"{env['images']} images from `{env['image_dir']}`, beam size {env['beam_size']}, max length "
        f"{env['max_length']}, commit `{env['commit']}`. Load average (1 min) {load_start:.1f} at the start and "
        f"{load_end:.1f} at the end{quiet_note}.",
        "",
        "| path | setting | images | images/s | p50 ms | p95 ms | p99 ms | x reference | vs engine best "
        "| ofa avg batch | ofa queue ms | ofa compute ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["phases"]:
        lines.append(
            f"| {r['path']} | {r['setting']} | {r['images']} | {_fmt(r['images_per_s'], 2)} | {_fmt(r['p50_ms'])} "
            f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r.get('vs_reference'), 1)} "
            f"| {_fmt(r.get('vs_engine_best') and r['vs_engine_best'] * 100, 0)}% "
            f"| {_fmt(r.get('ofa_avg_batch'), 2)} | {_fmt(r.get('ofa_queue_ms'))} | {_fmt(r.get('ofa_compute_ms'))} |"
        )
    lines += [
        "",
        "Latency is per call: one image, except engine batch B (one call = B images). ofa columns: Triton's "
        "metrics over the phase (average executed batch = nv_inference_count / nv_inference_exec_count; queue "
        "and compute-infer time per request).",
        "",
    ]
    for key, value in summary.items():
        if key != "targets":
            lines.append(
                f"- {key.replace('_', ' ')}: {_fmt(value, 3) if isinstance(value, float) else value}"
            )
    lines.append("")
    for name, ok in summary["targets"].items():
        lines.append(f"- target: {name}: **{'met' if ok else 'MISSED'}**")
    if result.get("open_loop"):
        lines += ["", *open_loop_markdown(result["open_loop"])]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def display_path(path: str | Path) -> str:
    """``path`` relative to the checkout when inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def environment_info(args: argparse.Namespace, model_dir: Path, n_images: int) -> dict:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    checkpoint = display_path(model_dir)
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": getattr(args, "engine_device", args.device),
        "dtype": getattr(args, "engine_dtype", args.dtype),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "checkpoint": checkpoint,
        "image_dir": display_path(args.image_dir),
        "images": n_images,
        "beam_size": args.beam_size or "default",
        "max_length": args.max_length or "default",
        "commit": commit or "?",
        "load_average_at_start": os.getloadavg(),
    }


def open_loop_markdown(open_loop: dict) -> list[str]:
    """The open-loop curve as markdown lines: one row per offered rate, then the highest rate held."""
    lines = [
        f"Open loop (constant arrival rate, gRPC, latency from each request's due time; p99 bound "
        f"{open_loop['p99_bound_ms']:.0f} ms = {open_loop['bound_source']}):",
        "",
        "| offered /s | answered /s | sent | p50 ms | p99 ms | failed | not sent | held | ofa avg batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in open_loop["rows"]:
        held = "yes" if r["held"] else "no: " + "; ".join(r["why_not_held"])
        lines.append(
            f"| {_fmt(r['offered_per_s'], 3)} | {_fmt(r['achieved_per_s'], 3)} | {r['offered']} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {r['failures']} | {r['not_sent']} | {held} "
            f"| {_fmt(r.get('ofa_avg_batch'), 2)} |"
        )
    held = open_loop["highest_held_per_s"]
    lines += [
        "",
        f"Highest rate held: **{_fmt(held, 3) if held is not None else 'none'}** requests/s"
        + (f" (plot: `{open_loop['plot']}`)" if open_loop.get("plot") else ""),
    ]
    return lines


def verdict(summary: dict) -> list[str]:
    """The targets missed (empty: all met)."""
    return [name for name, ok in summary["targets"].items() if not ok]
