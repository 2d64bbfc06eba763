"""Bad requests must not keep a batch's memory alive (found by ``make soak``; no server needed here).

The adapters keep a bad request's exception in a list of their ``execute()`` until its response is built. The
exception's traceback references the frame that raised it, which references ``execute()``'s frame (``f_back``),
which holds that list: a reference cycle, freed only by Python's cyclic garbage collector. Until then the good
requests' outputs of that ``execute()`` stay allocated; in the soak the ``preprocess`` stub and its
shared-memory pool grew by tens of MB (docs/reliability.md). ``ofa_serving.backend_utils.error_response`` now drops
the tracebacks once the error is logged; these tests fail if a cycle comes back.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ofa_serving.backend_utils import error_response
from ofa_serving.batching import RequestError, run_batched
from tests.serving import fake_pb_utils
from tests.serving.conftest import init_args

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def no_new_cycles():
    """Fail if the block leaves objects that only the cyclic garbage collector can free."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
        gc.collect()
        kinds = sorted({type(o).__name__ for o in gc.garbage})
        assert not gc.garbage, f"{len(gc.garbage)} objects in reference cycles: {kinds}"
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        if enabled:
            gc.enable()


@pytest.fixture
def preprocess_model(monkeypatch, demo_checkpoint):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    monkeypatch.setenv("OFA_MODEL_DIR", str(demo_checkpoint))
    path = REPO / "model_repository" / "preprocess" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("hardening_preprocess_adapter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize(init_args("preprocess"))
    return model


def _request(data: bytes):
    return fake_pb_utils.InferenceRequest(image=np.array([[data]], dtype=np.object_))


@pytest.mark.parametrize(
    "bad", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64], ids=["text", "empty", "png"]
)
def test_a_bad_image_batched_with_good_ones_leaves_no_cycle(preprocess_model, bad):
    good = (REPO / "samples" / "shapes.jpg").read_bytes()
    with no_new_cycles():
        responses = preprocess_model.execute([_request(good), _request(bad), _request(good)])
        assert [r.has_error() for r in responses] == [False, True, False]
        del responses


def test_engine_failures_shared_by_several_requests_leave_no_cycle():
    """run_batched hands one engine exception to every request of its batch; error_response frees it."""

    def failing_engine(_key, _payloads):
        raise RuntimeError("engine exploded")

    def execute(requests):
        results = run_batched(requests, failing_engine)
        return [error_response(fake_pb_utils, r, model_name="ofa") for r in results]

    with no_new_cycles():
        try:
            raise RequestError("bad settings")
        except RequestError as exc:
            bad = exc
        responses = execute([[("k", 1)], bad, [("k", 2)]])
        assert all(r.has_error() for r in responses)
        del responses, bad


# -- bounded preprocess memory (issue 10) -----------------------------------------------------------------------


def _big_pngs(count: int, width: int, height: int) -> list[bytes]:
    """``count`` distinct valid RGB PNGs of width x height: black but for a different last row (small files).

    The black rows are compressed once; each file continues a copy of that stream with its own last row.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + 3 * width)
    common = zlib.compressobj(1)
    head = common.compress(row * (height - 1))
    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    files = []
    for i in range(count):
        stream = common.copy()
        last = b"\x00" + bytes((i * 7 + k) % 256 for k in range(3 * width))
        idat = head + stream.compress(last) + stream.flush()
        files.append(header + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return files


@pytest.mark.integration
def test_32_images_just_under_the_pixel_limit_at_once_stay_within_bounded_memory(hardened_server):
    """32 concurrent requests (one preprocess execute: max_batch_size 32) of distinct images just under the
    configured pixel limit: all answered, and the stub's resident memory rises by far less than 32 decoded images
    (each image is reduced to its pixel tensor as soon as it is decoded)."""
    import tritonclient.grpc as grpcclient

    from load_tests.reliabilitylib import fire, memory_status
    from ofa_serving.processes import stub_pids

    from .conftest import MAX_IMAGE_PIXELS

    width = 4000
    height = MAX_IMAGE_PIXELS // width - 1  # just under the limit
    assert MAX_IMAGE_PIXELS - width <= width * height < MAX_IMAGE_PIXELS
    images = _big_pngs(32, width, height)
    assert len(set(images)) == 32
    requests = []
    for data in images:
        tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        requests.append([tensor])
    (stub,) = stub_pids(hardened_server.pid, "preprocess")
    Path(f"/proc/{stub}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = memory_status(stub)
    outcomes = fire(hardened_server.grpc_address, requests, model="preprocess", timeout_s=600)
    after = memory_status(stub)
    decoded_mb = 32 * width * height * 3 / 2**20
    rise_mb = (after["VmHWM"] - before["VmRSS"]) / 2**20
    print(
        f"\n32 x {width}x{height} images ({width * height / 1e6:.1f} MP, {decoded_mb:.0f} MB decoded in all): "
        f"preprocess stub RSS {before['VmRSS'] / 2**20:.0f} MB before, peak {after['VmHWM'] / 2**20:.0f} MB "
        f"(+{rise_mb:.0f} MB)"
    )
    assert [o.status for o in outcomes] == ["OK"] * 32, [o.message for o in outcomes if not o.ok][:3]
    assert stub_pids(hardened_server.pid, "preprocess") == [stub]
    assert rise_mb < 1024
