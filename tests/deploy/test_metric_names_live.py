"""The metric list of deploylib against the real tritonserver 2.51 of the nvidia-pytriton wheel.

A throwaway Python-backend model (dynamic batching, response cache on) is served on free loopback ports; after a
few requests (one of them repeated, for a cache hit) every CPU-side family the dashboards and the autoscaler may
use must be on the metrics endpoint. GPU families need a GPU and DCGM and are checked against Triton's source
instead (see deploylib). The server also reports its version, which must be the bundled 2.51.0 the list was read
from. The image runs a newer server (docs/security.md); Triton's core source of the newer releases (r26.06) still
defines every family the dashboards and the autoscaler use, and only added nv_inference_first_response_histogram_ms
and nv_model_load_duration_secs; that server's endpoint cannot be checked here.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from .deploylib import (
    TRITON_MODEL_METRICS,
    TRITON_SERVER_METRICS,
    TRITON_SUMMARY_METRICS,
    WHEEL_TRITON_VERSION,
)

pytestmark = pytest.mark.integration

TOY_CONFIG = """
backend: "python"
max_batch_size: 8
input [{ name: "x", data_type: TYPE_FP32, dims: [ 1 ] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [ 1 ] }]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [{ kind: KIND_CPU, count: 1 }]
response_cache { enable: true }
"""

TOY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return responses
"""


def infer(url: str, value: float) -> dict:
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}]}
    request = urllib.request.Request(
        f"{url}/v2/models/toy/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_triton_exports_the_listed_metrics(tmp_path):
    from ofa_serving.launcher import TritonServer

    repo = tmp_path / "repository"
    (repo / "toy" / "1").mkdir(parents=True)
    (repo / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (repo / "toy" / "1" / "model.py").write_text(TOY_MODEL)

    server = TritonServer.on_free_ports(
        repo,
        exit_timeout_secs=2,
        log_file=tmp_path / "triton.log",
        extra_args=["--metrics-config=summary_latencies=true"],
    )
    with server:
        for value in (1.0, 2.0, 1.0, 3.0):  # 1.0 twice: the second is a response-cache hit
            assert infer(server.http_url, value)["outputs"][0]["data"] == [value * 2]
        with urllib.request.urlopen(f"{server.http_url}/v2", timeout=10) as response:
            version = json.loads(response.read())["version"]
        text = server.metrics()

    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    expected = TRITON_MODEL_METRICS | TRITON_SERVER_METRICS | TRITON_SUMMARY_METRICS
    assert expected <= families, f"listed but not exported: {sorted(expected - families)}"
    # And nothing the dashboards could want is missing from the list (GPU families aside).
    unlisted = {f for f in families if f.startswith("nv_")} - expected
    assert not unlisted, f"exported but not listed in deploylib: {sorted(unlisted)}"
    assert re.search(r'^nv_cache_num_hits_per_model\{model="toy",version="1"\} 1$', text, re.M)

    assert version == WHEEL_TRITON_VERSION, (
        f"the metric list was read from {WHEEL_TRITON_VERSION}, not {version}"
    )
