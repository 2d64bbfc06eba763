"""load_tests.tool: the skeleton's exit statuses and report, the timer, the verdict printer."""

from __future__ import annotations

import io
import json
import time

import pytest

from load_tests import tool


def _tool(run, *, needs=(), markdown=None, summarized=None) -> tool.Tool:
    def add_arguments(parser):
        parser.add_argument("--report-only", action="store_true")
        parser.add_argument("--value", type=int, default=1)

    return tool.Tool(
        name="fake",
        description="a tool that measures nothing",
        add_arguments=add_arguments,
        run=run,
        summarize=lambda report: (summarized if summarized is not None else []).append(report),
        needs_server=False,
        needs=needs,
        markdown=markdown,
    )


def test_passed_checks_exit_0_and_write_the_report(tmp_path, capsys):
    summarized = []
    fake = _tool(
        lambda args, server: {"value": args.value, "server": server, "checks": {"fast enough": True}},
        markdown=lambda report: f"value {report['value']}\n",
        summarized=summarized,
    )

    assert tool.main(fake, ["--results-dir", str(tmp_path), "--value", "7"]) == 0

    report = json.loads((tmp_path / "fake.json").read_text())
    assert report == {"value": 7, "server": None, "checks": {"fast enough": True}, "passed": True}
    assert (tmp_path / "fake.md").read_text() == "value 7\n"
    assert summarized == [report]
    assert "[ok] fast enough" in capsys.readouterr().out


def test_a_failed_check_prints_a_red_fail_line_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    fake = _tool(lambda args, server: {"checks": {"fast enough": True, "no failure": False}})
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr("sys.stdout", terminal)

    assert tool.main(fake, ["--results-dir", str(tmp_path), "--name", "other"]) == 1

    out = terminal.getvalue()
    assert f"{tool.RED}[FAIL] no failure{tool.RESET}" in out and "[ok] fast enough" in out
    assert json.loads((tmp_path / "other.json").read_text())["passed"] is False
    assert not (tmp_path / "fake.json").exists()


def test_report_only_exits_0_though_a_check_failed(tmp_path):
    fake = _tool(lambda args, server: {"checks": {"no failure": False}})

    assert tool.main(fake, ["--results-dir", str(tmp_path), "--report-only"]) == 0
    assert json.loads((tmp_path / "fake.json").read_text())["passed"] is False


def test_no_check_is_not_a_pass(tmp_path, capsys):
    fake = _tool(lambda args, server: {"rows": []})

    assert tool.main(fake, ["--results-dir", str(tmp_path)]) == 1

    assert json.loads((tmp_path / "fake.json").read_text())["checks"] == {}
    assert "no check ran" in capsys.readouterr().out


def test_a_check_that_did_not_apply_neither_passes_nor_fails(tmp_path, capsys):
    only_na = _tool(lambda args, server: {"checks": {"bfloat16 target": None}})
    assert tool.main(only_na, ["--results-dir", str(tmp_path)]) == 1

    some = _tool(lambda args, server: {"checks": {"bfloat16 target": None, "float32 target": True}})
    assert tool.main(some, ["--results-dir", str(tmp_path)]) == 0
    assert "[n/a] bfloat16 target" in capsys.readouterr().out


def test_refusals_exit_2_before_any_report(tmp_path, capsys, monkeypatch):
    def refuse(args, server):
        raise tool.Refused("--device cuda: torch sees no CUDA device. Nothing was run.")

    assert tool.main(_tool(refuse), ["--results-dir", str(tmp_path)]) == 2
    assert "fake: refused: --device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "fake.json").exists()

    assert tool.main(_tool(refuse), ["--value", "not a number"]) == 2  # argparse's refusal
    assert "--value" in capsys.readouterr().err

    monkeypatch.setattr("sys.argv", ["fake.py"])
    ran = []
    missing = _tool(lambda args, server: ran.append(1) or {}, needs=("no_such_package_for_this_test",))
    assert tool.main(missing, ["--results-dir", str(tmp_path)]) == 2
    assert not ran and "`make setup-dev`" in capsys.readouterr().err


def test_a_tool_that_needs_a_server_gets_the_one_started_for_it(tmp_path, monkeypatch):
    from load_tests import loadlib

    events = []

    class _Started:
        def __enter__(self):
            events.append("started")
            return "server handle"

        def __exit__(self, *exc):
            events.append("stopped")

    monkeypatch.setattr(loadlib, "assign_free_ports", lambda args: events.append("ports"))
    monkeypatch.setattr(loadlib, "server_from_args", lambda args: _Started())
    fake = _tool(lambda args, server: events.append(f"run with {server}") or {"checks": {"ok": True}})
    fake.needs_server = True

    args = tool.parse_args(fake, ["--results-dir", str(tmp_path)])
    assert (args.name, args.http_port, args.results_dir) == ("fake", 0, tmp_path)  # the server options
    assert tool.main(fake, ["--results-dir", str(tmp_path)]) == 0
    assert events == ["ports", "started", "run with server handle", "stopped"]


def test_print_verdict_lines_and_colour(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    terminal = io.StringIO()
    terminal.isatty = lambda: True

    assert tool.print_verdict({"a": True, "b": None}, terminal) is True
    assert tool.print_verdict({"a": True, "c": False}, terminal) is False
    assert tool.print_verdict({}, terminal) is False
    lines = terminal.getvalue().splitlines()
    assert lines[:5] == ["[ok] a", "[n/a] b", "[ok] a", "[FAIL] c", lines[4]]
    assert "no check ran" in lines[4] and tool.RED not in terminal.getvalue()  # NO_COLOR: plain text


def test_stopwatch_and_timed():
    with tool.Stopwatch() as watch:
        time.sleep(0.02)
        first = watch.lap()
        time.sleep(0.01)
        second = watch.lap()
    total = watch.seconds
    time.sleep(0.01)
    assert watch.seconds == total  # stopped when the block ended
    assert first >= 0.02 and second >= 0.01 and total >= first + second

    calls = []
    result, seconds = tool.timed(lambda x: calls.append(x) or len(calls), 5, repeats=3)
    assert (result, calls) == (3, [5, 5, 5]) and 0 <= seconds < total
    with pytest.raises(ValueError):
        tool.timed(print, repeats=0)
