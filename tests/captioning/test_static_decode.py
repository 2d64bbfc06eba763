"""The static-shape decode loop: what a step does not do (read the device, build tensors on the host), and its
steps as graphs (captured once per key, replayed after) giving the eager loop's results."""

from __future__ import annotations

import inspect

import pytest
import torch

from load_tests.engine_profile import dispatched_operators
from load_tests.testkit.parity import assert_same_results
from ofa_captioning import cuda_graphs
from ofa_captioning.beam_search import BeamSearch, beam_search
from ofa_captioning.captioner import Captioner

# Operators that read a device value back to the host (item, bool) or make a tensor from host data. ``tolist``
# reads without dispatching an operator: the step's source is checked for it instead.
HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default"}
HOST_BUILT = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten._to_copy.default"}


@pytest.fixture(scope="module")
def engine(demo_checkpoint) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def encoded(engine, image_corpus):
    """Encoder output of 3 corpus images and the default search settings."""
    pixels = engine.preprocess([data for _, data in image_corpus[:3]])
    with torch.inference_mode():
        ids = engine._prompt_ids.unsqueeze(0).expand(3, -1)
        enc = engine.model.encode(ids, pixels)
    return enc, engine.search_settings(engine.default_beam_size, engine.default_max_length)


def test_a_step_neither_reads_the_device_nor_builds_host_tensors(engine, encoded):
    """Inside a step: no device-to-host read and no tensor made from host data; the loop reads one boolean per
    step (whether every sentence is done), none at the last step."""
    enc, settings = encoded
    with torch.inference_mode():
        search = BeamSearch(engine.model, enc, settings)
        steps = [dispatched_operators(lambda s=s: search.step(s)) for s in range(settings.max_len_b + 1)]
        search.reset(enc)
        whole = dispatched_operators(lambda: search.run(search.step))
    assert len(steps) == settings.max_len_b + 1
    for s, ops in enumerate(steps):
        assert sum(ops.values()) > 100, s  # the step ran the decoder
        assert not (set(ops) & (HOST_READS | HOST_BUILT)), (s, set(ops) & (HOST_READS | HOST_BUILT))
    reads = sum(whole[name] for name in HOST_READS)
    assert 1 <= reads <= settings.max_len_b, reads
    for method in (BeamSearch.step, BeamSearch._candidates, BeamSearch._finalize, BeamSearch._advance):
        source = inspect.getsource(method)
        assert ".tolist(" not in source and "bool(" not in source and ".item(" not in source, method


class _RecordedGraphs:
    """A stand-in for :class:`cuda_graphs.CudaGraphs` on a CPU: capturing records the step (without running it, as
    a CUDA capture launches nothing) and replaying runs it."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, step):
        self.captures += 1
        return step

    def replay(self, graph) -> None:
        self.replays += 1
        graph()


def test_graphed_search_equals_the_eager_loop(engine, encoded):
    """Padded to its bucket (3 -> 4 images), captured once per step on first use, replayed after: the same
    hypotheses as the eager loop, twice, and for a batch of another bucket."""
    enc, settings = encoded
    model = engine.model
    graphs = _RecordedGraphs()
    cuda_graphs.forget(model)
    try:
        with torch.inference_mode():
            want = beam_search(model, enc, settings)
            first = cuda_graphs.graphed_beam_search(model, enc, settings, graphs)
            captured = graphs.captures
            second = cuda_graphs.graphed_beam_search(model, enc, settings, graphs)
            one = enc.select(torch.tensor([1]))
            alone = cuda_graphs.graphed_beam_search(model, one, settings, graphs)
            alone_want = beam_search(model, one, settings)
    finally:
        cuda_graphs.forget(model)
    assert len(first) == 3
    assert_same_results(first, want)
    assert_same_results(second, want)
    assert_same_results(alone, alone_want)
    steps = max(len(h.tokens) for hyps in want for h in hyps)
    assert captured == steps  # each step of the first search captured once
    assert graphs.captures == captured + steps  # the second search captured nothing; the 1-image bucket did
    assert graphs.replays == 3 * steps


def test_searches_are_kept_per_bucket_and_evicted_oldest_first(engine, encoded, monkeypatch):
    enc, settings = encoded
    model = engine.model
    monkeypatch.setattr(cuda_graphs, "MAX_SEARCHES", 2)
    cuda_graphs.forget(model)
    short = [settings.__class__(**{**settings.__dict__, "max_len_b": n}) for n in (2, 3, 4)]
    try:
        with torch.inference_mode():
            for s in short:
                cuda_graphs.graphed_beam_search(model, enc, s, _RecordedGraphs())
        kept = [key[1].max_len_b for key in cuda_graphs._searches[model]]
    finally:
        cuda_graphs.forget(model)
    assert kept == [3, 4]


@pytest.mark.parametrize(("batch", "bucket"), [(1, 1), (3, 4), (8, 8), (9, 16), (64, 64), (200, 200)])
def test_batch_bucket(batch, bucket):
    assert cuda_graphs.batch_bucket(batch) == bucket


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graphs_equal_eager_on_cuda(demo_checkpoint, image_corpus, dtype):
    """On a GPU: the captured steps give the eager loop's captions and scores (same kernels, replayed)."""
    engine = Captioner.from_pretrained(demo_checkpoint, device="cuda", dtype=dtype)
    pixels = engine.preprocess([data for _, data in image_corpus[:3]])
    with torch.inference_mode():
        ids = engine._prompt_ids.unsqueeze(0).expand(3, -1)
        enc = engine.model.encode(ids, pixels.to("cuda", getattr(torch, dtype)))
        settings = engine.search_settings(engine.default_beam_size, engine.default_max_length)
        want = beam_search(engine.model, enc, settings)
        got = [beam_search(engine.model, enc, settings, cuda_graphs=True) for _ in range(3)]
    for result in got:
        assert_same_results(result, want)
