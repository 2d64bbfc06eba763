"""The probe's requests and the supervisor's command line, without a server."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from ofa_serving.probe import _probe_inputs, tiny_png
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
    assert f"--http-restricted-api=model-repository:{ADMIN_HEADER}=s3cret" in flags
    assert f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}=s3cret" in flags


def test_the_supervisor_refuses_a_server_it_could_not_heal():
    with pytest.raises(SystemExit) as exited:
        main(["tritonserver", "--model-repository=/x", "--model-control-mode=none"])
    assert exited.value.code == 2
