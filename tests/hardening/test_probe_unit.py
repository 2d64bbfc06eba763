"""The probe's requests and the supervisor's command line, without a server."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from ofa_serving.probe import _config_from_metadata, _probe_inputs, tiny_png
from ofa_serving.supervisor import ADMIN_HEADER, main, model_control_flags
from tests.serving.conftest import model_config


def test_tiny_png_is_a_valid_image_with_fresh_bytes_every_time():
    first, second = tiny_png(), tiny_png()
    assert first != second  # never a response-cache hit
    image = Image.open(io.BytesIO(first))
    image.load()
    assert image.size == (8, 8) and image.mode == "RGB"


@pytest.mark.parametrize("model", ["preprocess", "ofa"])
def test_probe_requests_follow_each_models_config(model):
    config = model_config(model)
    header, body = _probe_inputs(config)
    inputs = {i["name"]: i for i in header["inputs"]}
    assert set(inputs) == {i["name"] for i in config["input"]}
    assert sum(i["parameters"]["binary_data_size"] for i in header["inputs"]) == len(body)
    assert {o["name"] for o in header["outputs"]} == {o["name"] for o in config["output"]}
    if model == "preprocess":
        (length,) = struct.unpack("<I", body[:4])
        assert inputs["image"]["shape"] == [1, 1] and Image.open(io.BytesIO(body[4 : 4 + length])).size == (
            8,
            8,
        )
    else:
        assert (
            inputs["pixel_values"]["shape"] == [1, 3, 480, 480]
            and inputs["pixel_values"]["datatype"] == "UINT8"
        )
        offset = inputs["pixel_values"]["parameters"]["binary_data_size"]
        settings = np.frombuffer(body[offset:], dtype=np.int32)
        # beam 1, 1 token, 1 caption (every optional INT32 setting at 1): the cheapest real engine call
        assert len(settings) == len(inputs) - 1 and settings.tolist() == [1] * len(settings)
    json.dumps(header)


def test_model_control_is_restricted_to_the_key():
    flags = model_control_flags("s3cret")
    assert flags[:2] == ["--model-control-mode=explicit", "--load-model=*"]
    admin = f"shared-memory,logging,trace,model-repository,model-config,statistics:{ADMIN_HEADER}=s3cret"
    assert flags[2:] == [f"--http-restricted-api={admin}", f"--grpc-restricted-protocol={admin}"]
    # with an inference key: a second group (Triton allows a category in one group only)
    with_api = model_control_flags("s3cret", "inference-key-0123")
    assert with_api[2:4] == flags[2:]
    assert with_api[4:] == [
        "--http-restricted-api=inference:ofa-api-key=inference-key-0123",
        "--grpc-restricted-protocol=inference:ofa-api-key=inference-key-0123",
    ]


@pytest.mark.parametrize("model", ["preprocess", "ofa"])
def test_probe_requests_from_metadata_match_those_from_the_config(model):
    """The probe reads the model's metadata (open; the config is an admin API): same request as from the config."""
    config = model_config(model)
    batched = int(config.get("max_batch_size", 0)) > 0
    kserve = {"TYPE_STRING": "BYTES", "TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_UINT8": "UINT8"}

    def tensors(specs):
        return [
            {
                "name": t["name"],
                "datatype": kserve[t["data_type"]],
                "shape": ([-1] if batched else []) + [int(d) for d in t["dims"]],
            }
            for t in specs
        ]

    metadata = {
        "name": model,
        "platform": config.get("backend", "python"),
        "inputs": tensors(config["input"]),
        "outputs": tensors(config["output"]),
    }
    from_config, from_metadata = _probe_inputs(config)[0], _probe_inputs(_config_from_metadata(metadata))[0]
    assert from_metadata == from_config
    assert _config_from_metadata({"platform": "ensemble"})["platform"] == "ensemble"


def test_the_supervisor_refuses_a_server_it_could_not_heal():
    with pytest.raises(SystemExit) as exited:
        main(["tritonserver", "--model-repository=/x", "--model-control-mode=none"])
    assert exited.value.code == 2
