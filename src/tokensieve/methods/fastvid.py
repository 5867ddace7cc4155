"""FastVID (Shen et al., NeurIPS 2025, arXiv 2503.11187), pre-LLM, query-agnostic.

``specs/sota.md`` §1. One video ``x`` ``[T, M, D]``:

1. **DySeg.** Frame descriptors ``g_t`` (the frame mean); a cut after frame ``t`` where
   ``cos(g_t, g_{t+1}) < tau`` (0.9) and at the ``c − 1`` smallest similarities (``c = 8``).
2. **Budget.** Frame ``t`` gets ``k_t`` of the exact total ``K = retained_count(T, T·M, r)``
   (``budget="uniform"``: equal shares, as the reference's ``⌊M·r⌋`` per frame; ``"fca"``:
   VidCom2's frame-uniqueness shares). A segment of ``L`` frames has ``R = Σ k_t``: context
   ``C = ⌊R·d⌋`` (``d`` 0.4) and salient ``S = R − C`` (at least one per frame). ``S`` is spread
   evenly over the frames (the +1s to the first frames); ``C`` over the **anchor** frames
   ``j`` with ``(L − 1 − j) mod p = 0`` (``p`` 4; the +1s to the anchors nearest the segment
   end). An anchor holds at most its non-salient tokens; its overflow goes to the next anchor
   with room, then to salient slots in frame order — so the total is always exactly ``K``.
3. **ATS.** Each frame's salient tokens are its top-``s_t`` by encoder attention (ties to the
   smaller index).
4. **Context.** On each anchor, DPC-kNN (``k = 4``) over its non-salient tokens; the top
   ``C_j`` density-peak scores are its context tokens.
5. **DTM.** Every source token of the segment goes to the anchor's most cosine-similar context
   token, and each context token becomes ``β·c + (1 − β)·mean(sources)`` (``β`` 0.6; unchanged
   without sources; ``merge="onevision"`` counts ``c`` among its sources, as the reference's
   LLaVA-OneVision code). Sources (``sources="dropped"``, default) are the segment's tokens
   that are not kept; ``"reference"`` also merges the *other* anchors' (kept) context tokens,
   as the reference code does — the default makes ``retain = 1`` the identity.

Salient and context tokens sit at their own indices; context tokens carry merged features.

**Signals.** The reference ranks LLaVA tokens by SigLIP's pooling-head probe attention, which
it reloads from the original SigLIP checkpoint because LLaVA's tower drops the head (so do
Hugging Face's LLaVA-OneVision checkpoints), and Qwen tokens by the last ViT block's attention
from the frame's mean query. ``attention="received"`` (default) ranks by the attention each
token receives in the tower's feature layer where the adapter computes it (LLaVA-OneVision),
else by the same quantity on the features; ``"encoder"`` takes the adapter's summary signal —
the probe when the tower keeps its head, else the frame-mean stand-in, which on the embedded
LLaVA-OneVision model ranks background first: it kept 24% of the uncompressed accuracy at
retain 0.25 against 78% with ``"received"`` (100 held-out questions; today's option names:
``tokensieve bench quality --model embedded --n 100 --retain 0.25 --methods
fastvid:attention=encoder,fastvid``); ``"features"`` the stand-in on the features. The reference's LLaVA frame descriptor is the probe's pooled
output; here it is the frame mean of the features (the reference's Qwen descriptor).
The reference's Qwen2.5-VL extras (frames of very static runs keep tokens only on the last
frame; context per anchor capped at ``⌊M/2⌋``) are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SegmentContext, Selection, check_segment, validate_choice
from .budget import BUDGET_POLICIES, COUNT_RULES, frame_budget
from .cluster import cosine, dpc_knn, segment_lengths, topk_det, transition_similarity
from .flashvid import ATTENTION_SIGNALS, ReadsAttention, attention_weights


def fastvid_plan(k: torch.Tensor, d: float, p: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Salient and context counts of one segment with per-frame budgets ``k`` ``[L]``, before the
    per-frame caps of :func:`place_context`.

    Returns ``(salient [L], context [L] (0 off the anchors), C)``.
    """
    L = k.numel()
    R = int(k.sum())
    C = int(R * d)  # floor, as the reference
    S = max(R - C, L)
    C = R - S
    sal = torch.full((L,), S // L, dtype=torch.int64)
    sal[: S % L] += 1
    anchors = [j for j in range(L) if (L - 1 - j) % p == 0]
    ctx = torch.zeros(L, dtype=torch.int64)
    if anchors:
        n_a = len(anchors)
        ctx[anchors] = C // n_a
        for j in sorted(anchors, reverse=True)[: C % n_a]:  # the +1s nearest the segment end
            ctx[j] += 1
    return sal, ctx, C


def place_context(sal: torch.Tensor, ctx: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cap each anchor at its ``M − s_t`` non-salient tokens; overflow to the next anchors (from
    the segment end), then to salient slots in frame order. Totals are unchanged."""
    sal, ctx = sal.clone(), ctx.clone()
    anchors = [j for j in range(ctx.numel() - 1, -1, -1) if int(ctx[j]) > 0]
    over = 0
    for j in anchors:
        room = M - int(sal[j])
        if int(ctx[j]) > room:
            over += int(ctx[j]) - room
            ctx[j] = room
    for j in anchors:
        if over == 0:
            break
        add = min(over, M - int(sal[j]) - int(ctx[j]))
        ctx[j] += add
        over -= add
    for t in range(sal.numel()):
        if over == 0:
            break
        add = min(over, M - int(sal[t]) - int(ctx[t]))
        sal[t] += add
        over -= add
    return sal, ctx


@dataclass
class FastVID(ReadsAttention):
    """Configured FastVID selector (see the module docstring)."""

    tau: float = field(default=0.9, metadata={"range": "[-1, 1]", "help": "frame-similarity below which a segment ends (Qwen reference: 0.84)"})
    segments: int = field(default=8, metadata={"range": "[1, inf)", "help": "c: cuts also at the c-1 least similar transitions"})
    d: float = field(default=0.4, metadata={"range": "[0, 1)", "help": "share of a segment's budget for context tokens"})
    p: int = field(default=4, metadata={"range": "[1, inf)", "help": "anchor stride: every p-th frame from the segment end"})
    beta: float = field(default=0.6, metadata={"range": "[0, 1]", "help": "weight of a context token's own feature in the merge"})
    k: int = field(default=4, metadata={"range": "[1, inf)", "help": "neighbours of the DPC density"})
    merge: str = field(default="video", metadata={"help": "'video' (LLaVA-Video/Qwen reference) or 'onevision' (c among its sources)"})
    sources: str = field(default="dropped", metadata={"help": "merge sources: 'dropped' tokens or 'reference' (also other anchors' context)"})
    attention: str = field(default="received", metadata={"help": "salience: 'received' (the tower's, else on the tokens), 'encoder' (the adapter's summary signal) or 'features'"})
    budget: str = field(default="uniform", metadata={"help": "per-frame budget: 'uniform' (reference) or 'fca'"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        validate_choice("fastvid option merge", self.merge, ("video", "onevision"))
        validate_choice("fastvid option sources", self.sources, ("dropped", "reference"))
        validate_choice("fastvid option attention", self.attention, ATTENTION_SIGNALS)
        validate_choice("fastvid option budget", self.budget, BUDGET_POLICIES)
        validate_choice("fastvid option count_rule", self.count_rule, COUNT_RULES)

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one video ``x`` ``[T, M, D]``; every kept token's feature in ``features``."""
        T, M, D = check_segment(x)
        a = attention_weights(self.attention, x, context, "fastvid")
        k, weights = frame_budget(x, retain, self.budget, count_rule=self.count_rule)
        g = x.float().mean(dim=1)
        lengths = segment_lengths(transition_similarity(g), self.tau, extra_cuts=self.segments - 1)
        xf = x.float()
        keep_parts: list[torch.Tensor] = []
        feat_parts: list[torch.Tensor] = []
        start = 0
        for L in lengths.tolist():
            sal, ctx, _ = fastvid_plan(k[start:start + L], self.d, self.p)
            sal, ctx = place_context(sal, ctx, M)
            seg = xf[start:start + L]
            salient = torch.zeros(L, M, dtype=torch.bool)
            for t in range(L):
                salient[t, topk_det(a[start + t], int(sal[t]))] = True
            context_of: dict[int, torch.Tensor] = {}
            for j in range(L):
                if int(ctx[j]) == 0:
                    continue
                rest = (~salient[j]).nonzero(as_tuple=True)[0]
                if int(ctx[j]) == rest.numel():
                    context_of[j] = rest
                    continue
                context_of[j] = torch.sort(rest[self._top_peaks(seg[j, rest], int(ctx[j]))]).values
            kept = salient.clone()
            for j, idx in context_of.items():
                kept[j, idx] = True
            feats = seg.clone()
            for j, idx in context_of.items():
                feats[j, idx] = self._merge(seg, kept, salient, j, idx, context_of)
            flat = kept.flatten().nonzero(as_tuple=True)[0]
            keep_parts.append(flat + start * M)
            feat_parts.append(feats.reshape(L * M, D)[flat])
            start += L
        keep = torch.cat(keep_parts)
        counts = torch.bincount(keep // M, minlength=T)
        return Selection(keep=keep, frame_counts=counts, features=torch.cat(feat_parts).to(x.dtype),
                         frame_weights=weights)

    def _top_peaks(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """Indices of the ``count`` density peaks of ``rows`` (DPC-kNN centres)."""
        centres, _ = dpc_knn(rows, count, self.k)
        return centres

    def _merge(self, seg: torch.Tensor, kept: torch.Tensor, salient: torch.Tensor, j: int, idx: torch.Tensor,
               context_of: dict[int, torch.Tensor]) -> torch.Tensor:
        """New features of anchor ``j``'s context tokens ``idx``."""
        L, M, D = seg.shape
        if self.sources == "dropped":
            src = ~kept
        else:
            src = ~salient
            src[j, idx] = False
        rows = seg[src]
        c = seg[j, idx]
        if rows.shape[0] == 0:
            return c
        assign = cosine(rows, c).argmax(dim=-1)  # first maximum: the earlier context token
        sums = torch.zeros(idx.numel(), D).index_add_(0, assign, rows)
        n = torch.zeros(idx.numel()).index_add_(0, assign, torch.ones(rows.shape[0]))
        if self.merge == "onevision":
            mean = (sums + c) / (n + 1).unsqueeze(-1)
            w = torch.clamp(1.0 / (n + 1), min=self.beta)
        else:
            mean = sums / n.clamp_min(1).unsqueeze(-1)
            w = torch.full_like(n, self.beta)
        merged = w.unsqueeze(-1) * c + (1 - w).unsqueeze(-1) * mean
        return torch.where((n > 0).unsqueeze(-1), merged, c)
