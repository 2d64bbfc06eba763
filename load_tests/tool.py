"""The one skeleton of the harness's command-line tools, their one timer and their one verdict printer.

Every tool (``bench``, ``bench_engine``, ``soak``, ``burst``, ``run_load_test``) is a :class:`Tool` configuration
run by :func:`main`: arguments -> server -> load -> checks -> report JSON (+ markdown where the tool writes one)
-> table -> verdict -> exit status. The exit status is 0 when every check passed, 1 when one failed or none
ran, and 2 when the run was refused before it measured anything (a missing package, no CUDA device, arguments
that contradict each other: :class:`Refused`, or argparse's own refusal).

* :class:`Stopwatch` and :func:`timed`: wall-clock time (``time.perf_counter``) of a block or a call;
* :func:`print_verdict`: one line per check, ``[ok] name`` or a red ``[FAIL] name``; :func:`print_red`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from load_tests.loadlib import ServerHandle

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
RED, RESET = "\033[31m", "\033[0m"


class Refused(Exception):
    """The run cannot take place here (a missing package, no CUDA device, contradicting arguments); the message
    is one sentence that says why. :func:`main` prints it and exits 2."""


# ------------------------------------------------------------------------------------------------ timer


class Stopwatch:
    """Wall-clock seconds of a block: ``with Stopwatch() as watch: ...; watch.seconds``.

    It starts when made and again on ``with`` (or ``restart()``); ``seconds`` is the time so far while it runs and the block's time
    once the block ends. ``lap()`` returns the seconds since the previous lap (or the start), for timing the calls
    of a loop one by one.
    """

    def __init__(self) -> None:
        self._start = self._lap = time.perf_counter()
        self._stop: float | None = None

    def __enter__(self) -> Stopwatch:
        self.restart()
        return self

    def restart(self) -> None:
        """Start again from now (what ``with`` does on entry)."""
        self._start = self._lap = time.perf_counter()
        self._stop = None

    def __exit__(self, *exc_info: object) -> None:
        self._stop = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds from the start to the end of the block (or to now while it runs)."""
        end = self._stop if self._stop is not None else time.perf_counter()
        return end - self._start

    def lap(self) -> float:
        """Seconds since the previous ``lap()`` (the first: since the start)."""
        now = time.perf_counter()
        seconds, self._lap = now - self._lap, now
        return seconds


def timed(fn: Callable[..., Any], *args: Any, repeats: int = 1) -> tuple[Any, float]:
    """``fn(*args)`` run ``repeats`` times: the last result and the fastest call's seconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    best = float("inf")
    result = None
    for _ in range(repeats):
        with Stopwatch() as watch:
            result = fn(*args)
        best = min(best, watch.seconds)
    return result, best


# ---------------------------------------------------------------------------------------------- verdict


def print_red(text: str, stream: TextIO | None = None) -> None:
    """``text`` on ``stream`` (default stderr), in red on a terminal unless ``NO_COLOR`` is set."""
    stream = stream or sys.stderr
    color = stream.isatty() and "NO_COLOR" not in os.environ
    print(f"{RED}{text}{RESET}" if color else text, file=stream, flush=True)


def checks_passed(checks: Mapping[str, bool | None]) -> bool:
    """Whether at least one check ran and none failed (``None``: a check that did not apply to this run)."""
    ran = [ok for ok in checks.values() if ok is not None]
    return bool(ran) and all(ran)


def print_verdict(checks: Mapping[str, bool | None], stream: TextIO | None = None) -> bool:
    """One line per check: ``[ok] name``, a red ``[FAIL] name``, or ``[n/a] name`` for a check that did not apply
    (``None``). Returns :func:`checks_passed`: False when no check ran, which it says in a red line."""
    stream = stream or sys.stdout
    for name, ok in checks.items():
        if ok is None:
            print(f"[n/a] {name}", file=stream, flush=True)
        elif ok:
            print(f"[ok] {name}", file=stream, flush=True)
        else:
            print_red(f"[FAIL] {name}", stream)
    passed = checks_passed(checks)
    if not any(ok is not None for ok in checks.values()):
        print_red("[FAIL] no check ran: the phases the checks compare were skipped", stream)
    return passed


# --------------------------------------------------------------------------------------------- skeleton


@dataclass
class Tool:
    """One command-line tool of the harness, run by :func:`main`.

    ``add_arguments`` adds the tool's options (with ``needs_server``, after the server options of
    ``loadlib.add_server_arguments``); every tool gets ``--results-dir`` and ``--name`` (default: ``name``), the
    report's folder and file stem. ``run(args, server)`` measures and returns the report, a JSON-able dict with ``"checks"``
    (``{name: bool}``; ``None`` = did not apply); ``server`` is the ready server when ``needs_server``, else
    ``None``. ``summarize(report)`` prints the table. ``needs``: the packages checked before anything runs.
    ``markdown(report)``, when given, is also written beside the JSON as ``<name>.md``. ``check_arguments(args)``,
    when given, fills in derived defaults and returns the reason to refuse arguments that contradict each other
    (argparse's refusal, exit 2, before any server starts), else ``None``.
    """

    name: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, ServerHandle | None], dict]
    summarize: Callable[[dict], None]
    needs_server: bool = True
    needs: tuple[str, ...] = ()
    markdown: Callable[[dict], str] | None = None
    check_arguments: Callable[[argparse.Namespace], str | None] | None = None


def build_parser(tool: Tool) -> argparse.ArgumentParser:
    """The tool's argument parser: the server options (with ``needs_server``), the tool's own, and
    ``--results-dir``/``--name`` where neither added them."""
    from load_tests import loadlib

    parser = argparse.ArgumentParser(description=tool.description)
    if tool.needs_server:
        loadlib.add_server_arguments(parser, tool.name)
    tool.add_arguments(parser)
    # A tool that starts its server itself may add the server options (and with them these two) on its own.
    if "--results-dir" not in parser._option_string_actions:
        parser.add_argument("--results-dir", type=Path, default=loadlib.RESULTS_DIR)
    if "--name" not in parser._option_string_actions:
        parser.add_argument("--name", default=tool.name, help="output file stem under --results-dir")
    return parser


def parse_args(tool: Tool, argv: list[str] | None = None) -> argparse.Namespace:
    """The tool's arguments parsed from ``argv`` (default: the command line) and settled by the tool's
    ``check_arguments``; argparse exits 2 on bad ones."""
    parser = build_parser(tool)
    args = parser.parse_args(argv)
    problem = tool.check_arguments(args) if tool.check_arguments else None
    if problem:
        parser.error(problem)
    return args


def write_report(report: dict, results_dir: Path, name: str, markdown: Callable[[dict], str] | None) -> Path:
    """``<results_dir>/<name>.json`` (and ``.md`` with ``markdown``); returns the JSON's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    return path


def _measure(tool: Tool, args: argparse.Namespace) -> dict:
    """The tool's run, with the server started (or reused) around it when the tool needs one."""
    if not tool.needs_server:
        return tool.run(args, None)
    from load_tests import loadlib

    loadlib.assign_free_ports(args)
    with loadlib.server_from_args(args) as server:
        return tool.run(args, server)


def _main(tool: Tool, argv: list[str] | None) -> int:
    try:
        args = parse_args(tool, argv)
    except SystemExit as exc:  # --help (0) or arguments argparse refused (2)
        return exc.code if isinstance(exc.code, int) else EXIT_REFUSED
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a CI timeout, say) unwinds like Ctrl-C, so a server this run started is stopped by its PID.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.results_dir.mkdir(parents=True, exist_ok=True)  # the server's log goes there too
    try:
        report = _measure(tool, args)
    except Refused as exc:
        print_red(f"{tool.name}: refused: {exc}")
        return EXIT_REFUSED
    checks = report.setdefault("checks", {})
    report["passed"] = checks_passed(checks)
    path = write_report(report, args.results_dir, args.name, tool.markdown)
    tool.summarize(report)
    print(f"report: {path}" + (f" and {path.with_suffix('.md')}" if tool.markdown else ""), flush=True)
    passed = print_verdict(checks)
    if passed or getattr(args, "report_only", False):
        return EXIT_PASSED
    return EXIT_FAILED


def main(tool: Tool, argv: list[str] | None = None) -> int:
    """Run ``tool``: arguments -> server -> ``tool.run`` -> report JSON (+ markdown) -> ``tool.summarize`` ->
    verdict. Returns the exit status: 0 every check passed (or the tool's ``--report-only`` was given), 1 a check
    failed or none ran, 2 refused (a package of ``tool.needs`` or one imported later is missing, bad arguments,
    :class:`Refused`)."""
    from load_tests import loadlib

    return loadlib.run_tool(lambda: _main(tool, argv), *tool.needs)
