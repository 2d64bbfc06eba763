"""Triton adapter `ofa`: ``pixel_values`` (+ optional ``beam_size``, ``max_length``) -> ``caption``, ``score``.

A thin adapter over ``ofa_captioning.Captioner``. Every row of every request of one execute() goes into one
engine batch per distinct (beam_size, max_length); results go back one response per request, in order. A bad
request (settings out of range, inconsistent shapes) gets its own INVALID_ARG error and its neighbours are
still answered. Warm-up runs in initialize(), so the server reports ready only once the model is warm.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ofa_captioning.captioner import Captioner
from ofa_serving.adapter import (
    EngineHealth,
    RequestCancelled,
    cancelled,
    check_tensor_dims,
    input_array,
    model_config_dict,
    optional_int_rows,
    responses,
)
from ofa_serving.batching import RequestError, run_batched
from ofa_serving.settings import OFASettings, load_settings, resolve_device, resolve_dtype


class TritonPythonModel:
    """Caption batches of images with the OFA engine."""

    def initialize(self, args):
        """Load the checkpoint on the configured device, check the config's dims, warm up."""
        config = model_config_dict(args)
        self.model_name = args.get("model_name", "ofa")
        settings = load_settings(OFASettings, config)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device, torch.cuda.is_available())
        dtype = getattr(torch, resolve_dtype(settings.dtype, device))
        self.captioner = Captioner.from_pretrained(settings.model_dir, device=device, dtype=dtype)
        size = self.captioner.patch_image_size
        check_tensor_dims(
            config,
            "pixel_values",
            [3, size, size],
            f"the checkpoint {settings.model_dir} (patch_image_size {size})",
        )
        self.max_beam_tokens = settings.max_beam_tokens
        self.health = EngineHealth(pb_utils, self.model_name, settings.unhealthy_after_failures)
        if settings.warmup:
            self.captioner.warmup(batch_sizes=(1,))
        pb_utils.Logger.log_info(
            f"{self.model_name}: {settings.model_dir} on {device} ({dtype}), {torch.get_num_threads()} torch "
            f"threads, warm-up {'done' if settings.warmup else 'off'}"
        )

    def execute(self, requests):
        """One engine batch per distinct settings; one response per request, in order."""
        rows = [self._read(request) for request in requests]
        skipped = sum(isinstance(r, RequestCancelled) for r in rows)
        if skipped:
            pb_utils.Logger.log_info(f"{self.model_name}: {skipped} cancelled request(s) not computed")
        results = run_batched(rows, self._generate)
        return responses(pb_utils, results, self._outputs, model_name=self.model_name)

    @staticmethod
    def _outputs(captions):
        """A request's captions as its ``caption`` and ``score`` tensors."""
        texts = np.array([[c.text.encode("utf-8")] for c in captions], dtype=np.object_)
        scores = np.array([[c.score] for c in captions], dtype=np.float32)
        return [pb_utils.Tensor("caption", texts), pb_utils.Tensor("score", scores)]

    def _read(self, request):
        """The request's rows as ``((beam_size, max_length), pixels)``, or the error that makes it invalid."""
        gone = cancelled(request)  # its client gave up: no engine work for it
        if gone is not None:
            return gone
        try:
            pixels = input_array(pb_utils, request, "pixel_values")
            rows = len(pixels)
            beams = optional_int_rows(
                input_array(pb_utils, request, "beam_size", optional=True), rows, "beam_size"
            )
            lengths = optional_int_rows(
                input_array(pb_utils, request, "max_length", optional=True), rows, "max_length"
            )
            keys = []
            for beam, length in zip(beams, lengths, strict=True):
                try:
                    keys.append(self.captioner.validate_settings(beam, length))
                except ValueError as exc:
                    raise RequestError(str(exc)) from exc
                cost = keys[-1][0] * keys[-1][1]
                if cost > self.max_beam_tokens:
                    raise RequestError(
                        f"beam_size x max_length = {keys[-1][0]} x {keys[-1][1]} = {cost} is over this server's "
                        f"limit of {self.max_beam_tokens} (setting OFA_MAX_BEAM_TOKENS / max_beam_tokens)"
                    )
            return list(zip(keys, pixels, strict=True))
        except Exception as exc:  # noqa: BLE001 - becomes this request's error response
            return exc

    def _generate(self, key, pixels):
        """One engine call for all rows sharing the generation settings ``key``."""
        beam_size, max_length = key
        batch = torch.from_numpy(np.stack(pixels))
        try:
            captions = self.captioner.generate(batch, beam_size=beam_size, max_length=max_length)
        except Exception:
            self.health.failed()  # unloads the model when every batch fails (e.g. a poisoned CUDA context)
            raise
        self.health.succeeded()
        return captions

    def finalize(self):
        """Release the engine (and CUDA memory where it used some)."""
        self.captioner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pb_utils.Logger.log_info(f"{self.model_name}: finalized")
