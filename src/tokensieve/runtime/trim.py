"""Apply a pre-LLM method to a prepared batch: score each segment, gather, re-pad.

Every sample is scored independently; the kept sequences are re-padded on the side the
input was padded on, with a new attention mask, so the language model then runs on a
shorter but otherwise ordinary batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods.base import SegmentContext, Selection, Selector
from ..methods.encoder import budget_within
from ..methods.signals import frame_mean_attention
from ..models.base import Prepared, Segment
from .repad import mask_of, padding_side_of, repad, repad_positions

POSITION_MODES = ("preserve", "compact")


@dataclass
class SegmentStats:
    """What happened to one segment in the last compressed forward."""

    sample: int
    ordinal: int
    modality: str
    grid: tuple[int, int, int]
    tokens_before: int
    tokens_after: int
    structural: int
    frame_counts: list[int]
    score_ms: float
    temporal_patch: int = 1
    #: token frames the vision encoder saw (an encoder stage skipped the others); ``None``: all
    frames_encoded: list[int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "segment": self.ordinal,
            "modality": self.modality,
            "grid": list(self.grid),
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "structural_tokens": self.structural,
            "frame_counts": self.frame_counts,
            "raw_frames_per_token_frame": self.temporal_patch,
            "score_ms": round(self.score_ms, 4),
            "frames_encoded": self.frames_encoded,
        }


@dataclass
class TrimStats:
    """Statistics of the last compressed forward (``tokensieve.stats(model)``).

    ``segments[b]`` lists sample ``b``'s segments; ``keep[b]`` holds the original sequence
    positions that sample ``b`` kept (ascending, padding excluded); ``emitted[b]`` the same
    positions in the order the language model receives them (equal to ``keep[b]`` unless a
    method reorders its kept tokens, e.g. DyCoke's ``ttm_keep_order="similarity"``).
    """

    method: str
    retain: float
    positions: str
    segments: list[list[SegmentStats]]
    seq_before: list[int]
    seq_after: list[int]
    keep: list[torch.Tensor] = field(repr=False)
    total_ms: float = 0.0
    #: per sample, the kept positions in the order the language model receives them
    emitted: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: per sample, ``(positions [k], features [k, D])`` written over kept tokens by merging methods
    replaced: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list, repr=False)
    #: per sample, the sequence positions read as the question (methods that use text)
    question: list[torch.Tensor] | None = field(default=None, repr=False)
    encoder_signal: str = ""
    #: time the adapter spent computing encoder signals for the methods (ms; not in ``score_ms``)
    signal_ms: float = 0.0
    #: time spent choosing which frames the vision encoder sees (encoder stage; ms)
    plan_ms: float = 0.0
    #: token merging in the vision tower: tokens per frame (tile) after each merging block, last pass
    encoder_tokens: list[int] | None = None
    #: the video-feature cache so far (hits, misses, entries, MB), when one is on
    encoder_cache: dict[str, Any] | None = None
    #: in-LLM methods: per-layer visual counts and kept tokens (set when the prefill has run)
    inllm: Any = field(default=None, repr=False)
    #: (hidden, MLP width, key/value width, layers) of the language model, for FLOPs
    lm_shape: tuple[int, int, int, int] | None = None
    #: the pruned attention mask and position ids the language model received: continue a
    #: manual decoding loop after a compressed ``forward(use_cache=True)`` from these
    attention_mask: torch.Tensor | None = field(default=None, repr=False)
    position_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens_before(self) -> int:
        """Visual content tokens before compression, summed over the batch."""
        return sum(s.tokens_before for row in self.segments for s in row)

    @property
    def tokens_after(self) -> int:
        """Visual content tokens kept, summed over the batch (for in-LLM methods: those that
        reach the last decoder layer)."""
        if self.inllm is not None and self.inllm.v_out and self.inllm.v_out[0]:
            return sum(self.inllm.v_out[self._inllm_row(b)][-1] for b in range(len(self.segments)))
        return sum(s.tokens_after for row in self.segments for s in row)

    def _inllm_row(self, b: int) -> int:
        """The language-model row of sample ``b``: ``generate`` repeats each sample for beam
        search or several returned sequences (rows ``b·r … b·r + r − 1``, identical in the prefill)."""
        rows = len(self.inllm.v_out) if self.inllm is not None else len(self.segments)
        return b * max(1, rows // max(1, len(self.segments)))

    @property
    def score_ms(self) -> float:
        return sum(s.score_ms for row in self.segments for s in row)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "retain": self.retain,
            "positions": self.positions,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "score_ms": round(self.score_ms, 4),
            "trim_ms": round(self.total_ms, 4),
            "encoder_signal": self.encoder_signal or None,
            "signal_ms": round(self.signal_ms, 4),
            "plan_ms": round(self.plan_ms, 4),
            "encoder_tokens": self.encoder_tokens,
            "encoder_cache": self.encoder_cache,
            "question_tokens": [int(q.numel()) for q in self.question] if self.question is not None else None,
            "samples": [self._sample_dict(b) for b in range(len(self.segments))],
        }

    def equivalent_tokens(self, b: int) -> dict[str, float] | None:
        """In-LLM methods: E_out (the reference count: mean visual tokens leaving each layer,
        recycled ones included) and E_in (mean entering each layer) of sample ``b``."""
        if self.inllm is None:
            return None
        e_out, e_in = self.inllm.equivalent(self._inllm_row(b))
        return {"E_out": e_out, "E_in": e_in}

    def prefill_flops(self, b: int) -> dict[str, float] | None:
        """Analytical prefill FLOPs of sample ``b``'s language model, pruned and unpruned
        (``n·d·(2d + 2·d_kv) + 2n²d + 3ndm`` per layer, multiply-accumulates)."""
        if self.lm_shape is None:
            return None
        from ..methods.inllm import prefill_flops

        d, m, dkv, layers = self.lm_shape
        per_layer = self.inllm.seq_in[self._inllm_row(b)] if self.inllm is not None else [self.seq_after[b]] * layers
        return {"pruned": prefill_flops(per_layer, d, m, dkv),
                "unpruned": prefill_flops([self.seq_before[b]] * layers, d, m, dkv)}

    def _sample_dict(self, b: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sequence_before": self.seq_before[b],
            "sequence_after": self.seq_after[b],
            "segments": [s.as_dict() for s in self.segments[b]],
        }
        if self.inllm is not None:
            out["visual_per_layer_in"] = self.inllm.v_in[self._inllm_row(b)]
            out["visual_per_layer_out"] = self.inllm.v_out[self._inllm_row(b)]
            out["equivalent_tokens"] = self.equivalent_tokens(b)
        flops = self.prefill_flops(b)
        if flops is not None:
            out["prefill_flops"] = flops
        return out


@dataclass
class Trimmed:
    """The pruned batch. Shapes: embeds ``[B, L', D]``, mask ``[B, L']``, positions ``[B, L']`` or ``[3, B, L']``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor
    keep: list[torch.Tensor]
    padding_side: str
    stats: TrimStats
    input_ids: torch.Tensor


def _check_selection(sel: Selection, n: int, T: int, name: str) -> None:
    keep = sel.keep
    if keep.dim() != 1 or keep.dtype != torch.int64:
        raise RuntimeError(f"method {name!r} returned keep indices that are not a 1-D int64 tensor")
    if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= n or bool((keep[1:] <= keep[:-1]).any())):
        raise RuntimeError(f"method {name!r} returned keep indices that are not strictly ascending in [0, {n})")
    if sel.frame_counts.numel() != T or int(sel.frame_counts.sum()) != keep.numel():
        raise RuntimeError(f"method {name!r} returned frame counts inconsistent with its keep indices")
    if sel.features is not None and tuple(sel.features.shape[:1]) != (keep.numel(),):
        raise RuntimeError(f"method {name!r} returned {sel.features.shape[0]} features for {keep.numel()} tokens")
    if sel.order is not None and (
        sel.order.dim() != 1 or sel.order.dtype != torch.int64
        or not torch.equal(torch.sort(sel.order).values, torch.arange(keep.numel(), device=sel.order.device))
    ):
        raise RuntimeError(f"method {name!r} returned an order that is not a permutation of its {keep.numel()} kept tokens")


def select_segment(
    selector: Selector,
    x: torch.Tensor,
    retain: float,
    seg: Segment,
    text: torch.Tensor | None = None,
    want_attention: bool = False,
) -> tuple[Selection, float]:
    """Run the method on one segment ``x`` ``[T, M, D]``; returns the selection and its time in ms."""
    start = time.perf_counter()
    with torch.no_grad():
        attention = None
        if want_attention:
            attention = seg.encoder_attention if seg.encoder_attention is not None else frame_mean_attention(x)
        context = SegmentContext(
            modality=seg.modality, ordinal=seg.ordinal, grid=seg.grid, text=text, encoder_attention=attention,
            encoder_received=seg.encoder_received if want_attention else None,
        )
        sel = selector.select(x, retain, context)
    return sel, (time.perf_counter() - start) * 1000.0


def _select_encoded(
    selector: Selector, x: torch.Tensor, retain: float, seg: Segment, text: torch.Tensor | None,
    want_attention: bool, method_name: str,
) -> tuple[Selection, float]:
    """The method on the frames the vision encoder saw (``seg.encoded_frames``), keeping exactly
    ``round(r·T·M)`` of the segment's tokens among them, mapped back to the segment's indices.
    The other frames' tokens were never computed; none of them is kept."""
    T, M = seg.num_frames, seg.tokens_per_frame
    frames = seg.encoded_frames.to(x.device)
    n = frames.numel()
    sub = dataclasses.replace(
        seg, grid=(n, seg.grid[1], seg.grid[2]), positions=seg.positions.reshape(T, M)[frames.to(seg.positions.device)].reshape(-1),
        encoder_attention=None if seg.encoder_attention is None else seg.encoder_attention[frames],
        encoder_received=None if seg.encoder_received is None else seg.encoder_received[frames],
        encoded_frames=None,
    )
    if getattr(selector, "keeps_all", False):  # in-LLM methods: every encoded token enters the LLM
        inner_retain, want = 1.0, None
    else:
        want, inner_retain = budget_within(T, M, retain, n)
    sel, ms = select_segment(selector, x[frames], inner_retain, sub, text, want_attention)
    _check_selection(sel, n * M, n, method_name)
    if want is not None and sel.keep.numel() != want:
        raise RuntimeError(f"method {method_name!r} kept {sel.keep.numel()} of the encoded frames' tokens; "
                           f"the budget is {want}")
    keep = frames.to(sel.keep.device)[sel.keep // M] * M + sel.keep % M
    counts = torch.zeros(T, dtype=torch.int64)
    counts[frames.cpu()] = sel.frame_counts.cpu().to(torch.int64)
    weights = None
    if sel.frame_weights is not None:
        weights = torch.zeros(T, dtype=sel.frame_weights.dtype)
        weights[frames.cpu()] = sel.frame_weights.cpu()
    return Selection(keep=keep, frame_counts=counts, features=sel.features, frame_weights=weights, order=sel.order), ms


def trim(
    prepared: Prepared,
    selector: Selector,
    retain: float,
    positions: str,
    method_name: str,
    questions: list[torch.Tensor] | None = None,
    want_attention: bool = False,
    pad_id: int = 0,
) -> Trimmed:
    """Score every segment of every sample, keep the selected tokens, re-pad the batch.

    ``questions[b]`` (positions of sample ``b``'s question tokens) is given to methods that use
    text: their embeddings are passed as ``context.text``. ``want_attention`` passes each
    segment's encoder attention (or the frame-mean stand-in) as ``context.encoder_attention``.
    """
    start = time.perf_counter()
    embeds = prepared.inputs_embeds
    mask = prepared.attention_mask
    pos = prepared.position_ids
    mrope = prepared.style == "mrope"
    B, L, D = embeds.shape
    side = padding_side_of(mask)
    rows: list[torch.Tensor] = []  # per sample: its embeddings, merged features written in
    keeps: list[torch.Tensor] = []
    seg_stats: list[list[SegmentStats]] = []
    seq_before: list[int] = []
    replaced_all: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    emitted: list[torch.Tensor] = []  # per sample: kept positions in the order the LLM receives them
    reordered = False
    for b in range(B):
        valid = mask[b].bool()
        keep_mask = valid.clone()
        row = embeds[b]
        replaced: list[tuple[torch.Tensor, torch.Tensor]] = []
        orders: list[tuple[torch.Tensor, torch.Tensor]] = []
        stats_b: list[SegmentStats] = []
        text = row[questions[b]].detach() if questions is not None else None
        for seg in prepared.segments[b]:
            T, M = seg.num_frames, seg.tokens_per_frame
            x = row[seg.positions].reshape(T, M, D)
            if seg.encoded_frames is not None:
                sel, ms = _select_encoded(selector, x, retain, seg, text, want_attention, method_name)
            else:
                sel, ms = select_segment(selector, x, retain, seg, text, want_attention)
            _check_selection(sel, T * M, T, method_name)
            keep_mask[seg.positions] = False
            kept_pos = seg.positions[sel.keep.to(seg.positions.device)]
            keep_mask[kept_pos] = True
            if sel.features is not None:
                replaced.append((kept_pos, sel.features))
            if sel.order is not None and not torch.equal(sel.order.cpu(), torch.arange(sel.order.numel())):
                orders.append((kept_pos, sel.order.to(kept_pos.device)))
            stats_b.append(
                SegmentStats(
                    sample=b,
                    ordinal=seg.ordinal,
                    modality=seg.modality,
                    grid=seg.grid,
                    tokens_before=T * M,
                    tokens_after=int(sel.keep.numel()),
                    structural=int(seg.structural.numel()),
                    frame_counts=[int(c) for c in sel.frame_counts.tolist()],
                    score_ms=ms,
                    temporal_patch=seg.temporal_patch,
                    frames_encoded=None if seg.encoded_frames is None else [int(t) for t in seg.encoded_frames],
                )
            )
        if replaced:
            row = row.clone()
            for kept_pos, feats in replaced:
                row[kept_pos] = feats.to(row.dtype)
        replaced_all.append(replaced)
        keep = keep_mask.nonzero(as_tuple=True)[0]
        keeps.append(keep)
        order_b = keep
        if orders:  # a segment's kept tokens take its slots in the method's order
            reordered = True
            order_b = keep.clone()
            for kept_pos, perm in orders:
                order_b[torch.searchsorted(keep, kept_pos)] = kept_pos[perm]
        emitted.append(order_b)
        rows.append(row)
        seg_stats.append(stats_b)
        seq_before.append(int(valid.sum()))

    lengths = [int(k.numel()) for k in keeps]
    identity = (
        lengths == seq_before
        and not any(replaced_all)
        and not reordered
        and (positions == "preserve" or not mrope)
    )

    def make_stats(new_mask: torch.Tensor, new_pos: torch.Tensor) -> TrimStats:
        return TrimStats(method=method_name, retain=retain, positions=positions, segments=seg_stats,
                         seq_before=seq_before, seq_after=lengths, keep=keeps, emitted=emitted,
                         total_ms=(time.perf_counter() - start) * 1000.0, replaced=replaced_all,
                         question=questions, encoder_signal=prepared.encoder_signal, signal_ms=prepared.signal_ms,
                         plan_ms=prepared.plan_ms,
                         attention_mask=new_mask, position_ids=new_pos)

    if identity:  # nothing removed (e.g. in-LLM methods decide later): no copy of the inputs
        deltas = (pos.amax(dim=(0, 2)) if mrope else pos.amax(dim=1)).reshape(B, 1).long() + 1
        deltas = deltas - torch.tensor(lengths, device=pos.device).reshape(B, 1)
        return Trimmed(embeds, mask, pos, deltas, keeps, side, make_stats(mask, pos), prepared.input_ids)
    new_embeds = repad([rows[b][keep] for b, keep in enumerate(emitted)], side)
    new_ids = repad([prepared.input_ids[b, keep] for b, keep in enumerate(emitted)], side, pad_id)
    new_mask = mask_of(lengths, side, mask)
    row_pos = []
    deltas = torch.zeros(B, 1, dtype=torch.long, device=pos.device)
    for b, (n, keep) in enumerate(zip(lengths, emitted)):
        if positions == "preserve":
            rp = pos[:, b, keep] if mrope else pos[b, keep]
        else:
            rp = torch.arange(n, device=pos.device, dtype=pos.dtype)
            rp = rp.expand(3, -1) if mrope else rp
        row_pos.append(rp)
        if n:
            deltas[b, 0] = int(rp.max()) + 1 - n
    new_pos = repad_positions(row_pos, side)
    stats = make_stats(new_mask, new_pos)
    return Trimmed(new_embeds, new_mask, new_pos, deltas, keeps, side, stats, new_ids)
