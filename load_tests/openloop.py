"""Open-loop load: requests sent at a constant arrival rate, whatever the server's pace (standard library + numpy).

A closed loop (N clients, one request in flight each) slows down with the server: when the server is slow the
clients send less, queueing stays hidden, and the load arrives in synchronized waves that batching likes. Here
the sender keeps a schedule instead: request ``i`` is due at ``i / rate`` seconds after the start, sent then
whether or not earlier ones were answered, and its latency is counted from the time it was *due*, so a late
sender cannot hide the server's queueing (no coordinated omission).

* :func:`schedule`: the due times of one rate;
* :func:`run_rate`: one rate for a number of seconds, with any asynchronous request function;
* :func:`rate_row`, :func:`highest_held`: the latency-versus-rate curve and the highest rate held under a bound;
* :func:`plot_curve`: p50/p99 and throughput against the offered rate (matplotlib, PNG).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from load_tests.loadlib import latency_summary

#: ``start(i, done)`` starts request ``i`` without blocking and calls ``done(error)`` (``None`` on success) once
#: it completes, from any thread.
StartRequest = Callable[[int, Callable[[BaseException | None], None]], None]


def schedule(rate: float, seconds: float) -> list[float]:
    """Due times in seconds from the start of a constant ``rate`` (requests/s) held for ``seconds``.

    ``i / rate`` for ``i = 0 .. n-1`` with ``n = floor(rate * seconds)`` (at least one request), so the last one is
    due before ``seconds`` and the count is exactly the offered load.
    """
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive, got rate={rate} seconds={seconds}")
    count = max(1, math.floor(rate * seconds + 1e-9))
    return [i / rate for i in range(count)]


@dataclass
class RateRun:
    """What happened at one offered rate."""

    rate: float
    seconds: float
    offered: int
    latencies_s: list[float] = field(default_factory=list)
    failures: int = 0
    not_sent: int = (
        0  # due while ``max_in_flight`` requests were outstanding: the sender could not keep the rate
    )
    unfinished: int = 0  # still outstanding ``drain_s`` after the last one was due
    max_send_lag_s: float = 0.0  # how late the sender itself was (a busy client machine shows here)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Outstanding:
    """The requests of a :class:`RateRun` in flight: admits a request while fewer than ``max_in_flight`` are
    outstanding, records each answer or failure into the run, and sets ``idle`` once the sender stopped and
    nothing is outstanding."""

    def __init__(self, run: RateRun, clock: Callable[[], float], max_in_flight: int):
        self.run, self.clock, self.max_in_flight = run, clock, max_in_flight
        self.lock = threading.Lock()
        self.idle = threading.Event()
        self.count = 0
        self.sending = True

    def admit(self) -> bool:
        """Count one more request in flight, or one not sent when ``max_in_flight`` are outstanding."""
        with self.lock:
            if self.count >= self.max_in_flight:
                self.run.not_sent += 1
                return False
            self.count += 1
            return True

    def finisher(self, due: float) -> Callable[[BaseException | None], None]:
        """The ``done`` callback of the request due at ``due``: its latency runs from that time."""

        def done(error: BaseException | None) -> None:
            latency = self.clock() - due
            with self.lock:
                self.count -= 1
                if error is None:
                    self.run.latencies_s.append(latency)
                else:
                    self.run.failures += 1
                    if len(self.run.errors) < 5:
                        self.run.errors.append(repr(error))
                if self.count == 0 and not self.sending:
                    self.idle.set()

        return done

    def stop_sending(self) -> None:
        """The last request was due: ``idle`` is set now if none is outstanding, else by the last answer."""
        with self.lock:
            self.sending = False
            if self.count == 0:
                self.idle.set()


def run_rate(
    start: StartRequest,
    rate: float,
    seconds: float,
    *,
    max_in_flight: int = 256,
    drain_s: float = 120.0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> RateRun:
    """Send requests at ``rate`` per second for ``seconds``; wait up to ``drain_s`` for the last answers.

    Each latency runs from the request's due time to its answer. A request due while ``max_in_flight`` are
    outstanding is not sent and counted in ``not_sent``; answers still missing after the drain count in
    ``unfinished``. Either means the rate was not held.
    """
    times = schedule(rate, seconds)
    run = RateRun(rate=rate, seconds=seconds, offered=len(times))
    outstanding = _Outstanding(run, clock, max_in_flight)
    t0 = clock()
    for i, offset in enumerate(times):
        due = t0 + offset
        delay = due - clock()
        if delay > 0:
            sleep(delay)
        run.max_send_lag_s = max(run.max_send_lag_s, clock() - due)
        if not outstanding.admit():
            continue
        try:
            start(i, outstanding.finisher(due))
        except Exception as exc:  # a request that could not even be sent is a failure, never hidden
            outstanding.finisher(due)(exc)
    outstanding.stop_sending()
    outstanding.idle.wait(drain_s)
    with outstanding.lock:
        run.unfinished = outstanding.count
    run.wall_s = clock() - t0
    return run


def rate_row(run: RateRun, p99_bound_ms: float) -> dict:
    """One point of the curve: offered and achieved rate, latency percentiles, and whether the rate was held.

    Held: every offered request was sent and answered without error, and p99 latency <= ``p99_bound_ms``.
    """
    summary = latency_summary(run.latencies_s)
    completed = len(run.latencies_s)
    reasons = []
    if run.failures:
        reasons.append(f"{run.failures} failed")
    if run.not_sent:
        reasons.append(f"{run.not_sent} not sent (in-flight cap)")
    if run.unfinished:
        reasons.append(f"{run.unfinished} unanswered after the drain")
    if summary["p99_ms"] is None:
        reasons.append("no answer")
    elif summary["p99_ms"] > p99_bound_ms:
        reasons.append(f"p99 {summary['p99_ms']:.0f} ms > {p99_bound_ms:.0f} ms")
    return {
        "offered_per_s": round(run.rate, 4),
        "seconds": run.seconds,
        "offered": run.offered,
        "completed": completed,
        # Answers per second over the offered window, or over the run when the last answers came after it.
        "achieved_per_s": round(completed / max(run.seconds, run.wall_s), 4),
        **summary,
        "failures": run.failures,
        "not_sent": run.not_sent,
        "unfinished": run.unfinished,
        "max_send_lag_ms": round(run.max_send_lag_s * 1000.0, 2),
        "p99_bound_ms": round(p99_bound_ms, 2),
        "held": not reasons,
        "why_not_held": reasons,
        "errors": run.errors,
    }


def highest_held(rows: Sequence[dict]) -> float | None:
    """The highest offered rate such that it and every lower rate tried were held (``None``: not even the lowest).

    A rate held above one that was not is left out: past the first miss the server is overloaded, and a later
    pass is noise, not capacity.
    """
    best = None
    for row in sorted(rows, key=lambda r: r["offered_per_s"]):
        if not row["held"]:
            break
        best = row["offered_per_s"]
    return best


def rates_from(text: str | None, fractions: str, reference_rate: float | None) -> list[float]:
    """The rates to try: ``text`` (``"0.5,1,2"`` requests/s) when given, else ``fractions`` of ``reference_rate``."""
    if text:
        rates = [float(x) for x in text.split(",") if x.strip()]
    else:
        if not reference_rate:
            raise ValueError("no rates given and no reference throughput to derive them from")
        rates = [round(float(f) * reference_rate, 4) for f in fractions.split(",") if f.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive, got {rates}")
    return sorted(rates)


def plot_curve(rows: Sequence[dict], png: Path, title: str, reference_rate: float | None = None) -> Path:
    """Latency (p50, p99) and achieved throughput against the offered rate, with the bound and the highest rate
    held; written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["offered_per_s"])
    offered = [r["offered_per_s"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in (("p50_ms", "o-"), ("p99_ms", "^-")):
        left.plot(offered, [r[key] for r in rows], style, label=key.split("_")[0])
    bound = rows[0]["p99_bound_ms"] if rows else None
    if bound:
        left.axhline(bound, color="tab:red", linestyle="--", label=f"p99 bound {bound:.0f} ms")
    held = highest_held(rows)
    for ax in (left, right):
        if held is not None:
            ax.axvline(held, color="tab:green", linestyle=":", label=f"highest held {held:g}/s")
        ax.grid(True, alpha=0.3)
    for r in rows:
        if not r["held"]:
            left.plot([r["offered_per_s"]], [r["p99_ms"] or 0], "x", color="tab:red", markersize=10)
    left.set(title="Latency against offered rate", xlabel="offered requests/s", ylabel="ms")
    left.legend()
    right.plot(offered, [r["achieved_per_s"] for r in rows], "o-", color="tab:blue", label="answered/s")
    top = max(offered + [r["achieved_per_s"] or 0 for r in rows]) if rows else 1
    right.plot([0, top], [0, top], color="tab:gray", linewidth=0.8, label="answered = offered")
    if reference_rate:
        right.axhline(
            reference_rate, color="tab:purple", linestyle="--", label=f"engine best {reference_rate:g}/s"
        )
    right.set(title="Throughput against offered rate", xlabel="offered requests/s", ylabel="answered/s")
    right.legend()
    for ax in (left, right):  # after every line, so the limits fit them all
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
