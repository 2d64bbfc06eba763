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

No retries, unlike ``client.CaptionClient``: the users send each request once over raw tritonclient, as a load
generator measures the server (a refusal or an error is what it reports; a retry would fold the wait for the
server into a latency and hide the failure). Their reports therefore have no client-side retries; ``make soak``
and ``make burst``, which go through ``CaptionClient``, count them apart from failures.

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
    --final-stats      [OFA_LOAD_FINAL_STATS] JSON file of the final statistics, written when the run ends

Run headless, e.g.::

    locust -f load_tests/locustfile.py --headless -u 8 -r 2 -t 30s --protocol http

``make load-test`` (load_tests/run_load_test.py) wraps this with a server, a step shape, reports and a plot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust.runners import WorkerRunner

# As in Locust's gRPC example: grpc imported beside locust (which monkey-patches the stdlib for gevent),
# then switched to gevent before tritonclient.grpc is imported and creates any channel.
grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from client import with_api_key  # noqa: E402
from load_tests.corpus import DEFAULT_IMAGE_DIR, UniqueImages, load_images  # noqa: E402

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
    group.add_argument(
        "--final-stats",
        env_var="OFA_LOAD_FINAL_STATS",
        default="",
        help="write the final statistics (totals, per type, errors) to this JSON file when the run ends",
    )


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


_environment = None


@events.init.add_listener
def _keep_environment(environment, **_kwargs) -> None:
    global _environment
    _environment = environment


def final_stats(stats) -> dict:
    """Locust's statistics at the end of the run: per request type and in total, and the errors."""

    def entry(e) -> dict:
        return {
            "type": e.method or "",
            "name": e.name,
            "requests": e.num_requests,
            "failures": e.num_failures,
            "requests_per_s": round(e.total_rps, 3),
            "mean_ms": round(e.avg_response_time, 2),
            "p50_ms": e.get_response_time_percentile(0.5) if e.num_requests else None,
            "p95_ms": e.get_response_time_percentile(0.95) if e.num_requests else None,
            "p99_ms": e.get_response_time_percentile(0.99) if e.num_requests else None,
            "max_ms": e.max_response_time if e.num_requests else None,
            "avg_content_length": round(e.avg_content_length, 2),
        }

    return {
        "entries": [entry(e) for _key, e in sorted(stats.entries.items())],
        "total": entry(stats.total),
        "errors": [
            {
                "type": e.method,
                "name": e.name,
                "error": repr(e.error) if isinstance(e.error, BaseException) else str(e.error),
                "occurrences": e.occurrences,
            }
            for e in stats.errors.values()
        ],
    }


@events.quit.add_listener
def _write_final_stats(exit_code: int, **_kwargs) -> None:
    """Write the final statistics to ``--final-stats`` (a JSON file) when the run ends.

    Locust rewrites its ``--csv`` files once a second and closes them at shutdown without a last write, so they
    can miss the requests of the last second (locustio/locust#1806, #2299); ``quit`` fires after the runner has
    stopped and the statistics are final, so this file holds every request. Workers leave it to the master.
    """
    environment = _environment
    path = getattr(getattr(environment, "parsed_options", None), "final_stats", None)
    if not path or isinstance(environment.runner, WorkerRunner):
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(final_stats(environment.stats), indent=2) + "\n")
    except Exception as exc:  # the run's own exit code and reports stay Locust's
        logger.warning("could not write the final statistics to %s: %s", path, exc)


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
        client = grpcclient.InferenceServerClient(url=f"{options.triton_host}:{options.grpc_port}")
        return with_api_key(client, "grpc")  # $CAPTION_API_KEY / $CAPTION_API_KEY_FILE, where set

    def _infer(self, inputs, outputs):
        return self.client.infer(
            self.options.model_name, inputs, outputs=outputs, client_timeout=self.options.request_timeout
        )


class HttpCaptionUser(_CaptionUser):
    """Calls the ``caption`` ensemble over HTTP/REST (tritonclient.http, binary tensor extension)."""

    protocol = "http"
    module = httpclient

    def _connect(self, options):
        client = httpclient.InferenceServerClient(
            url=f"{options.triton_host}:{options.http_port}",
            concurrency=1,
            connection_timeout=options.request_timeout,
            network_timeout=options.request_timeout,
        )
        return with_api_key(client, "http")  # $CAPTION_API_KEY / $CAPTION_API_KEY_FILE, where set

    def _infer(self, inputs, outputs):
        return self.client.infer(self.options.model_name, inputs, outputs=outputs)
