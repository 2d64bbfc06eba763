"""The beam search's decoder steps as CUDA graphs: one graph per step, per (batch bucket, settings, layout).

A CUDA graph replays a step's kernels with one launch and no Python in between, which a host-bound decode loop
(hundreds of small kernels per step) needs on a GPU. It can replay only what reads and writes the same addresses
every time: :class:`~ofa_captioning.beam_search.BeamSearch` keeps every persistent tensor of a search in buffers of
fixed shape, uses its two copies of what a step reorders by step parity, and reads one boolean per step back to
the host. So a search's step ``s`` is captured once and replayed by every later search of the same key:

* the batch is padded to a bucket (:data:`BATCH_BUCKETS`) by repeating its last image, whose results are
  dropped, so that a served model with dynamic batching meets a handful of shapes, not one per batch size;
* the first search of a key runs eagerly (lazy initialisation: cuBLAS handles, cached position biases), then the
  same search runs again captured, each step captured and then replayed; later searches only replay;
* at most :data:`MAX_SEARCHES` keys are kept per model (least recently used dropped, with their buffers).

Off by default (``Captioner.from_pretrained(..., cuda_graphs=True)``, serving setting ``OFA_CUDA_GRAPHS``): it
has not been measured on a GPU yet. The graphs are captured into one memory pool per model; that is safe because
no graph's output outlives its step (everything persistent lives in the search's own buffers).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from .beam_search import BeamSearch, BeamSearchSettings, Hypothesis
from .model import EncoderOutput, OFAModel

__all__ = [
    "BATCH_BUCKETS",
    "MAX_SEARCHES",
    "CudaGraphs",
    "GraphedSearch",
    "batch_bucket",
    "forget",
    "graphed_beam_search",
]

#: Batch sizes a graphed search is captured for; a batch runs in the smallest bucket that holds it (larger
#: batches in a bucket of their own size).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Captured searches kept per model.
MAX_SEARCHES = 16

_searches: weakref.WeakKeyDictionary[OFAModel, OrderedDict] = weakref.WeakKeyDictionary()
_graphs: weakref.WeakKeyDictionary[OFAModel, CudaGraphs] = weakref.WeakKeyDictionary()


def batch_bucket(batch: int) -> int:
    """The batch size a search of ``batch`` images runs at: the smallest bucket that holds it."""
    return next((b for b in BATCH_BUCKETS if b >= batch), batch)


class CudaGraphs:
    """Captures and replays CUDA graphs into one memory pool (one per model)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Callable[[], None]):
        """A graph of what ``step`` launches (captured, not run: :meth:`replay` runs it)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph

    @staticmethod
    def replay(graph) -> None:
        graph.replay()


class GraphedSearch:
    """A :class:`BeamSearch` whose steps are captured once and replayed (see the module's docstring).

    ``graphs`` captures and replays (:class:`CudaGraphs`; a test without a GPU passes a stand-in that records the
    step and runs it at replay).
    """

    def __init__(
        self, model: OFAModel, encoder_out: EncoderOutput, settings: BeamSearchSettings, graphs: CudaGraphs
    ) -> None:
        self.search = BeamSearch(model, encoder_out, settings)
        self.graphs = graphs
        self.captured: dict[int, object] = {}
        self._kept: list[list[torch.Tensor]] = []

    def __call__(self, encoder_out: EncoderOutput) -> list[list[Hypothesis]]:
        """Beam search over ``encoder_out`` (exactly the batch size this search was made for)."""
        search = self.search
        search.reset(encoder_out)
        if not self.captured:  # first use: run eagerly (lazy initialisation), then again capturing each step
            search.run(search.step)
            search.reset(encoder_out)
        search.run(self._replay)
        return search.hypotheses()

    def _replay(self, step: int) -> None:
        graph = self.captured.get(step)
        if graph is None:
            # The decoder's cached position biases a captured step reads are kept alive with its graph (the cache
            # itself may move on to another length).
            kv = self.search.state.self_kv
            self._kept.append(self.search.model.decoder.self_biases(kv.shape[-2], kv.device, kv.dtype))
            graph = self.captured[step] = self.graphs.capture(lambda: self.search.step(step))
        self.graphs.replay(graph)


def graphed_beam_search(
    model: OFAModel,
    encoder_out: EncoderOutput,
    settings: BeamSearchSettings,
    graphs: CudaGraphs | None = None,
) -> list[list[Hypothesis]]:
    """:func:`~ofa_captioning.beam_search.beam_search` with its steps as CUDA graphs: the batch padded to its
    bucket, the search of that (bucket, settings, encoder layout) captured on first use, replayed after.
    ``graphs`` defaults to the model's own :class:`CudaGraphs`."""
    enc = encoder_out.last_hidden_state
    batch = enc.shape[0]
    bucket = batch_bucket(batch)
    if bucket > batch:  # the last image repeated: its extra searches are dropped
        index = torch.arange(bucket, device=enc.device).clamp_(max=batch - 1)
        encoder_out = encoder_out.select(index)
    key = (bucket, settings, encoder_out.key, encoder_out.has_pads, enc.dtype, enc.device)
    searches = _searches.setdefault(model, OrderedDict())
    graphed = searches.get(key)
    if graphed is None:
        if graphs is None:
            graphs = _graphs.get(model)
            if graphs is None:
                graphs = _graphs[model] = CudaGraphs()
        graphed = searches[key] = GraphedSearch(model, encoder_out, settings, graphs)
        while len(searches) > MAX_SEARCHES:
            searches.popitem(last=False)
    searches.move_to_end(key)
    return graphed(encoder_out)[:batch]


def forget(model: OFAModel) -> None:
    """Drop every captured search of ``model`` (its weights changed, or to free their memory)."""
    _searches.pop(model, None)
    _graphs.pop(model, None)
