"""The Triton HTTP API client against a stand-in server: statuses returned, keys sent, errors raised."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ofa_serving.launcher import TritonServer, free_port
from ofa_serving.probe import list_models
from ofa_serving.security import ADMIN_HEADER
from ofa_serving.triton_api import TritonHttp, TritonHttpError

KEY = "admin-key-0123456789"


class _Triton(BaseHTTPRequestHandler):
    """Answers like tritonserver: admin APIs only with the key; ``broken`` fails with 500."""

    seen: list[tuple[str, str, bytes]] = []

    def _answer(self, status: int, body: object = b"") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((method, self.path, body))
        admin = self.headers.get(ADMIN_HEADER) == KEY
        if self.path == "/v2/health/ready":
            return self._answer(200)
        if self.path == "/v2/models/ofa/ready":
            return self._answer(400, {"error": "not ready"})
        if self.path == "/v2/repository/index":
            if not admin:
                return self._answer(403, {"error": "This API is restricted"})
            return self._answer(
                200, [{"name": "ofa", "state": "READY"}, {"name": "caption", "state": "LOADING"}]
            )
        if self.path.startswith("/v2/repository/models/"):
            return self._answer(
                200 if "/ofa/" in self.path else 400, b"" if "/ofa/" in self.path else b"no model"
            )
        if self.path == "/v2/models/ofa/stats":
            return self._answer(200, {"model_stats": [{"execution_count": 7}]})
        if self.path == "/v2/models/broken/config":
            return self._answer(500, {"error": "boom"})
        return self._answer(404, {"error": "unknown"})

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def triton():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Triton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Triton.seen.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_statuses_are_returned_and_json_answers_parsed(triton):
    api = TritonHttp(triton, {ADMIN_HEADER: KEY})
    assert api.server_ready() and not api.model_ready("ofa")
    assert api.request("GET", "/v2/nothing")[0] == 404
    assert api.repository_index() == [
        {"name": "ofa", "state": "READY"},
        {"name": "caption", "state": "LOADING"},
    ]
    assert api.statistics("ofa")["model_stats"][0]["execution_count"] == 7
    assert api.load("ofa") == (200, "") and api.unload("other") == (400, "no model")
    with pytest.raises(TritonHttpError) as error:
        api.config("broken")
    assert error.value.status == 500 and "boom" in str(error.value)
    method, path, body = _Triton.seen[-1]
    assert (method, path) == ("GET", "/v2/models/broken/config")
    api.request("POST", "/v2/x", {"a": 1})
    assert _Triton.seen[-1][2] == b'{"a": 1}'


def test_admin_apis_need_the_key(triton):
    with pytest.raises(TritonHttpError) as error:
        TritonHttp(triton).repository_index()
    assert error.value.status == 403
    with pytest.raises(RuntimeError, match="needs the admin key"):
        list_models(triton)
    assert list_models(triton, headers={ADMIN_HEADER: KEY}) == {"ofa": "READY", "caption": "LOADING"}


def test_a_server_that_does_not_answer():
    api = TritonHttp(f"http://127.0.0.1:{free_port()}", timeout=1)
    assert not api.server_ready() and not api.model_ready("ofa")
    with pytest.raises(OSError):
        api.request("GET", "/v2/health/ready")
    status, text = api.load("ofa")
    assert status == 0 and text


def test_a_launcher_server_hands_out_an_admin_client(tmp_path):
    server = TritonServer(model_dir=tmp_path, http_port=18000)
    api = server.admin()
    assert api.base_url == "http://127.0.0.1:18000" and api.headers == {ADMIN_HEADER: server.admin_key}
    assert server.admin_key not in repr(api)
