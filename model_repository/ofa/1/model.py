"""Triton adapter `ofa`: ``pixel_values`` (+ optional ``beam_size``, ``max_length``, ``num_captions``) ->
``caption``, ``score`` (the best) and ``captions``, ``scores`` (the n best, ``ofa_serving.nbest``).

A thin adapter over ``ofa_captioning.Captioner``. Every row of every request of one execute() goes into one
engine batch per distinct (beam_size, max_length); results go back one response per request, in order. A bad
request (settings out of range, inconsistent shapes) gets its own INVALID_ARG error and its neighbours are
still answered. Warm-up runs in initialize(), so the server reports ready only once the model is warm.
"""

from __future__ import annotations

import gc

import torch
import triton_python_backend_utils as pb_utils

from ofa_captioning.captioner import Captioner
from ofa_serving.backend_utils import (
    EngineHealth,
    PixelStaging,
    RequestCancelled,
    cancelled,
    check_tensor_dims,
    generation_settings,
    input_array,
    model_config_dict,
    optional_int_rows,
    responses,
)
from ofa_serving.batching import run_batched
from ofa_serving.nbest import n_best_arrays, pad_captions, request_num_captions
from ofa_serving.profiles import instance_device, warmup_batch_sizes, warmup_plan
from ofa_serving.settings import OFASettings, load_settings, resolve_dtype
from ofa_serving.tensors import BEAM_SIZE, MAX_LENGTH, NUM_CAPTIONS, PIXEL_VALUES, pixel_values


class TritonPythonModel:
    """Caption batches of images with the OFA engine."""

    def initialize(self, args):
        """Load the checkpoint on the configured device, check the config's dims, warm up."""
        config = model_config_dict(args)
        self.model_name = args.get("model_name", "ofa")
        settings = load_settings(OFASettings, config)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = instance_device(args, settings.device, torch.cuda.is_available())
        if device.startswith("cuda:"):  # a KIND_GPU instance: stray allocations go to its own GPU too
            torch.cuda.set_device(device)
        dtype = getattr(torch, resolve_dtype(settings.dtype, device))
        self.captioner = Captioner.from_pretrained(
            settings.model_dir,
            device,
            dtype,
            allow_tf32=settings.allow_tf32,
            cuda_graphs=settings.cuda_graphs,
        )
        size = self.captioner.patch_image_size
        check_tensor_dims(
            config,
            PIXEL_VALUES.name,
            pixel_values(size).dims,
            f"the checkpoint {settings.model_dir} (patch_image_size {size})",
        )
        self.max_beam_tokens = settings.max_beam_tokens
        self.health = EngineHealth(pb_utils, self.model_name, settings.unhealthy_after_failures)
        self.staging = PixelStaging(device, config.get("max_batch_size"), pixel_values(size).dims)
        self.staging.allocate()  # pinned host memory on a CUDA instance, before serving
        sizes = warmup_batch_sizes(settings.warmup_batch_sizes, device, config.get("max_batch_size"))
        plan = warmup_plan(sizes, device, self.captioner.setting_limits, self.max_beam_tokens)
        for batches, beam, length in plan if settings.warmup else ():
            self.captioner.warmup(batch_sizes=batches, beam_size=beam, max_length=length)
        pb_utils.Logger.log_info(
            f"{self.model_name}: {settings.model_dir} on {device} ({dtype}), {torch.get_num_threads()} torch "
            f"threads, CUDA graphs {'on' if self.captioner.cuda_graphs else 'off'}, warm-up "
            f"{f'done: (batches, beam, length) {plan}' if settings.warmup else 'off'}"
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
        """A request's n-best lists as its ``caption``, ``score``, ``captions`` and ``scores`` tensors."""
        return [pb_utils.Tensor(name, array) for name, array in n_best_arrays(captions).items()]

    def _read(self, request):
        """The request's rows as ``((beam_size, max_length), (pixels, num_captions))``, or its error."""
        gone = cancelled(request)  # its client gave up: no engine work for it
        if gone is not None:
            return gone
        try:
            pixels = input_array(pb_utils, request, PIXEL_VALUES.name)
            rows = len(pixels)
            beams, lengths, wanted = (
                optional_int_rows(input_array(pb_utils, request, t.name, optional=True), rows, t.name)
                for t in (BEAM_SIZE, MAX_LENGTH, NUM_CAPTIONS)
            )
            wanted = request_num_captions(wanted)
            settings = generation_settings(self.captioner, beams, lengths, wanted, self.max_beam_tokens)
            return [(key, (row, n)) for (key, n), row in zip(settings, pixels, strict=True)]
        except Exception as exc:  # noqa: BLE001 - becomes this request's error response
            return exc

    def _generate(self, key, rows):
        """One engine call for all rows sharing the generation settings ``key``; each row keeps its n best."""
        beam_size, max_length = key
        batch = self.staging.stack([pixels for pixels, _ in rows])  # pinned on a CUDA instance
        if batch.dtype == torch.uint8:  # preprocess's resized RGB bytes: normalized where the model runs
            batch = self.captioner.normalize_pixels(batch)
            self.staging.sent()
        most = max(n for _, n in rows)
        try:
            lists = self.captioner.generate_n_best(batch, beam_size, max_length, num_captions=most)
        except Exception:
            self.health.failed()  # unloads the model when every batch fails (e.g. a poisoned CUDA context)
            raise
        self.health.succeeded()
        return [pad_captions(best, n) for best, (_, n) in zip(lists, rows, strict=True)]

    def finalize(self):
        """Release the engine (and CUDA memory where it used some)."""
        self.captioner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pb_utils.Logger.log_info(f"{self.model_name}: finalized")
