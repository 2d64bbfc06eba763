"""A Locust load shape that steps the number of users, e.g. 1 -> 2 -> 4 -> 8 -> 16, in equal time slices.

Use it beside the locustfile: ``locust -f load_tests/locustfile.py,load_tests/step_shape.py -t 60s ...``.
``--step-users`` (environment ``OFA_LOAD_STEPS``, default ``1,2,4,8,16``) lists the user counts; the run time
(``-t``, default 60 s) is split evenly between them, so each level lasts long enough for Locust's 10-second
window of current percentiles to describe that level alone (keep ``run time / steps`` >= 10 s for a clean plot).

In distributed mode (``--processes`` or ``--master``) the shape ends with a short step of 0 users: a headless
master that ends a shape quits at once and waits only half a second for its workers' last reports, so the
requests still in flight at the end (and up to 3 s of reports) were lost from its statistics. The 0-user step
lets the workers finish those requests and report them first.
"""

from __future__ import annotations

from locust import LoadTestShape, events
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner

from load_tests.loadlib import parse_steps


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument(
        "--step-users",
        env_var="OFA_LOAD_STEPS",
        default="1,2,4,8,16",
        help="user counts of the step shape, each held for run-time / len(steps) seconds",
    )


class StepLoadShape(LoadTestShape):
    """Hold each user count of ``--step-users`` for an equal share of ``--run-time`` (default 60 s)."""

    _drain_since: float | None = None
    _stopped_since: float | None = None

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        steps = parse_steps(getattr(options, "step_users", "1,2,4,8,16"))
        total = float(getattr(options, "run_time", None) or 60)
        elapsed = self.get_run_time()
        if elapsed >= total:
            return self._drain(elapsed, float(getattr(options, "stop_timeout", None) or 0))
        index = min(int(elapsed // (total / len(steps))), len(steps) - 1)
        users = steps[index]
        return users, float(users)  # spawn the whole step at once

    def _drain(self, elapsed: float, stop_timeout: float) -> tuple[int, float] | None:
        """After the last step: end at once on one process; on a master, hold 0 users until every worker has
        stopped its users (in-flight requests finish, up to ``--stop-timeout``) and sent one more report."""
        if not isinstance(self.runner, MasterRunner):
            return None
        if self._drain_since is None:
            self._drain_since = elapsed
        if self.runner.user_count > 0:
            self._stopped_since = None
        elif self._stopped_since is None:
            self._stopped_since = elapsed
        reported = (
            self._stopped_since is not None and elapsed - self._stopped_since > WORKER_REPORT_INTERVAL + 0.5
        )
        if reported or elapsed - self._drain_since > stop_timeout + 2 * WORKER_REPORT_INTERVAL + 5:
            return None
        return 0, 1.0
