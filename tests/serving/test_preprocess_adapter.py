"""The `preprocess` adapter (model_repository/preprocess/1/model.py) under a stand-in pb_utils."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ofa_captioning.images import ImageDecodeError, load_image, normalize_pixels, preprocess_images
from ofa_serving.settings import SettingsError

from .conftest import init_args, load_adapter


def encoded(color, size=(32, 24), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def image_request(pb, *payloads: bytes):
    return pb.InferenceRequest(image=np.array([[p] for p in payloads], dtype=np.object_))


@pytest.fixture
def model(pb, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))  # no configuration.json: the engine's defaults (480)
    m = load_adapter("preprocess").TritonPythonModel()
    m.initialize(init_args("preprocess"))
    return m


def pixel_values(pb, response):
    assert not response.has_error(), response.error().message()
    return pb.get_output_tensor_by_name(response, "pixel_values").as_numpy()


def test_pixels_are_uint8_and_normalize_to_the_engine_preprocessing(pb, model):
    red, blue = encoded((255, 0, 0)), encoded((0, 0, 255), fmt="JPEG")
    responses = model.execute([image_request(pb, red), image_request(pb, blue)])
    expected = preprocess_images([red, blue], size=480, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    got = [pixel_values(pb, r) for r in responses]
    assert got[0].shape == (1, 3, 480, 480) and got[0].dtype == np.uint8
    assert got[0].nbytes * 4 == expected[0].nbytes  # a quarter of the float32 bytes through shared memory
    normalized = normalize_pixels(np.concatenate(got), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).numpy()
    np.testing.assert_array_equal(normalized.view(np.int32), expected.view(np.int32))  # bit for bit


def test_undecodable_image_fails_alone_with_the_reason(pb, model):
    good = encoded((0, 255, 0))
    responses = model.execute(
        [image_request(pb, good), image_request(pb, b"this is not an image"), image_request(pb, good)]
    )
    assert pixel_values(pb, responses[0]).shape == (1, 3, 480, 480)
    assert pixel_values(pb, responses[2]).shape == (1, 3, 480, 480)
    error = responses[1].error()
    assert error.code() == pb.TritonError.INVALID_ARG
    with pytest.raises(ImageDecodeError) as engine_says:
        load_image(b"this is not an image")
    assert error.message() == str(engine_says.value)  # the engine's reason, unchanged


def test_base64_payload_from_json_clients(pb, model):
    png = encoded((9, 9, 9))
    (response,) = model.execute([image_request(pb, base64.b64encode(png))])
    direct = pixel_values(pb, model.execute([image_request(pb, png)])[0])
    np.testing.assert_array_equal(pixel_values(pb, response), direct)


def test_multi_image_request_names_the_bad_row(pb, model):
    good = encoded((1, 2, 3))
    (ok, bad) = model.execute([image_request(pb, good, good), image_request(pb, good, b"")])
    assert pixel_values(pb, ok).shape == (2, 3, 480, 480)
    assert bad.error().code() == pb.TritonError.INVALID_ARG
    assert bad.error().message().startswith("image 1: empty image")


def test_size_limits(pb, tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OFA_MAX_IMAGE_BYTES", "2000")
    monkeypatch.setenv("OFA_MAX_IMAGE_PIXELS", "10000")
    m = load_adapter("preprocess").TritonPythonModel()
    m.initialize(init_args("preprocess"))
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    big_bytes = buffer.getvalue()
    assert len(big_bytes) > 2000
    many_pixels = encoded((0, 0, 0), size=(200, 100))
    assert len(many_pixels) < 2000
    responses = m.execute(
        [image_request(pb, big_bytes), image_request(pb, many_pixels), image_request(pb, encoded(0))]
    )
    assert (
        "image too large" in responses[0].error().message()
        and "limit is 2000 bytes" in responses[0].error().message()
    )
    assert "20000 pixels, more than the limit of 10000" in responses[1].error().message()
    assert pixel_values(pb, responses[2]).shape == (1, 3, 480, 480)


def test_checkpoint_with_another_image_size_is_refused_at_load(pb, tmp_path, monkeypatch):
    (tmp_path / "configuration.json").write_text(json.dumps({"model": {"patch_image_size": 384}}))
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    with pytest.raises(
        SettingsError, match=r"dims \[3, 480, 480\] but the checkpoint .* 384.*needs \[3, 384, 384\]"
    ):
        load_adapter("preprocess").TritonPythonModel().initialize(init_args("preprocess"))


def test_while_the_drain_flag_stands_new_requests_are_refused_with_unavailable(pb, tmp_path, monkeypatch):
    flag = tmp_path / "draining"
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("OFA_DRAIN_FILE", str(flag))
    m = load_adapter("preprocess").TritonPythonModel()
    m.initialize(init_args("preprocess"))
    assert pixel_values(pb, m.execute([image_request(pb, encoded((1, 2, 3)))])[0]).shape == (1, 3, 480, 480)
    flag.touch()  # the supervisor begins a graceful stop
    responses = m.execute([image_request(pb, encoded((1, 2, 3))), image_request(pb, b"not an image")])
    for response in responses:  # not decoded at all: even a bad image is only told to go elsewhere
        assert response.error().code() == pb.TritonError.UNAVAILABLE
        assert response.error().message() == (
            "preprocess: the server is stopping: retry the request (on another replica)"
        )
    flag.unlink()  # a new server on the port starts without it
    assert pixel_values(pb, m.execute([image_request(pb, encoded((1, 2, 3)))])[0]).shape == (1, 3, 480, 480)
