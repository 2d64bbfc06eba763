"""Where the engine's time goes, measured without the reference: a per-stage profile, the operator families of a
beam-search step, and the arithmetic floor (multiply-adds at this CPU's best measured rate).

``bench_engine.py`` reports these beside its engine-vs-reference ratios (``--no-profile`` skips them), so that a
target out of reach on a machine says so.
"""

from __future__ import annotations

from collections import Counter

from load_tests.tool import timed

#: The row of :func:`beam_op_profile` that counts every operator of a step.
OPERATORS_PER_STEP = "operators per step"

# Operator families of the beam-search profile (first match wins). The output projection is the matrix product
# with a vocabulary-sized operand; prepacked oneDNN linears are ``mkldnn::_linear_pointwise``.
_MATMULS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
_OP_FAMILIES = (
    ("output projection", _MATMULS, True),
    ("linear layers", _MATMULS, False),
    (
        "attention (bmm, softmax, sdpa)",
        ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu"),
        None,
    ),
    ("top-k", ("aten::topk",), None),
    ("log-softmax", ("aten::_log_softmax",), None),
    (
        "copies, gathers, index_select",
        ("aten::copy_", "aten::index_select", "aten::gather", "aten::cat"),
        None,
    ),
    ("host syncs (item, bool)", ("aten::_local_scalar_dense",), None),
)


def _best_of_two(fn) -> float:
    """The faster of two calls of ``fn``, in seconds."""
    return timed(fn, repeats=2)[1]


def stage_profile(engine, images: list[bytes], batch: int) -> dict:
    """Seconds per image of each stage of one call at ``batch`` (best of two, no profiler attached)."""
    import torch

    from ofa_captioning.beam_search import BeamSearchSettings, beam_search
    from ofa_captioning.images import load_image

    images = images[:batch]
    n = len(images)
    decoded = [load_image(data) for data in images]
    decode_s = _best_of_two(lambda: [load_image(data) for data in images])
    resize_s = _best_of_two(lambda: engine.preprocess(decoded))
    pixels = engine.preprocess(decoded).to(engine.dtype)
    model = engine.model
    tok, cfg = engine.tokenizer, engine.task_config
    settings = BeamSearchSettings(
        beam_size=cfg.beam_size,
        max_len_b=cfg.max_len_b,
        min_len=min(cfg.min_len, cfg.max_len_b),
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        len_penalty=cfg.len_penalty,
        bos_id=tok.bos_id,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
    )
    with torch.inference_mode():
        ids = engine._prompt_ids.unsqueeze(0).expand(n, -1)
        resnet_s = _best_of_two(lambda: model.encoder.embed_images(pixels))
        encoder_s = _best_of_two(lambda: model.encode(ids, pixels))
        enc = model.encode(ids, pixels)
        hyps = beam_search(model, enc, settings)
        search_s = _best_of_two(lambda: beam_search(model, enc, settings))
        steps = max(len(h.tokens) for hs in hyps for h in hs) if hyps else 0
        ops = beam_op_profile(model, enc, settings, steps)
    return {
        "batch_size": batch,
        "images": n,
        "decode_s_per_image": decode_s / n,
        "resize_normalize_s_per_image": resize_s / n,
        "resnet_s_per_image": resnet_s / n,
        "encoder_transformer_s_per_image": max(encoder_s - resnet_s, 0.0) / n,
        "beam_search_s_per_image": search_s / n,
        "decoder_steps": steps,
        "beam_search_ms_per_step": 1e3 * search_s / max(steps, 1),
        "beam_search_ops": ops,
    }


def beam_op_profile(model, enc, settings, steps: int, search=None) -> list[dict]:
    """One beam search under torch.profiler: self time and calls of each operator family per decoder step.

    Times are the profiler's (its overhead inflates small operators); the last rows are the time spent outside
    ATen operators (Python, dispatch) and the number of operators a step runs. ``search`` is the beam search
    profiled, called as ``search(model, enc, settings)`` (default: the engine's ``beam_search``; the
    decode-step comparison passes the baseline's).
    """
    from torch.profiler import ProfilerActivity, profile

    if search is None:
        from ofa_captioning.beam_search import beam_search as search

    per_step = max(steps, 1)
    vocab = model.config.vocab_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _, wall_s = timed(search, model, enc, settings)
    events = [
        e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith(("aten::", "mkldnn::"))
    ]

    def projects(e) -> bool:
        return any(shape[:1] == [vocab] for shape in e.input_shapes)

    rows, seen = [], set()
    for family, names, vocab_sized in _OP_FAMILIES:
        hit = [
            e
            for e in events
            if e.key in names and id(e) not in seen and (vocab_sized is None or projects(e) == vocab_sized)
        ]
        seen.update(id(e) for e in hit)
        rows.append(_op_row(family, hit, per_step))
    rows.append(_op_row("other operators", [e for e in events if id(e) not in seen], per_step))
    self_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    rows.append(
        {
            "family": "outside operators (Python, dispatch)",
            "ms_per_step": max(wall_s * 1e3 - self_ms, 0.0) / per_step,
            "calls_per_step": None,
        }
    )
    rows.append(
        {"family": OPERATORS_PER_STEP, "ms_per_step": None, "calls_per_step": _count(events) / per_step}
    )
    return rows


def operators_per_step(model, enc, settings, steps: int, search=None) -> float:
    """ATen operators a decoder step runs: :func:`beam_op_profile`'s count (one profiled beam search)."""
    rows = beam_op_profile(model, enc, settings, steps, search)
    return next(r["calls_per_step"] for r in rows if r["family"] == OPERATORS_PER_STEP)


def dispatched_operators(fn) -> Counter[str]:
    """The operators ``fn()`` dispatches from Python, by name (e.g. ``aten.add.Tensor``), counted under a
    ``TorchDispatchMode``: the calls that kernels make inside, which :func:`operators_per_step` also counts, are not
    seen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with _Recorder():
        fn()
    return counts


def dispatched_per_step(search, steps: int) -> float:
    """Operators a decoder step dispatches from Python (:func:`dispatched_operators` of one ``search()``): what a
    host-bound step pays its per-call overhead on."""
    return sum(dispatched_operators(search).values()) / max(steps, 1)


def _count(events) -> int:
    return sum(e.count for e in events)


def _op_row(family: str, events, steps: int) -> dict:
    return {
        "family": family,
        "ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
        "calls_per_step": _count(events) / steps,
    }


def gemm_peak(dtype: str) -> float:
    """This CPU's best measured multiply-add rate (GMAC/s) in ``dtype``: the faster of a 2048^3 matrix product and
    a 3x3, 256-channel channels-last convolution (oneDNN), best of five each. On a busy machine this is low."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    x = torch.randn(2, 256, 60, 60, dtype=dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dt).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a @ b, F.conv2d(x, w, padding=1)
        gemm = 2048**3 / timed(torch.matmul, a, b, repeats=5)[1]
        conv = 2 * 256 * 256 * 9 * 60 * 60 / timed(lambda: F.conv2d(x, w, padding=1), repeats=5)[1]
    return max(gemm, conv) / 1e9


def arithmetic(checkpoint, pixels) -> dict:
    """Multiply-adds per image of one call on ``pixels`` (all images, one batch): the ResNet, the encoder's
    layers and beam search, counted by ``torch.utils.flop_counter`` on the float32 model without derived
    weights (plain convolutions and linears; SDPA counted by its shapes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from ofa_captioning.beam_search import beam_search
    from ofa_captioning.captioner import Captioner

    engine = Captioner.from_pretrained(checkpoint)
    model = engine.model
    model.clear_caches()  # plain modules: every multiply goes through an operator the counter knows
    n = pixels.shape[0]
    ids = engine._prompt_ids.unsqueeze(0).expand(n, -1)
    settings = engine.search_settings(engine.default_beam_size, engine.default_max_length)

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}

    def count(fn) -> float:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            fn()
        return counter.get_total_flops() / 2 / n / 1e9  # GMAC per image

    with torch.inference_mode():
        model.encode(ids, pixels)  # position biases cached, as in steady state
        resnet = count(lambda: model.encoder.embed_images(pixels))
        encoder = count(lambda: model.encode(ids, pixels)) - resnet
        enc = model.encode(ids, pixels)
        search = count(lambda: beam_search(model, enc, settings))
    return {"resnet_gmac": resnet, "encoder_layers_gmac": encoder, "beam_search_gmac": search}
