"""Locust users that caption images through the ``caption`` ensemble of the Triton server.

Two users, one file:

* ``GrpcCaptionUser``: ``tritonclient.grpc`` with gRPC patched for gevent (``grpc.experimental.gevent.init_gevent()``
  before tritonclient is imported, as Locust's own gRPC example does);
* ``HttpCaptionUser``: ``tritonclient.http`` (geventhttpclient, cooperative under Locust's gevent).

``--protocol grpc|http|both`` picks which of them run (default ``grpc``); naming user classes on the command line
(``locust -f load_tests/locustfile.py HttpCaptionUser``) overrides it. Every task sends one image and fires
exactly one Locust request event (request_type ``grpc`` or ``http``, name ``caption``) with the response time in
milliseconds, the response length in bytes (caption text + score) and the exception on failure, so Locust's
statistics count each request once.

Options (command line, or the environment variable in brackets)::

    --triton-host      [TRITON_HOST]         server address (127.0.0.1)
    --grpc-port        [GRPC_PORT]           gRPC port (8001)
    --http-port        [HTTP_PORT]           HTTP port (8000)
    --protocol         [OFA_LOAD_PROTOCOL]   grpc | http | both (grpc)
    --image-dir        [OFA_LOAD_IMAGES]     folder of images, searched recursively (samples/)
    --beam-size        [OFA_BEAM_SIZE]       beam_size input; 0 = the server's default (0)
    --max-length       [OFA_MAX_LENGTH]      max_length input; 0 = the server's default (0)
    --wait-min/--wait-max [OFA_LOAD_WAIT_MIN/MAX]  think time per user in seconds, uniform (0 / 0)
    --cache-bust       [OFA_LOAD_CACHE_BUST] on: distinct bytes per request, so Triton's response cache never
                                             answers (default); off: send the files as they are
    --request-timeout  [OFA_LOAD_TIMEOUT]    seconds per request (60)
    --model-name       [OFA_LOAD_MODEL]      model to call (caption)

Run headless, e.g.::

    locust -f load_tests/locustfile.py --headless -u 8 -r 2 -t 30s --protocol http

``make load-test`` (load_tests/run_load_test.py) wraps this with a server, a step shape, reports and a plot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust import stats as locust_stats
from locust.runners import WorkerRunner

# As in Locust's gRPC example: grpc imported beside locust (which monkey-patches the stdlib for gevent),
# then switched to gevent before tritonclient.grpc is imported and creates any channel.
grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadlib import DEFAULT_IMAGE_DIR, UniqueImages, load_images  # noqa: E402

logger = logging.getLogger("ofa.locust")

_ON = ("on", "true", "1", "yes")


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    """Register this locustfile's options (each also read from an environment variable)."""
    group = parser.add_argument_group("OFA captioning on Triton")
    group.add_argument(
        "--triton-host", env_var="TRITON_HOST", default="127.0.0.1", help="Triton server address"
    )
    group.add_argument("--grpc-port", env_var="GRPC_PORT", type=int, default=8001, help="Triton gRPC port")
    group.add_argument("--http-port", env_var="HTTP_PORT", type=int, default=8000, help="Triton HTTP port")
    group.add_argument(
        "--protocol",
        env_var="OFA_LOAD_PROTOCOL",
        choices=["grpc", "http", "both"],
        default="grpc",
        help="which user runs: GrpcCaptionUser, HttpCaptionUser or both (ignored when user classes are named)",
    )
    group.add_argument(
        "--image-dir",
        env_var="OFA_LOAD_IMAGES",
        default=str(DEFAULT_IMAGE_DIR),
        help="folder of images to send",
    )
    group.add_argument(
        "--beam-size",
        env_var="OFA_BEAM_SIZE",
        type=int,
        default=0,
        help="beam_size input (0 = server default)",
    )
    group.add_argument(
        "--max-length",
        env_var="OFA_MAX_LENGTH",
        type=int,
        default=0,
        help="max_length input (0 = server default)",
    )
    group.add_argument(
        "--wait-min", env_var="OFA_LOAD_WAIT_MIN", type=float, default=0.0, help="min think time (s)"
    )
    group.add_argument(
        "--wait-max", env_var="OFA_LOAD_WAIT_MAX", type=float, default=0.0, help="max think time (s)"
    )
    group.add_argument(
        "--cache-bust",
        env_var="OFA_LOAD_CACHE_BUST",
        choices=["on", "off", "true", "false", "1", "0", "yes", "no"],
        default="on",
        help="on: distinct bytes per request so the response cache never answers; off: send files as they are",
    )
    group.add_argument(
        "--request-timeout", env_var="OFA_LOAD_TIMEOUT", type=float, default=60.0, help="seconds per request"
    )
    group.add_argument("--model-name", env_var="OFA_LOAD_MODEL", default="caption", help="model to call")


@events.init.add_listener
def _select_users(environment, **_kwargs) -> None:
    """Keep the user class(es) that ``--protocol`` names, unless classes were named on the command line.

    Workers keep every class: the master decides which classes run and tells them by name.
    """
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner) or options.user_classes:
        return
    wanted = {"grpc": {"GrpcCaptionUser"}, "http": {"HttpCaptionUser"}}.get(
        options.protocol, {"GrpcCaptionUser", "HttpCaptionUser"}
    )
    environment.user_classes[:] = [cls for cls in environment.user_classes if cls.__name__ in wanted]
    if not environment.user_classes:
        raise RuntimeError(f"--protocol {options.protocol}: none of {sorted(wanted)} is in the locustfile(s)")


@events.quit.add_listener
def _exit_now(exit_code: int, **_kwargs) -> None:
    """Make sure the process ends with Locust's exit code once Locust has finished.

    With gRPC patched for gevent, the interpreter never finishes exiting after Locust's ``sys.exit`` (seen with
    locust 2.47 / grpcio 1.85: SIGTERM ignored, only SIGKILL ends it). ``quit`` fires after the summary and the
    HTML report, but just before Locust closes its CSV files, so exiting here could lose their last rows.
    Instead a real OS thread (not a greenlet) waits a grace period, in which Locust closes its files and calls
    ``sys.exit``, then ends the process with ``os._exit(exit_code)`` if it is still there.
    """
    from gevent import monkey

    start_thread = monkey.get_original("_thread", "start_new_thread")
    sleep = monkey.get_original("time", "sleep")
    grace = float(os.environ.get("OFA_LOCUST_EXIT_GRACE", "3"))

    def _watchdog() -> None:
        sleep(grace)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # best effort while exiting
                stream.flush()
        os._exit(exit_code)

    start_thread(_watchdog, ())


def _close_files_with_final_rows(self) -> None:
    """``StatsCSVFileWriter.close_files`` that first writes the final statistics.

    Locust rewrites its ``--csv`` files once a second from a greenlet and only closes them at shutdown, so the
    requests of the last second are missing from ``_stats.csv``/``_failures.csv`` (locustio/locust#1806 and
    #2299; seen here: 881 requests in the CSV, 951 in the printed summary). This writes the final rows (and a
    last history row) before the files are closed, so the CSVs agree with the summary.
    """
    try:
        for handle, writer, columns, rows in (
            (
                self.requests_csv_filehandle,
                self.requests_csv_writer,
                self.requests_csv_columns,
                self._requests_data_rows,
            ),
            (
                self.failures_csv_filehandle,
                self.failures_csv_writer,
                self.failures_columns,
                self._failures_data_rows,
            ),
            (
                self.exceptions_csv_filehandle,
                self.exceptions_csv_writer,
                self.exceptions_columns,
                self._exceptions_data_rows,
            ),
        ):
            if handle.closed:
                continue
            handle.seek(0)
            writer.writerow(columns)
            rows(writer)
            handle.truncate()
        if not self.stats_history_csv_filehandle.closed:
            self._stats_history_data_rows(self.stats_history_csv_writer, time.time())
    except Exception as exc:  # keep Locust's own files rather than fail the shutdown
        logger.warning("could not write the final CSV rows: %s", exc)
    _original_close_files(self)


_original_close_files = locust_stats.StatsCSVFileWriter.close_files
locust_stats.StatsCSVFileWriter.close_files = _close_files_with_final_rows


# --------------------------------------------------------------------------------------------- corpus

_corpora: dict[tuple[str, bool], UniqueImages] = {}


def _corpus(options) -> UniqueImages:
    """The process-wide image corpus for these options (loaded once, shared by all users)."""
    unique = str(options.cache_bust).lower() in _ON
    key = (str(Path(options.image_dir).resolve()), unique)
    if key not in _corpora:
        corpus = UniqueImages(load_images(options.image_dir), unique=unique)
        if corpus.not_unique:
            logger.warning("sent unchanged (cache hits possible): %s", ", ".join(corpus.not_unique))
        logger.info(
            "%d images from %s, cache-bust %s", len(corpus), options.image_dir, "on" if unique else "off"
        )
        _corpora[key] = corpus
    return _corpora[key]


def _settings(options) -> dict[str, int]:
    """Optional generation inputs: only those set (> 0) are sent."""
    return {
        name: value
        for name, value in (("beam_size", options.beam_size), ("max_length", options.max_length))
        if value
    }


# ---------------------------------------------------------------------------------------------- users


class CaptionRequestError(Exception):
    """A failed caption request, carrying the server's status and message.

    tritonclient's ``InferenceServerException`` has no ``args``, so Locust (which groups failures by ``repr``)
    would show every failure as ``InferenceServerException()``; this keeps what the server said.
    """


def _as_reported(exc: Exception) -> Exception:
    """The exception to hand to Locust: server errors re-wrapped so their message shows in the report."""
    if isinstance(exc, InferenceServerException):
        status = exc.status() or "error"
        return CaptionRequestError(f"{status}: {exc.message()}")
    return exc


class _CaptionUser(User):
    """Common part: options, think time, building inputs, firing exactly one request event per task."""

    abstract = True
    protocol = ""
    module = grpcclient

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        low, high = options.wait_min, max(options.wait_min, options.wait_max)
        return random.uniform(low, high) if high > 0 else 0.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.corpus = _corpus(options)
        self.settings = _settings(options)
        self.client = self._connect(options)

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # a failed close must not fail the run
                logger.debug("closing the client: %s", exc)

    def _connect(self, options):  # pragma: no cover - overridden
        raise NotImplementedError

    def _infer(self, inputs, outputs):  # pragma: no cover - overridden
        raise NotImplementedError

    def _inputs(self, data: bytes) -> list:
        image = self.module.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        inputs = [image]
        for name, value in self.settings.items():
            tensor = self.module.InferInput(name, [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
            inputs.append(tensor)
        return inputs

    @task
    def caption(self) -> None:
        """Caption the next image: one request, one Locust request event."""
        _name, data = self.corpus.next()
        inputs = self._inputs(data)
        outputs = [self.module.InferRequestedOutput("caption"), self.module.InferRequestedOutput("score")]
        exception = None
        length = 0
        start = time.perf_counter()
        try:
            result = self._infer(inputs, outputs)
            caption = result.as_numpy("caption")
            score = result.as_numpy("score")
            if caption is None or score is None or caption.size != 1 or score.size != 1:
                raise ValueError(f"malformed response: caption={caption!r} score={score!r}")
            text = caption.reshape(-1)[0]
            length = len(text) + score.nbytes
        except Exception as exc:  # every failure is reported to Locust, none escapes the task
            exception = _as_reported(exc)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=self.options.model_name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )


class GrpcCaptionUser(_CaptionUser):
    """Calls the ``caption`` ensemble over gRPC (tritonclient.grpc on gevent-patched grpcio)."""

    protocol = "grpc"
    module = grpcclient

    def _connect(self, options):
        return grpcclient.InferenceServerClient(url=f"{options.triton_host}:{options.grpc_port}")

    def _infer(self, inputs, outputs):
        return self.client.infer(
            self.options.model_name, inputs, outputs=outputs, client_timeout=self.options.request_timeout
        )


class HttpCaptionUser(_CaptionUser):
    """Calls the ``caption`` ensemble over HTTP/REST (tritonclient.http, binary tensor extension)."""

    protocol = "http"
    module = httpclient

    def _connect(self, options):
        return httpclient.InferenceServerClient(
            url=f"{options.triton_host}:{options.http_port}",
            concurrency=1,
            connection_timeout=options.request_timeout,
            network_timeout=options.request_timeout,
        )

    def _infer(self, inputs, outputs):
        return self.client.infer(self.options.model_name, inputs, outputs=outputs)
