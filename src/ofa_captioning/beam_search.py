"""Batched beam search with the semantics of ModelScope's (fairseq-style) ``SequenceGenerator``.

Per step, for every live sentence (image), exactly as the reference:

1. log-softmax (float32) of the newest position's logits divided by ``temperature``; EOS banned while
   ``step < min_len``; NaN -> -inf; pad banned; ``unk_penalty`` subtracted from ``<unk>``; at ``step == max_len``
   everything but EOS is banned; no-repeat-ngram blocking over the whole prefix including its leading BOS;
2. candidates: at step 0 only beam 0, later cumulative score + log-prob over beam x vocabulary, top ``2*beam``;
3. finite EOS candidates among ranks ``0..beam-1`` are finalised with score ``cum / (step+1) ** len_penalty``
   (``cum`` itself without ``normalize_scores``), while the sentence has fewer than ``beam`` finished
   hypotheses; EOS in lower ranks is dropped;
4. a sentence is done when it has ``beam`` finished hypotheses or when ``step == max_len``; done sentences leave
   the batch, so their images stop costing compute;
5. the first ``beam`` non-EOS candidates in rank order continue.

The decoder runs incrementally (see :class:`ofa_captioning.model.DecoderState`); the reference recomputes the
whole prefix every step, which is the same maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import DecoderState, EncoderOutput, OFAModel

__all__ = ["BeamSearchSettings", "Hypothesis", "beam_search", "block_repeated_ngrams", "row_topk"]

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
    """
    beam, max_len = settings.beam_size, settings.max_len_b
    bsz = encoder_out.last_hidden_state.shape[0]
    device = encoder_out.last_hidden_state.device
    # All beams of a sentence are identical at step 0, so the state starts with one row per image and the
    # first reorder fans it out to `beam` rows.
    state = model.init_decoder_state(encoder_out, 1, max_positions=max_len + 1)

    tokens = torch.full((bsz, beam, max_len + 2), settings.pad_id, dtype=torch.long, device=device)
    tokens[:, :, 0] = settings.bos_id
    cum_scores = torch.zeros(bsz, beam, dtype=torch.float32, device=device)
    finalized: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    active = list(range(bsz))  # original image index of each live sentence

    for step in range(max_len + 1):
        width = 1 if step == 0 else beam  # decoder rows per sentence
        lprobs = _step_log_probs(model, state, tokens, step, width, settings)
        cand = _candidates(lprobs, cum_scores, step, width, beam, settings.eos_id)
        done_rows = _finalize(cand, tokens, step, active, finalized, settings)
        if len(done_rows) == len(active) or step == max_len:
            break
        keep = None
        if done_rows:  # finished sentences leave the batch
            done = set(done_rows)
            keep_rows = [r for r in range(len(active)) if r not in done]
            keep = torch.tensor(keep_rows, dtype=torch.long, device=device)
            active = [active[r] for r in keep_rows]
            cand, tokens = cand.select(keep), tokens[keep]
        tokens, cum_scores, rows = _advance(cand, tokens, step, width, beam, keep)
        state.reorder(rows, keep)

    for hyps in finalized:
        # Stable sort, best first; the reference's torch.sort leaves the order of equal scores unspecified.
        hyps.sort(key=lambda h: h.score, reverse=True)
    return finalized


@dataclass(frozen=True)
class _Candidates:
    """The top ``k`` continuations of each live sentence by cumulative score, best first (each [S, k])."""

    scores: Tensor  # cumulative score with the new token
    beams: Tensor  # the beam (row within the sentence) each one extends
    tokens: Tensor  # the new token
    eos: Tensor  # bool: the new token is EOS with a finite score

    def select(self, keep: Tensor) -> _Candidates:
        """The candidates of the sentences at ``keep``."""
        return _Candidates(self.scores[keep], self.beams[keep], self.tokens[keep], self.eos[keep])


def _step_log_probs(
    model: OFAModel, state: DecoderState, tokens: Tensor, step: int, width: int, settings: BeamSearchSettings
) -> Tensor:
    """Decode the newest token of each row and return its next-token log-probabilities [S*width, V] with the
    reference's bans: EOS before ``min_len``, pad, ``unk_penalty``, all but EOS at ``max_len``, repeated n-grams."""
    n_live = tokens.shape[0]
    eos, pad, neg_inf = settings.eos_id, settings.pad_id, -math.inf
    logits = model.decode_step(tokens[:, :width, step].reshape(-1), state).float()
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    lprobs = torch.log_softmax(logits, dim=-1)
    if step < settings.min_len:
        lprobs[:, eos] = neg_inf
    lprobs[:, pad] = neg_inf
    if settings.unk_penalty:
        lprobs[:, settings.unk_id] -= settings.unk_penalty
    if step >= settings.max_len_b:
        lprobs[:, :eos] = neg_inf
        lprobs[:, eos + 1 :] = neg_inf
    if settings.no_repeat_ngram_size > 0:
        history = tokens[:, :width, : step + 1].reshape(n_live * width, step + 1)
        block_repeated_ngrams(lprobs, history, settings.no_repeat_ngram_size, pad)
    return lprobs


def _candidates(
    lprobs: Tensor, cum_scores: Tensor, step: int, width: int, beam: int, eos: int
) -> _Candidates:
    """Top ``2*beam`` of (cumulative score + log-prob) over beam x vocabulary per sentence, in two stages: the
    best k of each beam row, then the best k of those (the same values as one top-k over the flattened scores).
    NaN log-probabilities count as -inf, as in the reference."""
    n_live, vocab = lprobs.shape[0] // width, lprobs.shape[-1]
    k = min(2 * beam, width * vocab - 1)
    row_scores, row_tokens = row_topk(lprobs, min(k, vocab))
    if bool(torch.isnan(row_scores).any()):  # NaN ranks first in topk; the reference makes it -inf
        lprobs.masked_fill_(torch.isnan(lprobs), -math.inf)
        row_scores, row_tokens = row_topk(lprobs, min(k, vocab))
    row_scores = row_scores.view(n_live, width, -1)
    if step > 0:
        row_scores = row_scores + cum_scores.unsqueeze(-1)
    scores, flat = torch.topk(row_scores.view(n_live, -1), k)
    beams = torch.div(flat, row_tokens.shape[-1], rounding_mode="floor")
    tokens = torch.gather(row_tokens.view(n_live, -1), 1, flat)
    return _Candidates(scores, beams, tokens, tokens.eq(eos) & scores.ne(-math.inf))


def _finalize(
    cand: _Candidates,
    tokens: Tensor,
    step: int,
    active: list[int],
    finalized: list[list[Hypothesis]],
    settings: BeamSearchSettings,
) -> list[int]:
    """Finish the finite EOS candidates among ranks ``0..beam-1`` (while their sentence has fewer than ``beam``
    finished hypotheses), scored ``cum / (step+1) ** len_penalty`` (``cum`` without ``normalize_scores``); EOS in
    lower ranks is dropped. Returns the live rows whose sentence is done (``beam`` finished, or the last step)."""
    beam = settings.beam_size
    final_mask = cand.eos[:, :beam]
    if not bool(final_mask.any()):
        return []
    rows_ranks = final_mask.nonzero().tolist()  # sentence-major, then rank: the reference's order
    norm = cand.scores[:, :beam]
    if settings.normalize_scores:
        norm = norm / float(step + 1) ** settings.len_penalty
    norm = norm.tolist()
    parents = cand.beams[:, :beam].tolist()
    prefixes = tokens[:, :, 1 : step + 1].tolist()
    touched: list[int] = []
    for row, rank in rows_ranks:
        sent = active[row]
        if len(finalized[sent]) < beam:
            hyp = tuple(prefixes[row][parents[row][rank]]) + (settings.eos_id,)
            finalized[sent].append(Hypothesis(hyp, norm[row][rank]))
        if not touched or touched[-1] != row:
            touched.append(row)
    return [r for r in touched if len(finalized[active[r]]) == beam or step == settings.max_len_b]


def _advance(
    cand: _Candidates, tokens: Tensor, step: int, width: int, beam: int, keep: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``beam`` candidates in rank order that are not (finite) EOS continue: their token sequences
    [S, beam, L] and cumulative scores [S, beam], and the decoder-state row of each one's parent (in the layout
    before ``keep`` dropped finished sentences)."""
    k = cand.scores.shape[1]
    order = cand.eos.long() * k + torch.arange(k, device=tokens.device)
    survivors = torch.topk(order, beam, dim=1, largest=False).indices
    parent = torch.gather(cand.beams, 1, survivors)
    tokens = torch.gather(tokens, 1, parent.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # a new tensor
    tokens[:, :, step + 1] = torch.gather(cand.tokens, 1, survivors)
    cum_scores = torch.gather(cand.scores, 1, survivors)
    old_sent = keep if keep is not None else torch.arange(tokens.shape[0], device=tokens.device)
    rows = (old_sent.unsqueeze(1) * width + parent).reshape(-1)
    return tokens, cum_scores, rows
