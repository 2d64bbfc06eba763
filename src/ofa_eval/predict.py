"""Where captions come from: a served model (gRPC or HTTP, through :class:`client.CaptionClient`) or the
in-process engine (:class:`ofa_captioning.Captioner`).

A predictor turns samples into ``(sample, Caption)`` pairs in order and raises :class:`PredictionError` on the
first image that fails: a score over part of the set would not be comparable with anything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dataset import Sample

DEMO_STAMP = ".demo-checkpoint.json"  # ofa_captioning.demo_checkpoint.STAMP, without importing torch

__all__ = ["EnginePredictor", "Prediction", "PredictionError", "ServedPredictor"]


class PredictionError(RuntimeError):
    """An image could not be captioned (server unreachable or refusing, engine failure)."""


@dataclass(frozen=True)
class Prediction:
    """One image's caption and beam-search score."""

    sample: Sample
    caption: str
    score: float


class ServedPredictor:
    """Captions from a served model through :class:`client.CaptionClient`, ``concurrency`` requests in flight.

    ``api_key`` (default: ``$CAPTION_API_KEY`` or the file ``$CAPTION_API_KEY_FILE``, as in the client), ``tls``,
    ``ca_cert``, ``client_cert`` and ``client_key`` go to :class:`client.CaptionClient` as they are.
    """

    def __init__(
        self,
        url: str | None,
        protocol: str | None = None,
        *,
        model: str = "caption",
        concurrency: int = 8,
        beam_size: int | None = None,
        max_length: int | None = None,
        timeout: float = 300.0,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        from client import CaptionClient

        if concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        self.client = CaptionClient(
            url,
            protocol,
            model=model,
            timeout=timeout,
            api_key=api_key,
            tls=tls,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
        )
        self.concurrency = concurrency
        self.beam_size = beam_size
        self.max_length = max_length

    def describe(self) -> dict[str, Any]:
        """What identifies these captions (stored in the results; a resumed run must match it)."""
        return {
            "kind": "served",
            "url": f"{self.client.protocol}://{self.client.address}",
            "model": self.client.model,
            "beam_size": self.beam_size,
            "max_length": self.max_length,
        }

    def check(self) -> None:
        """Fail early and clearly when the server is unreachable or the model is not ready."""
        where = f"{self.client.protocol}://{self.client.address}"
        health = self.client.health(models=(self.client.model,))
        if not health["live"]:
            raise PredictionError(f"cannot reach the server at {where} (is it running? `make serve`)")
        if not health[f"model:{self.client.model}"]:
            raise PredictionError(f"the server at {where} has no ready model {self.client.model!r}")

    def predict(self, samples: Sequence[Sample]) -> Iterator[Prediction]:
        """``Prediction`` per sample, in order; the first failed image raises :class:`PredictionError`.

        ``concurrency`` requests run at a time and at most as many more wait their turn; when the caller stops
        (an error, Ctrl-C) the waiting ones are dropped and only those already sent finish.
        """

        def caption(sample: Sample):
            return self.client.caption(sample.path, beam_size=self.beam_size, max_length=self.max_length)

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="eval")
        pending: deque = deque()
        remaining = iter(samples)

        def submit_next() -> None:
            sample = next(remaining, None)
            if sample is not None:
                pending.append((sample, pool.submit(caption, sample)))

        try:
            for _ in range(2 * self.concurrency):
                submit_next()
            while pending:
                sample, future = pending.popleft()
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - the client's CaptionError, or anything else, named
                    kind = type(exc).__name__
                    raise PredictionError(f"{sample.path} (image {sample.image_id}): {kind}: {exc}") from exc
                submit_next()
                yield Prediction(sample, result.text, result.score)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.close()


class EnginePredictor:
    """Captions from the engine in this process, ``batch_size`` images per engine batch."""

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        beam_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        from ofa_captioning import Captioner

        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if not Path(checkpoint).is_dir():
            raise PredictionError(f"{checkpoint}: no such checkpoint directory")
        self.checkpoint = str(checkpoint)
        self.captioner = Captioner.from_pretrained(checkpoint, device=device, dtype=dtype)
        self.beam_size, self.max_length = self.captioner.validate_settings(beam_size, max_length)
        self.batch_size = batch_size

    def describe(self) -> dict[str, Any]:
        """What identifies these captions (stored in the results; a resumed run must match it)."""
        return {
            "kind": "engine",
            "checkpoint": str(Path(self.checkpoint).resolve()),
            "device": str(self.captioner.device),
            "dtype": str(self.captioner.dtype).removeprefix("torch."),
            "beam_size": self.beam_size,
            "max_length": self.max_length,
            # The demo checkpoint (random weights) leaves this stamp; its scores mean nothing.
            "demo_checkpoint": (Path(self.checkpoint) / DEMO_STAMP).is_file(),
        }

    def check(self) -> None:
        """Nothing to check beyond loading (done in the constructor)."""

    def predict(self, samples: Sequence[Sample]) -> Iterator[Prediction]:
        """``Prediction`` per sample, in order; an image the engine refuses raises :class:`PredictionError`."""
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            try:
                captions = self.captioner.caption(
                    [s.path.read_bytes() for s in batch], beam_size=self.beam_size, max_length=self.max_length
                )
            except (OSError, ValueError) as exc:
                names = ", ".join(str(s.path) for s in batch)
                raise PredictionError(f"engine failed on a batch of {names}: {exc}") from exc
            for sample, caption in zip(batch, captions, strict=True):
                yield Prediction(sample, caption.text, caption.score)

    def close(self) -> None:
        """Nothing to release."""
