#!/usr/bin/env python
"""``make load-test``: a bounded Locust run against the ``caption`` ensemble, with reports, a plot and a verdict.

1. Uses the Triton server answering on the target ports, or starts one with ``ofa_serving``'s launcher
   (``OFA_MODEL_DIR``, else the demo checkpoint) and stops it at the end.
2. Runs Locust headless with ``load_tests/locustfile.py`` and the step shape of ``load_tests/step_shape.py``
   (default 60 s, users 1 -> 2 -> 4 -> 8 -> 16), writing ``<prefix>_stats.csv``, ``_stats_history.csv``,
   ``_failures.csv``, ``_exceptions.csv`` and ``<prefix>.html`` under ``load_tests/results/``.
3. Plots requests/s and p50/p95/p99 latency against the number of users (``<prefix>.png``) and prints a summary
   (also ``<prefix>_summary.json``), with ``ofa``'s average executed batch size from Triton's metrics.
4. Exits 1 if any request failed, none succeeded, Locust failed, or the p95 latency went over its bound. The
   bound is ``--max-p95-ms`` when given; else it is derived from the served latency of a lone request, measured
   just before the run (``--probe-requests`` sequential requests with the run's settings, their median):
   ``--bound-factor`` (1.5) x the largest user count x that latency. A closed loop of N users waits at worst for
   the N requests in front of it served one after the other; batching only shortens that.

Example: ``.venv/bin/python load_tests/run_load_test.py --duration 30 --steps 1,4,8 --protocol http``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from load_tests import tool
from load_tests.corpus import DEFAULT_IMAGE_DIR, UniqueImages, load_images
from load_tests.loadlib import (
    METRICS_PACKAGES,
    PLOT_PACKAGES,
    REPO_ROOT,
    RESULTS_DIR,
    ServerHandle,
    latency_summary,
    model_metrics_delta,
    parse_steps,
    server_from_args,
    settled_metrics,
)

HERE = Path(__file__).resolve().parent
#: Margin of the derived p95 bound over its worst case without batching (N users x a lone request's latency).
DEFAULT_BOUND_FACTOR = 1.5
LOCUSTFILES = f"{HERE / 'locustfile.py'},{HERE / 'step_shape.py'}"
#: The server options of the other tools that this one does not offer: a server it starts gets the launcher's
#: model repository, the checkpoint of ``OFA_MODEL_DIR`` (else the demo one), no extra environment or flags.
SERVER_DEFAULTS = {"model_dir": None, "model_repository": None, "server_env": [], "server_arg": []}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load test's options: where the server is (``TRITON_HOST``, ``HTTP_PORT``, ``GRPC_PORT``,
    ``METRICS_PORT``; 127.0.0.1:8000-8002), the steps, the users' settings, the p95 bound, where the files go."""
    env = os.environ.get
    parser.add_argument("--duration", type=int, default=60, help="run time in seconds (60)")
    parser.add_argument("--steps", default="1,2,4,8,16", help="user counts, each held duration/len(steps) s")
    parser.add_argument(
        "--protocol", choices=["grpc", "http", "both"], default=env("OFA_LOAD_PROTOCOL", "grpc")
    )
    parser.add_argument("--host", default=env("TRITON_HOST", "127.0.0.1"), help="server address (127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=int(env("HTTP_PORT", "8000")))
    parser.add_argument("--grpc-port", type=int, default=int(env("GRPC_PORT", "8001")))
    parser.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "8002")))
    parser.add_argument("--image-dir", default=env("OFA_LOAD_IMAGES", str(DEFAULT_IMAGE_DIR)))
    parser.add_argument(
        "--beam-size", type=int, default=int(env("OFA_BEAM_SIZE", "0")), help="0 = server default"
    )
    parser.add_argument(
        "--max-length", type=int, default=int(env("OFA_MAX_LENGTH", "0")), help="0 = server default"
    )
    parser.add_argument("--wait-max", type=float, default=0.0, help="think time per user, uniform in [0, s]")
    parser.add_argument(
        "--cache-bust", choices=["on", "off"], default="on", help="distinct bytes per request"
    )
    parser.add_argument(
        "--max-p95-ms",
        type=float,
        default=float(env("LOAD_P95_MS") or 0) or None,
        help="p95 bound in ms (default: derived, see --bound-factor)",
    )
    parser.add_argument(
        "--bound-factor",
        type=float,
        default=float(env("LOAD_BOUND_FACTOR") or DEFAULT_BOUND_FACTOR),
        help="derived p95 bound = this x the largest user count x a lone request's latency (1.5)",
    )
    parser.add_argument(
        "--probe-requests", type=int, default=3, help="lone requests timed before the run (after one warm-up)"
    )
    parser.add_argument("--processes", type=int, default=0, help="Locust --processes (0 = one process)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--prefix", default="load", help="file name prefix under --results-dir")
    parser.add_argument("--name", default=None, help="the summary's file stem (default: <prefix>_summary)")
    parser.add_argument("--no-start", action="store_true", help="fail instead of starting a server")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument(
        "--locust-arg", action="append", default=[], help="extra argument for locust (repeat)"
    )
    parser.set_defaults(**SERVER_DEFAULTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The load test's arguments."""
    return tool.parse_args(TOOL, argv)


def locust_command(args: argparse.Namespace, prefix: Path) -> list[str]:
    """The headless Locust command line of this run."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        LOCUSTFILES,
        "--headless",
        "--only-summary",
        "--run-time",
        f"{args.duration}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(prefix),
        # History rows with the *current* (last 10 s) percentiles; without it Locust writes cumulative ones.
        "--csv-full-history",
        "--html",
        f"{prefix}.html",
        "--exit-code-on-error",
        "1",
        "--step-users",
        args.steps,
        "--triton-host",
        args.host,
        "--grpc-port",
        str(args.grpc_port),
        "--http-port",
        str(args.http_port),
        "--protocol",
        args.protocol,
        "--image-dir",
        str(args.image_dir),
        "--beam-size",
        str(args.beam_size),
        "--max-length",
        str(args.max_length),
        "--wait-max",
        str(args.wait_max),
        "--cache-bust",
        args.cache_bust,
        "--final-stats",
        f"{prefix}_final.json",
    ]
    if args.processes:
        cmd += ["--processes", str(args.processes)]
    return cmd + list(args.locust_arg)


def run_locust(cmd: list[str], timeout: float) -> int:
    """Run Locust in its own process group; kill the group if it outlives ``timeout`` seconds."""
    print("+", " ".join(cmd), flush=True)
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"locust did not finish within {timeout:.0f} s: killing it", file=sys.stderr)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 124
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): take Locust down with us
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


# ---------------------------------------------------------------------------------------------- reports


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def read_final(final_json: Path) -> tuple[dict, list[dict], list[dict]]:
    """Totals, per-type rows and errors from the locustfile's ``--final-stats`` file (every request counted)."""
    data = json.loads(final_json.read_text())
    keys = ("requests", "failures", "requests_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms")
    total = {k: data["total"][k] for k in keys}
    per_type = [
        {
            k: e[k]
            for k in ("type", "name", "requests", "failures", "requests_per_s", "p50_ms", "p95_ms", "p99_ms")
        }
        for e in data["entries"]
    ]
    return total, per_type, data["errors"]


def derived_bound(lone_latency_ms: float, max_users: int, factor: float = DEFAULT_BOUND_FACTOR) -> float:
    """The p95 bound of a closed loop of up to ``max_users``: ``factor x max_users x lone_latency_ms``."""
    if lone_latency_ms <= 0 or max_users < 1 or factor <= 0:
        raise ValueError(
            f"cannot derive a bound from {lone_latency_ms} ms, {max_users} users, factor {factor}"
        )
    return factor * max_users * lone_latency_ms


def probe_latency(args: argparse.Namespace) -> dict:
    """A lone request's served latency: one warm-up, then ``--probe-requests`` sequential gRPC requests with the
    run's settings and distinct images; their latency summary (ms)."""
    import tritonclient.grpc as grpcclient

    from load_tests.reliabilitylib import caption_inputs

    corpus = UniqueImages(load_images(args.image_dir))
    settings = (args.beam_size or None, args.max_length or None)
    outputs = [grpcclient.InferRequestedOutput("caption")]
    latencies = []
    from client import with_api_key

    # The inference key, where the server wants one, from $CAPTION_API_KEY (or $CAPTION_API_KEY_FILE).
    with with_api_key(grpcclient.InferenceServerClient(f"{args.host}:{args.grpc_port}"), "grpc") as client:
        for i in range(args.probe_requests + 1):
            inputs = caption_inputs(grpcclient, [corpus.next()[1]], *settings)
            start = time.perf_counter()
            client.infer("caption", inputs, outputs=outputs, client_timeout=300)
            if i:  # the first one warms the channel up
                latencies.append(time.perf_counter() - start)
    return latency_summary(latencies)


def latency_bound(args: argparse.Namespace, max_users: int) -> dict:
    """The run's p95 bound: ``--max-p95-ms`` as given, else :func:`derived_bound` from :func:`probe_latency`."""
    if args.max_p95_ms:
        return {"max_p95_ms": args.max_p95_ms, "source": "--max-p95-ms"}
    probe = probe_latency(args)
    bound = derived_bound(probe["p50_ms"], max_users, args.bound_factor)
    return {
        "max_p95_ms": round(bound, 1),
        "source": (
            f"derived: {args.bound_factor:g} x {max_users} users x {probe['p50_ms']:.0f} ms "
            f"(median of {probe['count']} lone requests before the run)"
        ),
        "probe": probe,
        "factor": args.bound_factor,
        "max_users": max_users,
    }


def _aggregated_rows(history_csv: Path, until_s: float | None = None) -> list[dict[str, str]]:
    """The ``Aggregated`` rows of Locust's history, up to ``until_s`` seconds after the first one."""
    with open(history_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == "Aggregated"]
    if rows and until_s is not None:
        t0 = float(rows[0]["Timestamp"])
        rows = [row for row in rows if float(row["Timestamp"]) - t0 <= until_s]
    return rows


def _user_steps(rows: list[dict[str, str]], expected: list[int] | None) -> list[list[dict[str, str]]]:
    """The history rows grouped into runs of one user count (the steps); with ``expected``, only runs whose
    count is the next expected one."""
    steps: list[list[dict[str, str]]] = []
    pending = list(expected) if expected is not None else None
    current: int | None = None
    for row in rows:
        users = int(float(row["User Count"] or 0))
        if users == current:
            steps[-1].append(row)
            continue
        current = None
        if users <= 0:
            continue
        if pending is not None:
            if not pending or users != pending[0]:
                continue
            pending.pop(0)
        current = users
        steps.append([row])
    return steps


def _step_summary(step: list[dict[str, str]], settle_s: float) -> dict[str, float]:
    """Users, seconds, requests/s (from the growth of the request total after ``settle_s``) and the
    percentiles of the step's last row."""
    start = float(step[0]["Timestamp"])
    settled = [r for r in step if float(r["Timestamp"]) - start >= settle_s]
    if len(settled) < 2:
        settled = step
    last = step[-1]
    rps = 0.0
    if len(settled) >= 2:
        span = float(settled[-1]["Timestamp"]) - float(settled[0]["Timestamp"])
        done = float(settled[-1]["Total Request Count"]) - float(settled[0]["Total Request Count"])
        rps = done / span if span > 0 else 0.0
    return {
        "users": int(float(last["User Count"])),
        "seconds": float(last["Timestamp"]) - start + 1,
        "requests_per_s": round(rps, 2),
        "p50_ms": _number(last["50%"]),
        "p95_ms": _number(last["95%"]),
        "p99_ms": _number(last["99%"]),
    }


def history_by_users(
    history_csv: Path,
    settle_s: float = 2.0,
    until_s: float | None = None,
    expected: list[int] | None = None,
) -> list[dict[str, float]]:
    """Per user-count step: requests/s and the p50/p95/p99 at the step's end.

    Requests/s comes from the growth of Locust's ``Total Request Count`` over the step, leaving out the first
    ``settle_s`` seconds (spawning); it is exact, unlike the history's smoothed ``Requests/s`` column. The
    percentiles are those of the step's last history row, which Locust computes over a sliding 10 s window:
    with steps of at least 10 s they describe that step alone. Rows later than ``until_s`` seconds after the
    first one (users stopping while their last requests finish) are left out. With ``expected`` (the shape's
    user counts, in order) only runs of rows that match the next expected count are steps: the transient counts
    Locust reports while it spawns or stops users (e.g. 9 on the way down from 16) are not.
    """
    steps = _user_steps(_aggregated_rows(history_csv, until_s), expected)
    return [_step_summary(step, settle_s) for step in steps]


def time_series(history_csv: Path) -> list[dict[str, float | None]]:
    """Seconds since start, users, requests/s and p95 of every ``Aggregated`` history row."""
    rows = _aggregated_rows(history_csv)
    if not rows:
        return []
    t0 = float(rows[0]["Timestamp"])
    return [
        {
            "t": float(r["Timestamp"]) - t0,
            "users": _number(r["User Count"]),
            "requests_per_s": _number(r["Requests/s"]),
            "p95_ms": _number(r["95%"]),
        }
        for r in rows
    ]


def plot(
    history_csv: Path,
    png: Path,
    title: str,
    until_s: float | None = None,
    expected: list[int] | None = None,
) -> None:
    """Requests/s and p50/p95/p99 latency against users (top), and the run over time (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history_by_users(history_csv, until_s=until_s, expected=expected)
    series = time_series(history_csv)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    users = [s["users"] for s in steps]
    axes[0][0].plot(users, [s["requests_per_s"] for s in steps], "o-", color="tab:blue")
    axes[0][0].set(title="Throughput", xlabel="users", ylabel="requests/s")
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        axes[0][1].plot(users, [s[key] for s in steps], style, label=key.split("_")[0])
    axes[0][1].set(title="Latency (last 10 s of each step)", xlabel="users", ylabel="ms")
    axes[0][1].legend()
    for ax in axes[0]:
        if users and min(users) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(users)), [str(u) for u in sorted(set(users))])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    t = [s["t"] for s in series]
    axes[1][0].plot(t, [s["requests_per_s"] for s in series], color="tab:blue", label="requests/s")
    twin = axes[1][0].twinx()
    twin.step(t, [s["users"] for s in series], where="post", color="tab:gray", label="users")
    axes[1][0].set(title="Over time", xlabel="seconds", ylabel="requests/s")
    twin.set_ylabel("users")
    axes[1][1].plot(t, [s["p95_ms"] for s in series], color="tab:red")
    axes[1][1].set(title="p95 latency over time", xlabel="seconds", ylabel="ms")
    for ax in axes[1]:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_checks(summary: dict, max_p95_ms: float, locust_rc: int) -> list[tuple[str, bool, str]]:
    """``(check, passed, reason when not)`` of a run: Locust succeeded, requests were sent, none failed, the p95
    latency is within ``max_p95_ms``."""
    total = summary["total"]
    p95 = total["p95_ms"]
    within = p95 is None or p95 <= max_p95_ms
    return [
        ("locust exited with 0", locust_rc == 0, f"locust exited with {locust_rc}"),
        ("requests were sent", total["requests"] > 0, "no request was sent"),
        (
            "no failed request",
            not total["failures"],
            f"{total['failures']} of {total['requests']} requests failed",
        ),
        (
            f"p95 within {max_p95_ms:.0f} ms",
            within,
            "" if within else f"p95 {p95:.0f} ms is over the bound of {max_p95_ms:.0f} ms",
        ),
    ]


def verdict(summary: dict, max_p95_ms: float, locust_rc: int) -> list[str]:
    """Reasons for a non-zero exit (empty: passed): the reason of each failed :func:`load_checks`."""
    return [reason for _name, ok, reason in load_checks(summary, max_p95_ms, locust_rc) if not ok]


def print_summary(summary: dict) -> None:
    total = summary["total"]
    print("\n== load test summary ==")
    print(
        f"requests {total['requests']}, failures {total['failures']}, {total['requests_per_s'] or 0:.2f} req/s; "
        f"latency p50 {total['p50_ms']} ms, p95 {total['p95_ms']} ms, p99 {total['p99_ms']} ms, max {total['max_ms']} ms"
    )
    print(f"{'users':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for step in summary["steps"]:
        print(
            f"{step['users']:>5} {step['requests_per_s']:>8.2f} {step['p50_ms'] or 0:>8.0f} "
            f"{step['p95_ms'] or 0:>8.0f} {step['p99_ms'] or 0:>8.0f}"
        )
    ofa = summary.get("ofa_metrics") or {}
    if ofa.get("avg_batch"):
        print(
            f"ofa: {ofa['nv_inference_count']:.0f} images in {ofa['nv_inference_exec_count']:.0f} executions "
            f"(average batch {ofa['avg_batch']}), queue {ofa['queue_ms']} ms vs compute {ofa['compute_ms']} ms "
            "per request"
        )
    for error in summary.get("errors", [])[:5]:
        print(f"error ({error['occurrences']}x, {error['type']}): {error['error']}")
    bound = summary.get("bound") or {}
    if bound:
        print(f"p95 bound: {bound['max_p95_ms']:.0f} ms ({bound['source']})")
    for name, path in summary["files"].items():
        print(f"{name}: {path}")


def measure(args: argparse.Namespace, server: ServerHandle, prefix: Path, max_users: int) -> dict:
    """Against a ready ``server``: the p95 bound, then the Locust run with ``ofa``'s metrics around it."""
    try:
        bound = latency_bound(args, max_users)
    except Exception as exc:  # a server that cannot caption one image fails the run here, clearly
        return {"failure": f"the lone-request probe that derives the p95 bound failed: {exc!r}"}
    print(f"p95 bound: {bound['max_p95_ms']:.0f} ms ({bound['source']})", flush=True)
    try:
        before = settled_metrics(server.host, server.metrics_port)
    except OSError:
        before = None
    with tool.Stopwatch() as watch:
        rc = run_locust(locust_command(args, prefix), timeout=args.duration + 120)
    ofa = None
    if before is not None:
        try:
            ofa = model_metrics_delta(before, settled_metrics(server.host, server.metrics_port), "ofa")
        except OSError:
            ofa = None
    return {"bound": bound, "locust_exit_code": rc, "wall_s": round(watch.seconds, 1), "ofa_metrics": ofa}


def summary_report(args: argparse.Namespace, prefix: Path, expected: list[int], measured: dict) -> dict:
    """The run's summary from what Locust wrote under ``prefix``: totals, steps, errors, files, checks."""
    history_csv = Path(f"{prefix}_stats_history.csv")
    final_json = Path(f"{prefix}_final.json")
    total, per_type, errors = read_final(final_json)
    summary = {
        "command": " ".join(sys.argv),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in SERVER_DEFAULTS
        },
        **measured,
        "total": total,
        "per_type": per_type,
        "errors": errors,
        "steps": history_by_users(history_csv, until_s=args.duration + 1, expected=expected)
        if history_csv.exists()
        else [],
        "files": {
            "final": str(final_json),
            "stats": f"{prefix}_stats.csv",
            "history": str(history_csv),
            "html": f"{prefix}.html",
        },
    }
    if not args.no_plot and history_csv.exists():
        png = Path(f"{prefix}.png")
        title = f"caption ensemble over {args.protocol}, {args.duration} s, users {args.steps}"
        plot(history_csv, png, title, until_s=args.duration + 1, expected=expected)
        summary["files"]["plot"] = str(png)
    summary["files"]["summary"] = str(args.results_dir / f"{args.name}.json")
    checks = load_checks(summary, measured["bound"]["max_p95_ms"], measured["locust_exit_code"])
    summary["checks"] = {name: ok for name, ok, _reason in checks}
    summary["reasons"] = [reason for _name, ok, reason in checks if not ok]
    return summary


def run(args: argparse.Namespace, _server: None = None) -> dict:
    """``make load-test``: the server (used or started), the p95 bound, Locust, the summary with its checks."""
    try:
        expected = parse_steps(args.steps)
    except ValueError as exc:
        raise tool.Refused(str(exc)) from exc
    args.name = args.name or f"{args.prefix}_summary"
    prefix = args.results_dir / args.prefix
    for stale in [*args.results_dir.glob(f"{args.prefix}_*.csv"), Path(f"{prefix}_final.json")]:
        stale.unlink(missing_ok=True)
    log_file = args.results_dir / f"{args.prefix}_tritonserver.log"
    with server_from_args(args, log_file=log_file) as server:
        print(
            f"server: {'started by this run' if server.started else 'already running'} on {args.host} "
            f"(http {args.http_port}, grpc {args.grpc_port}, metrics {args.metrics_port})",
            flush=True,
        )
        measured = measure(args, server, prefix, max(expected))
    if "failure" in measured:
        return {**measured, "checks": {"the lone-request probe answered": False}}
    if not Path(f"{prefix}_final.json").exists():
        failure = f"locust wrote no {prefix}_final.json (exit code {measured['locust_exit_code']})"
        return {**measured, "failure": failure, "checks": {"locust wrote its final statistics": False}}
    return summary_report(args, prefix, expected, measured)


def summarize(report: dict) -> None:
    """The summary table, then ``PASS`` (stdout) or ``FAIL`` with the reasons (stderr)."""
    if "failure" in report:
        print(f"FAIL: {report['failure']}", file=sys.stderr, flush=True)
        return
    print_summary(report)
    if report["reasons"]:
        print("FAIL: " + "; ".join(report["reasons"]), file=sys.stderr, flush=True)
        return
    bound = report["bound"]
    print(f"PASS: no failed request, p95 within {bound['max_p95_ms']:.0f} ms ({bound['source']})", flush=True)


TOOL = tool.Tool(
    name="load",
    description=__doc__.split("\n\n")[0],
    add_arguments=add_arguments,
    run=run,
    summarize=summarize,
    needs_server=False,
    needs=("locust", *METRICS_PACKAGES, *PLOT_PACKAGES),
)


def main(argv: list[str] | None = None) -> int:
    """``make load-test``: the exit status (0 passed, 1 a check failed, 2 refused)."""
    return tool.main(TOOL, argv)


if __name__ == "__main__":
    sys.exit(main())
