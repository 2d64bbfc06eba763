"""Helpers the Triton Python-backend adapters share (``model_repository/*/1/model.py``).

The functions take the ``triton_python_backend_utils`` module as an argument (``pb``) instead of importing
it, so that they run under a stand-in in the unit tests.
"""

from __future__ import annotations

import json
import threading
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batching import RequestError
from .settings import SettingsError

__all__ = [
    "model_config_dict",
    "check_tensor_dims",
    "input_array",
    "optional_int_rows",
    "generation_settings",
    "error_response",
    "responses",
    "RequestCancelled",
    "cancelled",
    "ServerDraining",
    "draining",
    "EngineHealth",
    "PixelStaging",
]

_MAX_MESSAGE = 500


def model_config_dict(args: Mapping[str, Any]) -> dict[str, Any]:
    """The model configuration of ``initialize(args)`` as a dict."""
    config = args["model_config"]
    return json.loads(config) if isinstance(config, str | bytes) else dict(config)


def check_tensor_dims(model_config: Mapping[str, Any], name: str, expected: Sequence[int], why: str) -> None:
    """Fail (``SettingsError``) unless input or output ``name`` of ``model_config`` has dims ``expected``."""
    for entry in list(model_config.get("input", [])) + list(model_config.get("output", [])):
        if entry.get("name") == name:
            dims = [int(d) for d in entry.get("dims", [])]
            if dims != list(expected):
                raise SettingsError(
                    f"{model_config.get('name', 'model')}/config.pbtxt: tensor {name!r} has dims {dims} but {why} "
                    f"needs {list(expected)}; edit dims of {name!r} in the config.pbtxt of both preprocess and ofa"
                )
            return
    raise SettingsError(f"{model_config.get('name', 'model')}/config.pbtxt has no tensor {name!r}")


def input_array(pb: Any, request: Any, name: str, *, optional: bool = False) -> np.ndarray | None:
    """Input ``name`` of ``request`` as a numpy array (batch dimension first); ``None`` if optional and absent."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise RequestError(f"missing input {name!r}")
    return tensor.as_numpy()


def optional_int_rows(array: np.ndarray | None, rows: int, name: str) -> list[int | None]:
    """Per-row values of an optional INT32 ``[1]`` input of a request with ``rows`` rows (``None`` if absent)."""
    if array is None:
        return [None] * rows
    if array.ndim != 2 or array.shape[1] != 1:
        raise RequestError(f"input {name!r} must have shape [batch, 1], got {list(array.shape)}")
    if array.shape[0] != rows:
        raise RequestError(
            f"input {name!r} has batch size {array.shape[0]} but the request has {rows} image(s)"
        )
    return [int(v) for v in array[:, 0]]


def generation_settings(
    engine: Any,
    beams: Sequence[int | None],
    lengths: Sequence[int | None],
    num_captions: int | None,
    max_beam_tokens: int,
) -> list[tuple[tuple[int, int], int]]:
    """Per row of a request: its ``(beam_size, max_length)`` and number of captions, resolved and checked once, by
    the engine's ``validate_settings`` and ``validate_num_captions`` (defaults for absent values, the bounds), and
    against this server's ``max_beam_tokens`` (beam_size x max_length). The rows then go to the engine grouped by
    these settings, one engine call per group.

    Raises :class:`RequestError` (INVALID_ARG) with the engine's message for a row out of range.
    """
    out = []
    for beam, length in zip(beams, lengths, strict=True):
        try:
            key = engine.validate_settings(beam, length)
            count = engine.validate_num_captions(num_captions, key[0])
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        cost = key[0] * key[1]
        if cost > max_beam_tokens:
            raise RequestError(
                f"beam_size x max_length = {key[0]} x {key[1]} = {cost} is over this server's "
                f"limit of {max_beam_tokens} (setting OFA_MAX_BEAM_TOKENS / max_beam_tokens)"
            )
        out.append((key, count))
    return out


class RequestCancelled(Exception):
    """The client cancelled the request (or gave up on it) before it was computed."""


def cancelled(request: Any) -> RequestCancelled | None:
    """A :class:`RequestCancelled` when ``request.is_cancelled()`` (its client gave up), else ``None``."""
    check = getattr(request, "is_cancelled", None)
    return RequestCancelled("request cancelled before it was computed") if check and check() else None


class ServerDraining(Exception):
    """The server is stopping: the request was not computed, and another replica (or this one once restarted) can
    take it."""


def draining(flag: Path | None) -> ServerDraining | None:
    """A :class:`ServerDraining` while the file ``flag`` exists (the supervisor creates it as a graceful stop
    begins, :func:`ofa_serving.supervisor.drain`), else ``None``."""
    if flag is not None and flag.exists():
        return ServerDraining("the server is stopping: retry the request (on another replica)")
    return None


def error_response(pb: Any, exc: BaseException, *, model_name: str) -> Any:
    """One request's error response, logged: INVALID_ARG for a :class:`RequestError`, CANCELLED for a
    :class:`RequestCancelled`, UNAVAILABLE for :class:`ServerDraining`, INTERNAL otherwise.

    A bad request is logged in one line. An internal error gets an error id: the client is told only
    ``<model>: internal error, id <id>``; the server log has the id with the traceback (exception texts may hold
    paths or memory figures that are not the client's business).
    """
    logger = getattr(pb, "Logger", None)
    if isinstance(exc, RequestCancelled):
        message = f"{model_name}: {exc}"
        code = getattr(pb.TritonError, "CANCELLED", None)
    elif isinstance(exc, ServerDraining):
        message = f"{model_name}: {exc}"
        code = getattr(pb.TritonError, "UNAVAILABLE", None)
    elif isinstance(exc, RequestError):
        message = str(exc)
        code = getattr(pb.TritonError, "INVALID_ARG", None)
        if logger is not None:
            logger.log_warn(f"{model_name}: bad request: {message}")
    else:
        # One id per failure: the requests of one failed engine batch share it, its traceback is logged once.
        error_id = getattr(exc, "error_id", None)
        if error_id is None:
            error_id = exc.error_id = uuid.uuid4().hex[:16]
            if logger is not None:
                trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                logger.log_error(f"{model_name}: internal error, id {error_id}:\n{trace}")
        message = f"{model_name}: internal error, id {error_id} (details in the server log)"
        code = getattr(pb.TritonError, "INTERNAL", None)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    error = pb.TritonError(message) if code is None else pb.TritonError(message, code)
    _drop_tracebacks(exc)
    return pb.InferenceResponse(output_tensors=[], error=error)


def responses(
    pb: Any, results: Sequence[Any], outputs: Callable[[Any], list[Any]], *, model_name: str
) -> list[Any]:
    """One response per entry of ``results`` (what :func:`~ofa_serving.batching.run_batched` returned), in
    order: ``pb.InferenceResponse(outputs(result))`` for a request's results, :func:`error_response` for its
    error."""
    return [
        error_response(pb, result, model_name=model_name)
        if isinstance(result, BaseException)
        else pb.InferenceResponse(outputs(result))
        for result in results
    ]


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the tracebacks of ``exc`` and of the exceptions it chains (cause, context), once logged.

    The adapters keep a request's exception in a list of their ``execute()`` until its response is built. Its
    traceback references the frame that raised it, and that frame (through ``f_back``) the ``execute()`` frame
    holding the list: a reference cycle. Only the cyclic garbage collector would then free that ``execute()``'s
    locals, the good requests' output tensors among them; in the meantime the stub's memory and its shared-memory
    pool grow (measured by ``make soak``). Without tracebacks reference counting frees them at once.
    """
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


class EngineHealth:
    """Counts engine batches that failed in a row; past ``limit`` the model unloads itself.

    An engine failure that repeats on every batch (a poisoned CUDA context after an illegal memory access, a lost
    device) would otherwise answer INTERNAL forever while the model reports ready. After ``limit`` failed batches
    in a row (no success between them) :meth:`failed` logs it and asks Triton to unload the model
    (``pb_utils.unload_model``, needs explicit model control): readiness turns false and the supervisor
    (:mod:`ofa_serving.supervisor`) loads it again in a fresh stub process. ``limit`` 0 disables it.
    """

    def __init__(self, pb: Any, model_name: str, limit: int) -> None:
        self.pb, self.model_name, self.limit = pb, model_name, limit
        self.in_a_row = 0
        self.unloading = False

    def succeeded(self) -> None:
        """An engine batch succeeded."""
        self.in_a_row = 0

    def failed(self) -> None:
        """An engine batch failed; unload the model after ``limit`` of them in a row."""
        self.in_a_row += 1
        if not self.limit or self.in_a_row < self.limit or self.unloading:
            return
        self.unloading = True
        message = (
            f"{self.model_name}: the engine failed {self.in_a_row} batches in a row; unloading the model so that "
            "it is reloaded in a fresh process"
        )
        logger = getattr(self.pb, "Logger", None)
        if logger is not None:
            logger.log_error(message)
        unload = getattr(self.pb, "unload_model", None)
        if unload is not None:
            # From a thread: the unload waits for this execute() to return.
            threading.Thread(target=unload, args=(self.model_name,), daemon=True).start()


class PixelStaging:
    """The ``ofa`` batch's uint8 pixel rows stacked into one tensor: on a CUDA instance into a preallocated
    page-locked (pinned) host buffer of ``max_batch_size`` images, so that the engine's ``non_blocking`` copy to
    the GPU is asynchronous and no batch allocates host memory; elsewhere with ``np.stack``, as before.

    :meth:`allocate` creates the buffer (the adapter calls it in ``initialize``, so that serving allocates
    nothing; construction touches no CUDA). The buffer is rewritten only once the previous batch's copy to the
    device has finished: call :meth:`sent` after handing the staged tensor to the engine (an event on the current
    stream marks the copy's end).
    """

    def __init__(self, device: str, max_batch_size: int | str | None, image_shape: Sequence[int]):
        self.pinned = device.startswith("cuda") and int(max_batch_size or 0) > 0
        self.shape = (int(max_batch_size or 0), *image_shape)
        self.buffer: Any = None
        self._copied: Any = None

    def allocate(self) -> None:
        """Create the pinned buffer and its event on a CUDA instance (once); elsewhere nothing."""
        if self.pinned and self.buffer is None:
            import torch

            self.buffer = torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
            self._copied = torch.cuda.Event()

    def stack(self, rows: Sequence[np.ndarray]) -> Any:
        """``rows`` (arrays of one shape) as a torch tensor [len(rows), ...]: a view of the pinned buffer where
        there is one and the rows are uint8 images of its shape that fit in it, else a fresh ``np.stack``."""
        import torch

        fits = (
            self.pinned
            and 0 < len(rows) <= self.shape[0]
            and all(r.dtype == np.uint8 and r.shape == self.shape[1:] for r in rows)
        )
        if not fits:
            return torch.from_numpy(np.stack(rows))
        self.allocate()
        self._copied.synchronize()  # the previous batch's copy has read the buffer (no-op before the first)
        out = self.buffer[: len(rows)]
        np.stack(rows, out=out.numpy())
        return out

    def sent(self) -> None:
        """The staged tensor's copy to the device is enqueued: mark its end on the current CUDA stream."""
        if self._copied is not None:
            self._copied.record()
