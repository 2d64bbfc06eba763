"""Bad, hostile and unusual input against the real server (issue 5, hardening: bad input).

All requests of :func:`build_cases` are sent at once (one asynchronous gRPC burst), so bad requests share
`preprocess` and `ofa` executions with good ones. Every request gets a clear INVALID_ARGUMENT or a correct
caption; good requests succeed whatever was batched with them; afterwards the server and every model are still
ready, both Python backend stubs are the same processes (none died), and a new request is captioned.

The unusual but valid formats travel as the 16 rows of one request (the largest batch a request may carry; the
ensemble's max_batch_size), each next to its reference: the same picture as a plain RGB PNG decoded by Pillow
alone (first frame/page for GIF/TIFF, and the second one, which must *not* be what the server captioned). One
16-row request costs the 2-core machine as much as 16 single ones, so this keeps `make test` short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from load_tests.reliabilitylib import caption_inputs, fire, rss_bytes
from load_tests.testkit.parity import same_results
from ofa_captioning.images import ImageDecodeError, load_image

from . import inputs
from .conftest import FAST, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, models_ready, png, stub_pid_by_model

pytestmark = pytest.mark.integration

INVALID = "StatusCode.INVALID_ARGUMENT"
BATCH = "16 unusual images in one request"


@dataclass
class Case:
    """One request of the burst: its images, settings and what it must get."""

    images: list[bytes]
    settings: dict = field(default_factory=lambda: dict(FAST))
    #: substrings of the INVALID_ARGUMENT message, or None: must be captioned
    error: list[str] | None = None


def engine_message(data: bytes) -> str | None:
    """The engine's own ImageDecodeError message for ``data`` under the server's limits (None: it decodes)."""
    try:
        load_image(data, max_pixels=MAX_IMAGE_PIXELS)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def unusual_rows() -> tuple[list[bytes], dict[str, tuple[int, int, int | None]]]:
    """The 16 rows of the batch request, and ``{name: (row, row of its reference, row it must differ from)}``."""
    gif, tiff = inputs.animated_gif(501), inputs.multipage_tiff(502)
    cmyk, gray16 = inputs.cmyk_jpeg(503), inputs.png16(504)
    palette, garbage_jpeg = inputs.palette_with_transparency(505), inputs.jpeg_with_garbage_body(506)
    assert engine_message(garbage_jpeg) is None, "libjpeg decodes a garbage scan: the server must caption it"
    rows = [
        gif, inputs.frame_as_png(gif, 0), inputs.frame_as_png(gif, 1),  # 0-2
        tiff, inputs.frame_as_png(tiff, 0), inputs.frame_as_png(tiff, 1),  # 3-5
        cmyk, inputs.rgb_png_of(cmyk),  # 6-7
        gray16, inputs.rgb_png_of(gray16),  # 8-9
        palette, inputs.rgb_png_of(palette),  # 10-11
        garbage_jpeg, inputs.rgb_png_of(garbage_jpeg),  # 12-13
        inputs.plain_png(1, 1, 515),  # 14
        inputs.plain_png(10000, 10, 516),  # 15
    ]  # fmt: skip
    checks = {
        "animated GIF (first frame)": (0, 1, 2),
        "multi-page TIFF (first page)": (3, 4, 5),
        "CMYK JPEG": (6, 7, None),
        "16-bit PNG": (8, 9, None),
        "palette PNG with transparency": (10, 11, None),
        "JPEG header, garbage scan": (12, 13, None),
    }
    return rows, checks


def build_cases() -> dict[str, Case]:
    """Every request of the burst, by name."""
    rows, _ = unusual_rows()
    near_limit = inputs.noise_png(800, 800, 508)
    over_limit = inputs.noise_png(900, 900, 509)
    assert len(near_limit) < MAX_IMAGE_BYTES < len(over_limit)
    truncated_jpeg = inputs.truncated(inputs.jpeg(320, 240, 510))
    truncated_png = inputs.truncated(inputs.plain_png(320, 240, 511))
    garbage_png = inputs.png_with_garbage_body(64, 48, 512)
    random_data = inputs.random_bytes(4096, 513)
    text = b"A caption server must never be sent this sentence, only image files.\n" * 20
    gif_header = b"GIF89a" + inputs.random_bytes(200, 514)
    bomb = inputs.png_bomb(5000, 5000)  # 25 M pixels: over the configured 16 M, under Pillow's own limit
    tiny = rows[14]

    cases = {
        # undecodable: the engine's own message, passed on by the server
        "zero bytes": Case([b""], error=["empty image"]),
        "random bytes": Case([random_data], error=[engine_message(random_data), "not a decodable image"]),
        "text": Case([text], error=[engine_message(text), "not a decodable image"]),
        "truncated JPEG": Case([truncated_jpeg], error=[engine_message(truncated_jpeg), "truncated"]),
        "truncated PNG": Case([truncated_png], error=[engine_message(truncated_png), "truncated"]),
        "PNG header, garbage body": Case([garbage_png], error=[engine_message(garbage_png), "corrupt"]),
        "GIF header, garbage body": Case([gif_header], error=[engine_message(gif_header)]),
        # limits (configured on this server: 2 MiB, 16 M pixels)
        "pixel bomb over the configured limit": Case(
            [bomb], error=[f"5000x5000 = 25000000 pixels, more than the limit of {MAX_IMAGE_PIXELS}"]
        ),
        "image over the byte limit": Case(
            [over_limit], error=[f"image too large: {len(over_limit)} bytes, the limit is {MAX_IMAGE_BYTES}"]
        ),
        "image just under the byte limit": Case([near_limit]),
        # batches in one request: 16 rows are captioned row by row; 17 are refused by Triton; one bad row makes
        # the whole request invalid, naming the row
        BATCH: Case(rows),
        "17 images in one request": Case(rows + [tiny], error=["batch-size must be <= 16"]),
        "one bad image among good ones": Case(
            [tiny, random_data], error=["image 1: ", engine_message(random_data)]
        ),
        # generation settings out of range (checked by `ofa` before any engine work)
        "beam_size 0": Case([tiny], {"beam_size": 0}, ["beam_size must be between 1 and 16, got 0"]),
        "beam_size 17": Case([tiny], {"beam_size": 17}, ["beam_size must be between 1 and 16, got 17"]),
        "beam_size -1": Case([tiny], {"beam_size": -1}, ["beam_size must be between 1 and 16, got -1"]),
        "beam_size 2**31-1": Case(
            [tiny], {"beam_size": 2**31 - 1}, ["beam_size must be between 1 and 16, got 2147483647"]
        ),
        "max_length 0": Case([tiny], {"max_length": 0}, ["max_length must be between 1 and 64, got 0"]),
        "max_length 65": Case([tiny], {"max_length": 65}, ["max_length must be between 1 and 64, got 65"]),
    }
    for case in cases.values():
        if case.error is not None:
            assert all(case.error), "an expected message is missing (the engine decoded a 'bad' input?)"
    # Settings are checked inside ofa's execute(): send those requests first, so that they do not wait behind
    # the 16-row batch in ofa's queue (minutes on a busy 2-core machine, past the 60 s queue timeout).
    first = [name for name in cases if name.startswith(("beam_size", "max_length"))]
    return {name: cases[name] for name in first + [n for n in cases if n not in first]}


@pytest.fixture(scope="module")
def burst(hardened_server):
    """Every case at once; the outcomes, and the server's state before and after."""
    cases = build_cases()
    before = {"stubs": stub_pid_by_model(hardened_server), "ready": models_ready(hardened_server)}
    requests = [caption_inputs(grpcclient, c.images, **c.settings) for c in cases.values()]
    outcomes = fire(hardened_server.grpc_address, requests, timeout_s=480)
    after = {"stubs": stub_pid_by_model(hardened_server), "ready": models_ready(hardened_server)}
    return {
        "cases": cases,
        "outcomes": dict(zip(cases, outcomes, strict=True)),
        "before": before,
        "after": after,
    }


@pytest.mark.parametrize("name", list(build_cases()))
def test_each_request_gets_a_clear_error_or_a_caption(burst, name):
    case, outcome = burst["cases"][name], burst["outcomes"][name]
    if case.error is not None:
        assert outcome.status == INVALID, f"{name}: expected INVALID_ARGUMENT, got {outcome}"
        for part in case.error:
            assert part in outcome.message, f"{name}: {part!r} not in {outcome.message!r}"
        assert "internal error" not in outcome.message
        return
    assert outcome.ok, f"{name}: expected a caption, got {outcome.status} {outcome.message}"
    assert len(outcome.captions) == len(case.images)


@pytest.mark.parametrize("name", list(unusual_rows()[1]))
def test_an_unusual_format_is_captioned_like_its_rgb_picture(burst, name):
    row, same_as, not_as = unusual_rows()[1][name]
    outcome = burst["outcomes"][BATCH]
    assert outcome.ok, outcome
    got, want = outcome.captions[row], outcome.captions[same_as]
    assert same_results(tuple(got), tuple(want)), f"{name}: {got} != {want}"
    if not_as is not None:
        other = outcome.captions[not_as]
        assert not same_results(tuple(other), tuple(got)), (
            f"{name}: the second frame/page gets the same caption, so the test cannot tell which one was used"
        )


def test_the_16_rows_of_one_request_are_captioned_row_by_row(burst):
    """Each row its own caption: the distinct pictures get distinct scores (rows neither mixed nor merged)."""
    outcome = burst["outcomes"][BATCH]
    assert outcome.ok, outcome
    scores = [score for _text, score in outcome.captions]
    assert len(scores) == 16
    distinct_pictures = [scores[i] for i in (1, 2, 4, 5, 7, 9, 11, 13, 14, 15)]
    assert len({round(s, 4) for s in distinct_pictures}) == len(distinct_pictures), scores


def test_server_and_every_stub_survive_the_burst(burst, hardened_server):
    assert burst["after"]["ready"] == dict.fromkeys(["server", "caption", "preprocess", "ofa"], True)
    assert burst["after"]["stubs"] == burst["before"]["stubs"], "a Python backend stub died and was replaced"
    log = hardened_server.log_file.read_text(errors="replace")
    assert "is not healthy" not in log and "Traceback" not in log
    assert "bad request" in log  # the refusals were logged as such (one line each), not as internal errors
    data = png(61, 47, seed=int(time.time()))
    (after,) = fire(hardened_server.grpc_address, [caption_inputs(grpcclient, [data], **FAST)])
    assert after.ok, after


def test_a_30000x30000_png_bomb_is_refused_from_its_header(hardened_server):
    """110 KB on the wire, 900 M pixels: refused in well under a second, without the stub allocating its pixels."""
    bomb = inputs.png_bomb(30000, 30000)
    assert len(bomb) < 200_000
    stub = stub_pid_by_model(hardened_server)["preprocess"]
    peak_before = _peak_rss(stub)
    (outcome,) = fire(hardened_server.grpc_address, [caption_inputs(grpcclient, [bomb], **FAST)])
    assert outcome.status == INVALID, outcome
    assert "900000000 pixels" in outcome.message and "decompression bomb" in outcome.message
    assert outcome.latency_s < 5.0
    growth = _peak_rss(stub) - peak_before
    print(
        f"\n{len(bomb)}-byte PNG bomb refused in {outcome.latency_s:.3f} s, peak RSS +{growth / 2**20:.1f} MB"
    )
    assert growth < 100 * 2**20, f"the preprocess stub's peak RSS grew by {growth / 2**20:.0f} MB"
    assert stub_pid_by_model(hardened_server)["preprocess"] == stub and rss_bytes(stub)


def _peak_rss(pid: int) -> int:
    """VmHWM: the peak resident set size of ``pid`` so far."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _grpc_error(server, inputs_) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("caption", inputs_)
        return info.value
    finally:
        client.close()


def _tensor(module, name, array, datatype):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


WRONG = {
    "image as FP32": (
        lambda m: [_tensor(m, "image", np.zeros((1, 1), np.float32), "FP32")],
        "data-type is 'FP32', but model 'caption' expects 'BYTES'",
    ),
    "beam_size as INT64": (
        lambda m: [
            _tensor(m, "image", np.array([[b"x"]], object), "BYTES"),
            _tensor(m, "beam_size", np.ones((1, 1), np.int64), "INT64"),
        ],
        "data-type is 'INT64', but model 'caption' expects 'INT32'",
    ),
    "beam_size of shape [1, 2]": (
        lambda m: [
            _tensor(m, "image", np.array([[b"x"]], object), "BYTES"),
            _tensor(m, "beam_size", np.ones((1, 2), np.int32), "INT32"),
        ],
        "unexpected shape for input 'beam_size'",
    ),
    "image without the batch dimension": (
        lambda m: [_tensor(m, "image", np.array([b"x"], object), "BYTES")],
        "unexpected shape for input 'image'",
    ),
    "image of shape [1, 2]": (
        lambda m: [_tensor(m, "image", np.array([[b"x", b"y"]], object), "BYTES")],
        "unexpected shape for input 'image'",
    ),
    "2 settings rows for 1 image": (
        lambda m: [
            _tensor(m, "image", np.array([[b"x"]], object), "BYTES"),
            _tensor(m, "beam_size", np.ones((2, 1), np.int32), "INT32"),
        ],
        "batch size does not match other inputs",
    ),
    # Triton 2.51 does not check that an ensemble's required input is there; the ensemble then stops with this
    # (unhelpful) message, still INVALID_ARGUMENT, and nothing reaches the models (docs/reliability.md)
    "no image input": (
        lambda m: [_tensor(m, "beam_size", np.ones((1, 1), np.int32), "INT32")],
        "at least one output is not set while no more ensemble steps can be made",
    ),
}


@pytest.mark.parametrize("name", list(WRONG))
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wrong_dtype_or_shape_sent_to_caption_is_invalid_argument(hardened_server, protocol, name):
    build, expected = WRONG[name]
    if protocol == "grpc":
        error = _grpc_error(hardened_server, build(grpcclient))
        assert error.status() == INVALID
    else:
        client = httpclient.InferenceServerClient(hardened_server.http_address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.infer("caption", build(httpclient))
        finally:
            client.close()
        error = info.value
        assert error.status() == "400"
    assert expected in error.message(), error.message()


def test_the_server_still_serves_after_all_of_the_above(hardened_server, burst):
    assert models_ready(hardened_server) == dict.fromkeys(["server", "caption", "preprocess", "ofa"], True)
    assert stub_pid_by_model(hardened_server) == burst["before"]["stubs"]
    data = png(59, 45, seed=int(time.time()))
    (outcome,) = fire(hardened_server.grpc_address, [caption_inputs(grpcclient, [data], **FAST)])
    assert outcome.ok, outcome
