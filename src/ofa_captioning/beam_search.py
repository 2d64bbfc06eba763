"""Batched beam search with the semantics of ModelScope's (fairseq-style) ``SequenceGenerator``.

Per step, for every sentence (image) not yet done, exactly as the reference:

1. log-softmax (float32) of the newest position's logits divided by ``temperature``; NaN -> -inf; pad banned;
   ``unk_penalty`` subtracted from ``<unk>``; EOS banned while ``step < min_len``; at ``step == max_len``
   everything but EOS is banned; no-repeat-ngram blocking over the whole prefix including its leading BOS;
2. candidates: at step 0 only beam 0, later cumulative score + log-prob over beam x vocabulary, top ``2*beam``;
3. finite EOS candidates among ranks ``0..beam-1`` are finalised with score ``cum / (step+1) ** len_penalty``
   (``cum`` itself without ``normalize_scores``), while the sentence has fewer than ``beam`` finished
   hypotheses; EOS in lower ranks is dropped;
4. a sentence is done when it has ``beam`` finished hypotheses or when ``step == max_len``; the search ends when
   every sentence is done;
5. the first ``beam`` non-EOS candidates in rank order continue.

The step has static shapes (:class:`BeamSearch`): a done sentence keeps its rows (masked: it finalises nothing
more) instead of leaving the batch, everything a step keeps lives in buffers allocated once, and the host reads
one boolean per step. That is what lets a GPU run the step without waiting on the host, and as a CUDA graph
(:mod:`ofa_captioning.cuda_graphs`).

The decoder runs incrementally (see :class:`ofa_captioning.model.DecoderState`); the reference recomputes the
whole prefix every step, which is the same maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import DecoderState, EncoderOutput, OFAModel

__all__ = [
    "BeamSearch",
    "BeamSearchSettings",
    "Hypothesis",
    "beam_search",
    "block_repeated_ngrams",
    "row_topk",
]

# Columns per block of :func:`row_topk`'s first pass.
TOPK_BLOCK = 64


@dataclass(frozen=True)
class BeamSearchSettings:
    """Generation settings; defaults are the reference's (configuration.json normally overrides them).

    ``max_len_b`` is the most tokens a hypothesis may have before its EOS: the reference's ``max_len``, i.e.
    ``int(max_len_a * source_length + max_len_b)`` already worked out (see ``TaskConfig.max_len``).
    """

    beam_size: int = 5
    max_len_b: int = 16
    min_len: int = 1
    no_repeat_ngram_size: int = 3
    len_penalty: float = 1.0
    bos_id: int = 0
    pad_id: int = 1
    eos_id: int = 2
    temperature: float = 1.0
    unk_penalty: float = 0.0
    unk_id: int = 3
    normalize_scores: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be greater than 0, got {self.temperature}")
        if self.max_len_b < 1:
            raise ValueError(f"max_len_b must be at least 1, got {self.max_len_b}")
        if self.min_len > self.max_len_b:
            raise ValueError(f"min_len ({self.min_len}) cannot be larger than max_len_b ({self.max_len_b})")


@dataclass(frozen=True)
class Hypothesis:
    """A finished hypothesis: ``tokens`` without the leading BOS, ending with EOS; its normalised ``score``."""

    tokens: tuple[int, ...]
    score: float


def block_repeated_ngrams(lprobs: Tensor, history: Tensor, n: int, pad_id: int) -> None:
    """Ban (set to -inf, in place) every token that would repeat an ``n``-gram of ``history``.

    ``history`` [R, step+1] holds each row's tokens so far (BOS first). For the last ``n-1`` tokens, every earlier
    occurrence of that (n-1)-gram bans the token that followed it. Rows without a match scatter onto ``pad_id``,
    which is always banned already.
    """
    length = history.shape[1]
    if n <= 0 or length < n:
        return
    if n == 1:
        lprobs.scatter_(1, history, -math.inf)
        return
    windows = history.unfold(1, n - 1, 1)  # [R, length-n+2, n-1]
    match = (windows[:, :-1] == windows[:, -1:]).all(dim=-1)  # earlier windows equal to the last one
    banned = history[:, n - 1 :].masked_fill(~match, pad_id)
    lprobs.scatter_(1, banned, -math.inf)


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores`` [R, V] and their column indices, best first.

    The same values as ``torch.topk(scores, k, dim=-1)`` (NaN ranks first as there), about 5x faster over a
    vocabulary-wide row: each row's maximum per block of ``TOPK_BLOCK`` columns, the ``k`` blocks with the
    largest maxima, then ``torch.topk`` over those blocks' columns only. The ``k`` largest entries always lie in
    those blocks: an entry in any other block is at most its block's maximum, below ``k`` larger block maxima,
    which are ``k`` distinct entries. Among equal values the indices returned may differ from ``torch.topk``'s,
    whose order of ties is unspecified too.
    """
    rows, width = scores.shape
    n_blocks = width // TOPK_BLOCK
    if n_blocks < 4 * k:
        return torch.topk(scores, k, dim=-1)
    body = scores[:, : n_blocks * TOPK_BLOCK].reshape(rows, n_blocks, TOPK_BLOCK)
    best = torch.topk(body.amax(dim=-1), k, dim=-1).indices  # [R, k] blocks
    cand = torch.gather(body, 1, best.unsqueeze(-1).expand(-1, -1, TOPK_BLOCK)).view(rows, -1)
    columns = best.unsqueeze(-1) * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=scores.device)
    columns = columns.view(rows, -1)
    if width > n_blocks * TOPK_BLOCK:  # the columns after the last whole block are always candidates
        tail = torch.arange(n_blocks * TOPK_BLOCK, width, device=scores.device)
        cand = torch.cat([cand, scores[:, n_blocks * TOPK_BLOCK :]], dim=1)
        columns = torch.cat([columns, tail.expand(rows, -1)], dim=1)
    values, pos = torch.topk(cand, k, dim=-1)
    return values, torch.gather(columns, 1, pos)


@torch.inference_mode()
def beam_search(
    model: OFAModel, encoder_out: EncoderOutput, settings: BeamSearchSettings, *, cuda_graphs: bool = False
) -> list[list[Hypothesis]]:
    """Beam search for every image of ``encoder_out``.

    Returns, per image, its finished hypotheses sorted by score (best first): ``beam_size`` of them in the
    reference's normal course. Where the reference would fail its ``step < max_len`` assertion (all of a
    sentence's beams at -inf, e.g. after non-finite logits) this returns what was finished, possibly nothing.

    Every step has the same shapes (images x beams rows; finished sentences are masked, not dropped) and reads one
    boolean back to the host: whether every sentence is done. With ``cuda_graphs`` on a CUDA device, each step runs
    as a CUDA graph captured once per (batch bucket, settings) (see :mod:`ofa_captioning.cuda_graphs`).
    """
    if cuda_graphs and encoder_out.last_hidden_state.device.type == "cuda":
        from .cuda_graphs import graphed_beam_search

        return graphed_beam_search(model, encoder_out, settings)
    search = BeamSearch(model, encoder_out, settings)
    search.run(search.step)
    return search.hypotheses()


class BeamSearch:
    """The buffers of one beam search, allocated once, and its step (:meth:`step`), which only writes into them.

    Persistent state (tokens, cumulative scores, the decoder's KV cache, finished hypotheses) lives in tensors of
    fixed shape: what a step reorders (tokens, KV cache) has two copies used in turn by step parity, so that step
    ``s`` always reads and writes the same storage (what CUDA graphs need). Finished hypotheses are kept on the
    device (``beam`` slots per image plus one that takes the rejected ones) and read back once, at the end.
    """

    def __init__(self, model: OFAModel, encoder_out: EncoderOutput, settings: BeamSearchSettings) -> None:
        enc = encoder_out.last_hidden_state
        device, batch = enc.device, enc.shape[0]
        beam, length = settings.beam_size, settings.max_len_b + 2
        self.model, self.settings, self.batch = model, settings, batch
        self.state = model.init_decoder_state(encoder_out, beam, max_positions=settings.max_len_b + 1)
        self.caches = (self.state.self_kv, torch.empty_like(self.state.self_kv))
        self.tokens = tuple(
            torch.empty((batch, beam, length), dtype=torch.long, device=device) for _ in range(2)
        )
        self.cum_scores = torch.empty((batch, beam), dtype=torch.float32, device=device)
        self.fin_tokens = torch.empty((batch, beam + 1, length), dtype=torch.long, device=device)
        self.fin_scores = torch.empty((batch, beam + 1), dtype=torch.float32, device=device)
        self.fin_steps = torch.empty((batch, beam + 1), dtype=torch.long, device=device)
        self.fin_count = torch.empty(batch, dtype=torch.long, device=device)
        self.done = torch.empty(batch, dtype=torch.bool, device=device)
        self.all_done = torch.empty((), dtype=torch.bool, device=device)
        # Constants of every step, made once: nothing inside a step is built on the host.
        self.ranks = torch.arange(2 * beam, device=device)
        self.first_rows = torch.arange(batch, device=device).unsqueeze(1)  # step 0: one row per image
        self.beam_rows = self.first_rows * beam
        self.bans = _bans(settings, device)
        self.topk = row_topk if device.type == "cpu" else torch.topk
        self.reset()

    def reset(self, encoder_out: EncoderOutput | None = None) -> None:
        """Start again (with ``encoder_out``'s images written into the state, same shapes)."""
        if encoder_out is not None:
            self.model.load_decoder_state(self.state, encoder_out)
        s = self.settings
        tokens = self.tokens[0]
        tokens.fill_(s.pad_id)
        tokens[:, :, 0] = s.bos_id
        self.cum_scores.zero_()
        self.fin_tokens.fill_(s.pad_id)
        self.fin_scores.fill_(-math.inf)
        self.fin_steps.zero_()
        self.fin_count.zero_()
        self.done.zero_()
        self.all_done.zero_()

    def run(self, step) -> None:
        """Run ``step(s)`` for s = 0, 1, ... until every sentence is done (one boolean read per step)."""
        for s in range(self.settings.max_len_b + 1):
            step(s)
            if s == self.settings.max_len_b or self.all_done.item():
                break

    def step(self, s: int) -> None:
        """Decoder step ``s``: log-probabilities with the reference's bans, the top candidates, finished
        hypotheses stored, survivors' tokens and cache rows reordered into the other copies."""
        st, beam = self.settings, self.settings.beam_size
        width = 1 if s == 0 else beam  # all beams of a sentence are identical at step 0: one row per image
        tokens = self.tokens[s % 2]
        state = self.state
        state.self_kv, state.length = self.caches[s % 2], s
        lprobs = _log_probs(self.model, state, tokens, s, width, st, self.bans)
        scores, beams, new_tokens, eos = self._candidates(lprobs, s, width)
        self._finalize(scores, beams, eos, tokens, s)
        if s < st.max_len_b:
            self._advance(scores, beams, new_tokens, eos, tokens, s, width)
        torch.all(self.done, out=self.all_done)

    def _candidates(self, lprobs: Tensor, s: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top ``2*beam`` of (cumulative score + log-prob) over beam x vocabulary per sentence, in two stages (the
        best k of each row, then the best k of those): scores, the beam each extends, the new token, finite EOS."""
        vocab, beam = lprobs.shape[-1], self.settings.beam_size
        k = min(2 * beam, width * vocab - 1)
        row_scores, row_tokens = self.topk(lprobs, min(k, vocab))
        # A row with a NaN log-probability has no finite one (NaN or +inf logits make log-softmax NaN or -inf
        # throughout) and NaN ranks first: its candidates become -inf, as the reference's NaN -> -inf makes them.
        row_scores = row_scores.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        row_scores = row_scores.view(self.batch, width, -1)
        if s > 0:
            row_scores = row_scores + self.cum_scores.unsqueeze(-1)
        scores, flat = torch.topk(row_scores.view(self.batch, -1), k)
        beams = torch.div(flat, row_tokens.shape[-1], rounding_mode="floor")
        new_tokens = torch.gather(row_tokens.view(self.batch, -1), 1, flat)
        return scores, beams, new_tokens, new_tokens.eq(self.settings.eos_id) & scores.ne(-math.inf)

    def _finalize(self, scores: Tensor, beams: Tensor, eos: Tensor, tokens: Tensor, s: int) -> None:
        """Store the finite EOS candidates among ranks ``0..beam-1`` of sentences not yet done, in rank order,
        while a sentence has fewer than ``beam`` (the rest go to the spare slot), scored ``cum / (s+1) **
        len_penalty`` (``cum`` without ``normalize_scores``); a sentence with ``beam`` of them is done."""
        st, beam = self.settings, self.settings.beam_size
        final = eos[:, :beam] & ~self.done.unsqueeze(1)
        slot = self.fin_count.unsqueeze(1) + final.cumsum(1) - 1
        accept = final & slot.lt(beam)
        slot = torch.where(accept, slot, beam)
        prefix = torch.gather(tokens, 1, beams[:, :beam].unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        self.fin_tokens.scatter_(1, slot.unsqueeze(-1).expand_as(prefix), prefix)
        norm = scores[:, :beam]
        if st.normalize_scores:
            norm = norm / float(s + 1) ** st.len_penalty
        self.fin_scores.scatter_(1, slot, norm)
        self.fin_steps.scatter_(1, slot, s)
        self.fin_count.add_(accept.sum(1))
        self.done.logical_or_(self.fin_count.eq(beam))

    def _advance(
        self,
        scores: Tensor,
        beams: Tensor,
        new_tokens: Tensor,
        eos: Tensor,
        tokens: Tensor,
        s: int,
        width: int,
    ) -> None:
        """The first ``beam`` candidates in rank order that are not (finite) EOS continue: their tokens and cache
        rows are gathered into the other copies, their cumulative scores into ``cum_scores``."""
        k, beam = scores.shape[1], self.settings.beam_size
        order = eos.long() * k + self.ranks[:k]
        survivors = torch.topk(order, beam, dim=1, largest=False).indices
        parent = torch.gather(beams, 1, survivors)
        torch.gather(scores, 1, survivors, out=self.cum_scores)
        nxt = self.tokens[(s + 1) % 2]
        torch.index_select(
            tokens.view(-1, tokens.shape[-1]),
            0,
            (self.beam_rows + parent).view(-1),
            out=nxt.view(-1, tokens.shape[-1]),
        )
        nxt[:, :, s + 1] = torch.gather(new_tokens, 1, survivors)
        rows = ((self.first_rows if width == 1 else self.beam_rows) + parent).view(-1)
        cur, spare = self.caches[s % 2], self.caches[(s + 1) % 2]
        torch.index_select(cur[..., : s + 1, :], 2, rows, out=spare[..., : s + 1, :])

    def hypotheses(self) -> list[list[Hypothesis]]:
        """The finished hypotheses of each image, best first (read back from the device at once)."""
        eos, beam = self.settings.eos_id, self.settings.beam_size
        counts, steps = self.fin_count.tolist(), self.fin_steps[:, :beam].tolist()
        scores, tokens = self.fin_scores[:, :beam].tolist(), self.fin_tokens[:, :beam].tolist()
        out = []
        for count, image_steps, image_scores, image_tokens in zip(counts, steps, scores, tokens, strict=True):
            hyps = [
                Hypothesis(tuple(image_tokens[j][1 : image_steps[j] + 1]) + (eos,), image_scores[j])
                for j in range(count)
            ]
            # Stable sort, best first; the reference's torch.sort leaves the order of equal scores unspecified.
            hyps.sort(key=lambda h: h.score, reverse=True)
            out.append(hyps)
        return out


def _bans(settings: BeamSearchSettings, device) -> tuple[Tensor, Tensor]:
    """The tokens every step bans (-inf) before ``min_len`` and after it, as index tensors: pad always, EOS before
    ``min_len`` (the reference's bans; ``max_len``'s all-but-EOS is :func:`_log_probs`'s own case)."""
    early = torch.tensor([settings.pad_id, settings.eos_id], device=device)
    return early, early[:1]


def _log_probs(
    model: OFAModel,
    state: DecoderState,
    tokens: Tensor,
    step: int,
    width: int,
    settings: BeamSearchSettings,
    bans: tuple[Tensor, Tensor],
) -> Tensor:
    """Decode the newest token of each row and return its next-token log-probabilities [S*width, V] (float32)
    with the reference's bans: EOS before ``min_len``, pad, ``unk_penalty``, all but EOS at ``max_len``, repeated
    n-grams. NaN stays (see :meth:`BeamSearch._candidates`)."""
    rows = tokens.shape[0] * width
    logits = model.decode_step(tokens[:, :width, step].reshape(-1), state).float()
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    lprobs = torch.log_softmax(logits, dim=-1)
    if step >= settings.max_len_b:  # only EOS may follow
        eos = lprobs[:, settings.eos_id].clone()
        lprobs.fill_(-math.inf)[:, settings.eos_id] = eos
        return lprobs
    lprobs.index_fill_(1, bans[0] if step < settings.min_len else bans[1], -math.inf)
    if settings.unk_penalty:
        lprobs[:, settings.unk_id] -= settings.unk_penalty
    if settings.no_repeat_ngram_size > 0:
        history = tokens[:, :width, : step + 1].reshape(rows, step + 1)
        block_repeated_ngrams(lprobs, history, settings.no_repeat_ngram_size, settings.pad_id)
    return lprobs
