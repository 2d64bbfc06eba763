"""Triton adapter `preprocess`: encoded image bytes -> ``pixel_values`` [3, S, S] uint8 (resized RGB; `ofa`
normalizes them on the model's device).

A thin adapter over ``ofa_captioning.images`` (the same function the engine and the tests use). The images
of one execute() are decoded one at a time and each is reduced to its pixel tensor at once, so that at most one
full-size decoded image is alive besides the batch's tensors (32 images of up to ``max_image_pixels`` would
otherwise be held together). An undecodable image fails only its own request (INVALID_ARG with the reason), a
request whose client gave up is skipped, and while the server drains (``OFA_DRAIN_FILE`` exists) a new request is
refused with UNAVAILABLE so that its client retries elsewhere; one response per request, in order.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ofa_captioning.config import load_task_config
from ofa_captioning.images import ImageDecodeError, resized_pixels
from ofa_serving.backend_utils import (
    RequestCancelled,
    cancelled,
    check_tensor_dims,
    draining,
    input_array,
    model_config_dict,
    responses,
)
from ofa_serving.batching import RequestError, run_batched
from ofa_serving.payloads import PayloadError, decode_image_payload
from ofa_serving.settings import PreprocessSettings, load_settings
from ofa_serving.tensors import IMAGE, PIXEL_VALUES, pixel_values


class TritonPythonModel:
    """Decode images and compute the engine's pixel values."""

    def initialize(self, args):
        """Read settings and the checkpoint's image settings; refuse a config whose dims do not match."""
        config = model_config_dict(args)
        self.model_name = args.get("model_name", "preprocess")
        self.settings = load_settings(PreprocessSettings, config)
        task = load_task_config(self.settings.model_dir)
        self.size = task.patch_image_size
        check_tensor_dims(
            config,
            PIXEL_VALUES.name,
            pixel_values(self.size).dims,
            f"the checkpoint {self.settings.model_dir} (patch_image_size {self.size})",
        )
        pb_utils.Logger.log_info(
            f"{self.model_name}: {self.size}x{self.size} pixels from {self.settings.model_dir}, "
            f"max {self.settings.max_image_bytes} bytes / {self.settings.max_image_pixels} pixels per image"
        )

    def execute(self, requests):
        """One response per request, in order; a bad image fails only its own request."""
        # While the server drains, nothing is decoded: every request of this execution is told to go elsewhere.
        stopping = draining(self.settings.drain_file)
        rows = [stopping or self._read(request) for request in requests]
        skipped = sum(isinstance(r, RequestCancelled) for r in rows)
        if skipped:
            pb_utils.Logger.log_info(f"{self.model_name}: {skipped} cancelled request(s) not decoded")
        results = run_batched(rows, lambda _key, pixels: pixels)
        return responses(
            pb_utils,
            results,
            lambda pixels: [pb_utils.Tensor(PIXEL_VALUES.name, np.stack(pixels))],
            model_name=self.model_name,
        )

    def _read(self, request):
        """The request's images as ``(None, pixels)`` rows, or the error that makes it invalid."""
        gone = cancelled(request)  # its client gave up: nothing to decode
        if gone is not None:
            return gone
        try:
            images = input_array(pb_utils, request, IMAGE.name)
            if images.ndim != 2 or images.shape[1] != 1:
                raise RequestError(f"input 'image' must have shape [batch, 1], got {list(images.shape)}")
            rows = []
            for i, payload in enumerate(images[:, 0]):
                try:
                    data = decode_image_payload(payload, max_bytes=self.settings.max_image_bytes)
                    pixels = resized_pixels(
                        [data], size=self.size, max_pixels=self.settings.max_image_pixels
                    )[0]
                    rows.append((None, pixels))
                except (PayloadError, ImageDecodeError) as exc:
                    prefix = f"image {i}: " if len(images) > 1 else ""
                    raise RequestError(f"{prefix}{exc}") from exc
            return rows
        except Exception as exc:  # noqa: BLE001 - becomes this request's error response
            return exc

    def finalize(self):
        """Nothing to release (no model weights here)."""
        pb_utils.Logger.log_info(f"{self.model_name}: finalized")
