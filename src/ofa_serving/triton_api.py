"""Calls to tritonserver's KServe v2 HTTP API (health, repository, statistics, config, metrics): the one client of
them that the probe, the supervisor, the launcher and the tools share. Standard library only (``urllib``).

Error bodies come from tritonserver, which never echoes request headers (the keys) back, so they may be logged.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

__all__ = ["TritonHttp", "TritonHttpError", "scrape"]


class TritonHttpError(RuntimeError):
    """tritonserver answered an API call with an HTTP error status (``status``; the message has its body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def scrape(url: str, timeout: float = 10.0) -> str:
    """The Prometheus text of a metrics endpoint (``http://host:port/metrics``)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


class TritonHttp:
    """The HTTP API of one tritonserver.

    Args:
        base_url: ``http://host:port`` of its HTTP endpoint.
        headers: sent with every call: the admin key (``ofa-admin-key``) for the admin APIs (repository, config,
            statistics), the inference key (``ofa-api-key``) when inference is restricted.
        timeout: seconds per call unless a call says otherwise.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = timeout

    def __repr__(self) -> str:  # the headers hold secrets
        return f"TritonHttp({self.base_url!r})"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """``(HTTP status, body)`` of ``method`` ``path`` (``/v2/...``); a dict ``body`` is sent as JSON, ``headers``
        add to the client's. An HTTP error status is returned, not raised; a server that does not answer (refused,
        reset, timed out) raises :class:`OSError`."""
        extra = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            extra.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(
            self.base_url + path, data=body, headers={**self.headers, **extra}, method=method
        )
        seconds = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=max(seconds, 0.1)) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _json(
        self, method: str, path: str, body: bytes | dict | None = None, timeout: float | None = None
    ) -> Any:
        status, data = self.request(method, path, body, timeout)
        if status != 200:
            raise TritonHttpError(status, f"{path}: HTTP {status} {data[:200]!r}")
        return json.loads(data)

    @staticmethod
    def _model(model: str) -> str:
        return f"/v2/models/{quote(model, safe='')}"

    # -- health --------------------------------------------------------------------------------------------
    def server_ready(self, timeout: float | None = None) -> bool:
        """Whether ``GET /v2/health/ready`` answers 200 (every model loaded, warm-up done; with strict readiness);
        False when the server does not answer at all."""
        try:
            return self.request("GET", "/v2/health/ready", timeout=timeout)[0] == 200
        except (OSError, ValueError):
            return False

    def model_ready(self, model: str, timeout: float | None = None) -> bool:
        """Whether ``model`` answers its readiness call with 200; False when the server does not answer."""
        try:
            return self.request("GET", f"{self._model(model)}/ready", timeout=timeout)[0] == 200
        except (OSError, ValueError):
            return False

    # -- model repository (admin) --------------------------------------------------------------------------
    def repository_index(self, timeout: float | None = None) -> list[dict]:
        """The repository index: one ``{"name", "version", "state", "reason"}`` per model (an admin API).

        Raises :class:`TritonHttpError` on an HTTP error (403: no or a wrong admin key), :class:`OSError` when
        the server does not answer."""
        return self._json("POST", "/v2/repository/index", b"{}", timeout)

    def _repository(self, action: str, model: str, timeout: float | None) -> tuple[int, str]:
        try:
            status, body = self.request(
                "POST", f"/v2/repository/models/{quote(model, safe='')}/{action}", b"{}", timeout
            )
        except OSError as exc:
            return 0, str(exc)
        return status, "" if status == 200 else body[:300].decode(errors="replace")

    def load(self, model: str, timeout: float | None = None) -> tuple[int, str]:
        """Load (or reload) ``model``: ``(HTTP status, error text)``, ``(200, "")`` once it is loaded, status 0
        when the server did not answer (an admin API; loading the engine can take minutes: pass ``timeout``)."""
        return self._repository("load", model, timeout)

    def unload(self, model: str, timeout: float | None = None) -> tuple[int, str]:
        """Unload ``model`` (its ensembles with it): ``(HTTP status, error text)`` as :meth:`load`."""
        return self._repository("unload", model, timeout)

    # -- model information ---------------------------------------------------------------------------------
    def statistics(self, model: str, timeout: float | None = None) -> dict:
        """``GET /v2/models/<model>/stats`` (an admin API): ``{"model_stats": [...]}``.

        Raises :class:`TritonHttpError`, :class:`OSError` or :class:`ValueError` (not JSON)."""
        return self._json("GET", f"{self._model(model)}/stats", timeout=timeout)

    def metadata(self, model: str, timeout: float | None = None) -> dict:
        """``GET /v2/models/<model>``: platform and input and output tensors (open to clients); raises as
        :meth:`statistics`."""
        return self._json("GET", self._model(model), timeout=timeout)

    def config(self, model: str, timeout: float | None = None) -> dict:
        """``GET /v2/models/<model>/config``: the model's configuration as JSON (an admin API); raises as
        :meth:`statistics`."""
        return self._json("GET", f"{self._model(model)}/config", timeout=timeout)
