"""Several checkpoints in one tritonserver (OFA_MODELS): two demo checkpoints built with different seeds, each
served under its own public name by the repository `make serve` generates, each answering with its own weights;
per-model readiness and metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from client import CaptionClient
from load_tests.testkit.parity import assert_same_results
from load_tests.testkit.servers import running
from ofa_serving.launcher import free_ports
from ofa_serving.repository import prepare_models
from ofa_serving.settings import ServerSettings, load_settings
from tests.conftest import REPO_ROOT

from .conftest import READY_TIMEOUT_S, distinct_images, metric

pytestmark = pytest.mark.integration

FAST = {"beam_size": 2, "max_length": 3}
NAMES = {"caption": 1, "caption_b": 2}  # public name -> seed of its demo checkpoint


@pytest.fixture(scope="module")
def checkpoints():
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

    return {
        name: ensure_demo_checkpoint(REPO_ROOT / "checkpoints" / f"ofa-tiny-demo-seed{seed}", seed=seed)
        for name, seed in NAMES.items()
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """`make serve`'s multi-model path (prepare_models) on free ports, without warm-up (faster start)."""
    tmp = tmp_path_factory.mktemp("several")
    http, grpc, metrics = free_ports(3)
    spec = " ".join(f"{name}={path}" for name, path in checkpoints.items())
    settings = load_settings(
        ServerSettings,
        environ={
            "OFA_MODELS": spec,
            "HTTP_PORT": str(http),
            "GRPC_PORT": str(grpc),
            "METRICS_PORT": str(metrics),
            "OFA_EXIT_TIMEOUT_SECS": "5",
        },
    )
    server, models, _ = prepare_models(settings, tmp / "repository")
    assert [m.name for m in models] == list(NAMES)
    server.log_file = tmp / "triton.log"
    server.extra_env["OFA_WARMUP"] = "false"
    with running(server, READY_TIMEOUT_S, stop_timeout=15):
        yield server


@pytest.fixture(scope="module")
def engines(checkpoints):
    from ofa_captioning.captioner import Captioner

    return {name: Captioner.from_pretrained(path) for name, path in checkpoints.items()}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_each_public_name_answers_with_its_own_checkpoint(protocol, server, engines):
    url = server.grpc_address if protocol == "grpc" else server.http_url
    images = distinct_images(2, start_seed=8000 if protocol == "grpc" else 8100)
    served = {}
    for name in NAMES:
        with CaptionClient(url, protocol=protocol, model=name, timeout=300) as client:
            served[name] = [client.caption(data, **FAST) for data in images]
        assert_same_results(served[name], [engines[name].caption([data], **FAST)[0] for data in images])
    # different weights: the two names do not give the same answers
    assert served["caption"] != served["caption_b"]


def test_n_best_on_the_second_model(server, engines):
    (data,) = distinct_images(1, start_seed=8200)
    with CaptionClient(server.grpc_address, model="caption_b", timeout=300) as client:
        got = client.caption_n_best(data, num_captions=2, **FAST)
    engine = engines["caption_b"]
    want = engine.generate_n_best(engine.preprocess([data]), num_captions=2, **FAST)[0]
    assert [c.text for c in got] == [c.text for c in want]


def ready(server, model):
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/ready", timeout=10) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return False


def test_every_model_reports_its_own_readiness(server):
    for model in ("caption", "preprocess", "ofa", "caption_b", "caption_b_preprocess", "caption_b_ofa"):
        assert ready(server, model), model
    assert not ready(server, "caption_c")  # not served
    with CaptionClient(server.grpc_address, model="caption_b") as client:
        report = client.health(("caption_b", "caption_b_ofa", "caption_c"))
    assert report == {
        "live": True,
        "ready": True,
        "model:caption_b": True,
        "model:caption_b_ofa": True,
        "model:caption_c": False,
    }


def test_metrics_are_labelled_by_model(server):
    before = {
        m: metric(server, "nv_inference_request_success", m)
        for m in ("caption", "ofa", "caption_b", "caption_b_ofa")
    }
    (data,) = distinct_images(1, start_seed=8300)
    with CaptionClient(server.grpc_address, model="caption_b", timeout=300) as client:
        client.caption(data, **FAST)
    after = {m: metric(server, "nv_inference_request_success", m) for m in before}
    assert after["caption_b"] == before["caption_b"] + 1
    assert after["caption_b_ofa"] == before["caption_b_ofa"] + 1
    assert after["caption"] == before["caption"] and after["ofa"] == before["ofa"]
