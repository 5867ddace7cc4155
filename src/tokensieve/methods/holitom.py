"""HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334), the pre-LLM stage ("outer" merging).

``specs/sota.md`` §2. One video ``x`` ``[T, M, D]``:

1. ``sim[t, m] = cos(x[t, m], x[t+1, m])``. A window ``[s, e]`` of frames has the static set
   ``S_w = {m : sim[t, m] > tau for every t in [s, e)}`` and saves ``(e − s)·|S_w|`` tokens.
2. Windows by dynamic programming over the frames: ``dp[i] = max(dp[i−1], max_w dp[i−w] +
   saved(i−w+1, i))`` for window lengths ``w ∈ [2, max_window]``; a candidate replaces the
   best only when strictly better (ties to the shorter window). Frames outside every window
   are single.
3. Groups: each window's static pool (one token per static position, the mean over the
   window's frames, placed at frame ``s``) and each frame's dynamic pool (the other positions;
   all ``M`` for a single frame). A window whose every position is static gives up the one
   with the lowest window-minimum similarity (ties to the smaller ``m``) to the dynamic pools,
   so that every frame can keep a token.
4. The exact total ``K = retained_count(T, T·M, r)`` is apportioned over the groups in
   proportion to their sizes (time order, a window's static pool before its frames; at least
   one per frame) — the reference's rescaled ratio ``r' = r·N/(N − Reduced)`` with its per-group
   rounding replaced by one exact apportionment.
5. A static pool of ``n`` tokens keeping ``c < n`` clusters them by DPC-kNN (``k = min(7, c)``);
   the other static tokens join their nearest centre, ``c ← β·c + (1 − β)·mean(members)``
   (``β`` 0.6). A dynamic pool keeps its top tokens by attention.
6. When ``K`` exceeds what the groups hold, every group is kept whole and static duplicates
   come back as raw tokens (least static first: ascending window-minimum similarity, then
   ``t``, then ``m``), each leaving its static mean — so ``r = 1`` is the identity.

**Attention.** The reference ranks dynamic tokens by the attention each receives in the
tower's last layer (head and query mean): ``attention="received"`` (default) as FlashVID
(:func:`~tokensieve.methods.flashvid.attention_weights`).

**Inner stage** (``inner=True``, the reference's full method): before decoder layer
``inner_layer`` (18) the last prompt token's attention keeps ``round(V·(1 − inner_ratio))``
(half) of the visual tokens and every other one merges into its most similar kept token
(:class:`~tokensieve.methods.inllm.MergePrune`). By default (``inner=False``) ``retain`` counts
exactly the tokens that enter the LLM and nothing happens inside it. Scripts use ``tau = 0.65`` at ``r = 0.10`` and 0.8 (the default) at
0.15–0.25.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .base import SegmentContext, Selection, check_segment, validate_choice
from .budget import COUNT_RULES, apportion, retained_count
from .cluster import dpc_knn, topk_det, unit
from .flashvid import ATTENTION_SIGNALS, ReadsAttention, attention_weights
from .inllm import DEPTHS, MERGE_OPS, MergePrune, scaled_layers

HOLITOM_REF_DEPTH = 28  # LLaVA-OV-7B's Qwen2-7B (HoliTom arXiv 2505.21334: inner merge before layer 18)


def static_windows(sim: torch.Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """Windows ``(s, e)`` (inclusive, ``e > s``) chosen by the dynamic programme, and the tokens
    they save, from per-position transition similarities ``sim`` ``[T − 1, M]``."""
    T = sim.shape[0] + 1
    above = sim.float() > tau  # [T-1, M]
    dp = [0] * (T + 1)  # dp[i + 1]: the best saving over frames 0..i
    choice = [1] * T  # window length ending at frame i (1: the frame alone)
    for i in range(T):
        best, best_w = dp[i], 1
        static = None
        for w in range(2, min(i + 1, max_window) + 1):
            row = above[i - w + 1]  # transition (i-w+1) -> (i-w+2)
            static = row.clone() if static is None else static & row
            saved = (w - 1) * int(static.sum())
            cand = dp[i - w + 1] + saved
            if cand > best:
                best, best_w = cand, w
        dp[i + 1] = best
        choice[i] = best_w
    windows: list[tuple[int, int]] = []
    i = T - 1
    while i >= 0:
        w = choice[i]
        if w > 1:
            windows.append((i - w + 1, i))
        i -= w
    return windows[::-1], dp[T]


@dataclass
class HoliTom(ReadsAttention):
    """Configured HoliTom selector (see the module docstring)."""

    tau: float = field(default=0.8, metadata={"range": "[-1, 1]", "help": "similarity above which a position is static (scripts: 0.65 at r = 0.1)"})
    beta: float = field(default=0.6, metadata={"range": "[0, 1]", "help": "weight of a cluster centre's own feature in the merge"})
    k: int = field(default=7, metadata={"range": "[1, inf)", "help": "neighbours of the DPC density (capped at the cluster count)"})
    max_window: int = field(default=1024, metadata={"range": "[2, inf)", "help": "longest static window, in frames"})
    attention: str = field(default="received", metadata={"help": "dynamic ranking: 'received' (the tower's, else on the tokens), 'features' or 'encoder'"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})
    inner: bool = field(default=False, metadata={"help": "add the inner stage: merge visual tokens inside the LLM"})
    inner_layer: int = field(default=18, metadata={"range": "[1, inf)", "help": "inner stage: first decoder layer that sees the merged tokens"})
    inner_ratio: float = field(default=0.5, metadata={"range": "[0, 1)", "help": "inner stage: share of visual tokens merged away"})
    inner_op: str = field(default="sequential", metadata={"help": "inner merge: 'sequential' (reference pairwise averages) or 'mean'"})
    depth: str = field(default="published", metadata={"help": "'published' (inner_layer as given) or 'scaled' (given for 28 layers)"})

    def __post_init__(self) -> None:
        validate_choice("holitom option attention", self.attention, ATTENTION_SIGNALS)
        validate_choice("holitom option inner_op", self.inner_op, MERGE_OPS)
        validate_choice("holitom option depth", self.depth, DEPTHS)
        validate_choice("holitom option count_rule", self.count_rule, COUNT_RULES)

    def llm_stage(self) -> MergePrune | None:
        """The inner stage (``inner=True``), or ``None``."""
        if not self.inner:
            return None
        return MergePrune(name="holitom", layer=self.inner_layer, ratio=self.inner_ratio, op=self.inner_op)

    def for_depth(self, num_layers: int) -> "HoliTom":
        if self.depth == "published":
            return self
        (k,) = scaled_layers((self.inner_layer,), num_layers, HOLITOM_REF_DEPTH, low=1)
        return dataclasses.replace(self, inner_layer=k, depth="published")

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one video ``x`` ``[T, M, D]``; every kept token's feature in ``features``."""
        T, M, D = check_segment(x)
        a = attention_weights(self.attention, x, context, "holitom")
        xf = x.float()
        K = retained_count(T, T * M, retain, self.count_rule)
        u = unit(xf)
        sim = (u[:-1] * u[1:]).sum(-1) if T > 1 else torch.zeros(0, M)
        windows, _ = static_windows(sim, self.tau, self.max_window)
        # groups in time order: (kind, frames, positions); kind "static" or "dynamic"
        statics: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (s, e, positions, window-min sim)
        static_at = torch.zeros(T, M, dtype=torch.bool)
        for s, e in windows:
            wmin = sim[s:e].min(dim=0).values
            pos = (wmin > self.tau).nonzero(as_tuple=True)[0]
            if pos.numel() == M:  # every frame keeps a token: the least static position turns dynamic
                drop = int(topk_det(-wmin, 1))
                pos = pos[pos != drop]
            statics.append((s, e, pos, wmin))
            static_at[s:e + 1, pos] = True
        sizes, lower, groups = [], [], []
        starts = {s: j for j, (s, _, _, _) in enumerate(statics)}
        for t in range(T):
            if t in starts:
                j = starts[t]
                sizes.append(statics[j][2].numel())
                lower.append(0)
                groups.append(("static", j))
            sizes.append(int((~static_at[t]).sum()))
            lower.append(1)
            groups.append(("dynamic", t))
        size = torch.tensor(sizes, dtype=torch.int64)
        held = int(size.sum())
        if K <= held:
            c = apportion(size.double(), K, size, lower=torch.tensor(lower, dtype=torch.int64))
            restored: list[tuple[int, int]] = []
        else:
            c = size
            restored = self._restore(statics, K - held)
        return self._emit(xf, x.dtype, a, statics, groups, c, restored)

    @staticmethod
    def _restore(statics: list, count: int) -> list[tuple[int, int]]:
        """``count`` static duplicates ``(t, m)`` to bring back raw: ascending window-min sim, t, m."""
        cands = []
        for s, e, pos, wmin in statics:
            for m in pos.tolist():
                for t in range(s + 1, e + 1):
                    cands.append((float(wmin[m]), t, m))
        cands.sort()
        return [(t, m) for _, t, m in cands[:count]]

    def _emit(self, xf, dtype, a, statics, groups, c, restored) -> Selection:
        T, M, D = xf.shape
        idx_parts: list[torch.Tensor] = []
        feat_parts: list[torch.Tensor] = []
        back = set(restored)
        for (kind, j), n_keep in zip(groups, c.tolist()):
            if kind == "dynamic":
                t = j
                members = [(s, e, pos) for s, e, pos, _ in statics if s <= t <= e]
                dyn = torch.ones(M, dtype=torch.bool)
                for _, _, pos in members:
                    dyn[pos] = False
                free = dyn.nonzero(as_tuple=True)[0]
                pick = free[topk_det(a[t, free], n_keep)]
                extra = torch.tensor(sorted(m for tt, m in back if tt == t), dtype=torch.int64)
                pick = torch.cat([pick, extra])
                idx_parts.append(pick + t * M)
                feat_parts.append(xf[t, pick])
                continue
            s, e, pos, _ = statics[j]
            if n_keep == 0 or pos.numel() == 0:
                continue
            frames = torch.arange(s, e + 1)
            weight = torch.ones(e - s + 1, pos.numel())
            for tt, m in back:
                if s < tt <= e and m in set(pos.tolist()):
                    weight[tt - s, (pos == m).nonzero(as_tuple=True)[0]] = 0.0
            vals = xf[frames][:, pos]  # [L, n, D]
            means = (vals * weight.unsqueeze(-1)).sum(0) / weight.sum(0).unsqueeze(-1)
            if n_keep >= pos.numel():
                idx_parts.append(pos + s * M)
                feat_parts.append(means)
                continue
            centres, assign = dpc_knn(means, n_keep, min(self.k, n_keep))
            sums = torch.zeros(n_keep, D).index_add_(0, assign, means)
            n = torch.zeros(n_keep).index_add_(0, assign, torch.ones(pos.numel()))
            own = means[centres]
            others = (sums - own) / (n - 1).clamp_min(1).unsqueeze(-1)
            merged = torch.where((n > 1).unsqueeze(-1), self.beta * own + (1 - self.beta) * others, own)
            idx_parts.append(pos[centres] + s * M)
            feat_parts.append(merged)
        keep = torch.cat(idx_parts)
        feats = torch.cat(feat_parts)
        order = torch.argsort(keep)
        keep, feats = keep[order], feats[order]
        counts = torch.bincount(keep // M, minlength=T)
        return Selection(keep=keep, frame_counts=counts, features=feats.to(dtype))
