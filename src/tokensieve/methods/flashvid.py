"""FlashVID (Fan et al., ICLR 2026, arXiv 2602.08024), pre-LLM, with an optional in-LLM stage.

``specs/sota.md`` §3. One video ``x`` ``[T, M, D]``:

1. **Segments.** Frame descriptors ``g_t = mean_m x_t``; a cut after frame ``t`` where
   ``cos(g_t, g_{t+1}) < segment_threshold`` (0.9); while there are fewer than
   ``min_segments`` segments, one more cut at the smallest similarity not cut yet.
2. **Budget.** The segment keeps exactly ``K = retained_count(T, T·M, min(1, r·e))`` tokens
   (``e = expansion``); frame ``t`` gets ``b_t`` of them (``budget="uniform"``: equal shares;
   ``"fca"``: VidCom2's frame-uniqueness shares), ``A_t = clamp(⌈α·b_t⌉, 1, b_t)`` for ADTS and
   the rest, summed over a segment, ``S_seg = Σ(b_t − A_t)``, for tree merging.
3. **ADTS** (attention- and diversity-based token selection, per frame): a greedy max–min
   over cosine distances, each candidate's distance weighted by ``w_j = a_j`` (``adts="v1"``) or
   ``w_j = a_j·max(0, ⟨x_j, ḡ⟩)`` with ``ḡ`` the mean of the segment's frame means (``"v2"``).
   The first pick maximises ``w_j·min_{i≠j}(1 − cos_ij)``, each next one
   ``w_j·min_{i picked}(1 − cos_ij)``; picks are never repeated; ties go to the smaller index.
4. **TSTM** (tree merging, per segment, on the tokens ADTS did not pick): a token of frame
   ``t ≥ 1`` links to its most cosine-similar non-ADTS token of frame ``t − 1`` (any position)
   when the similarity exceeds ``tree_threshold`` (0.8). If that leaves fewer than ``S_seg``
   roots, only the ``n − S_seg`` most similar links are kept (the reference raises its
   threshold to the same end). Each root carries the mean of its tree, at its own (earliest)
   index.
5. **Spatial.** If more than ``S_seg`` roots remain, frame ``f``'s ``n_f`` roots are clustered by
   DPC-kNN (``k = min(c_f, 7)``) into ``c_f`` (``S_seg`` apportioned over the frames ∝ ``n_f``)
   clusters; each cluster's mean sits at its centre's index.

Every frame keeps at least one token (its ADTS picks); the total is exact.

**In-LLM stage** (``preset="paper"``): before decoder layer ``llm_layer`` (20), the last
prompt token's attention at layer ``llm_layer − 1`` (head mean) keeps ``⌈ρ_l·V⌉``
(``llm_ratio`` 0.3) of the visual tokens. With ``e = 1.25`` on a 28-layer LLM,
``e·(K_l + (L − K_l)·ρ_l)/L = 1``: the paper's ``r`` is a *layer-averaged* ratio. The default
``preset="exact"`` (``e = 1``, no in-LLM stage) keeps exactly ``round(r·N)`` tokens at the
LLM input, the library's count.

**Attention signal.** The reference reads the attention each token receives in the vision
tower's last layer (head and query mean). ``attention="received"`` (default) takes exactly that
where the adapter computes it (``context.encoder_received``: LLaVA-OneVision's SigLIP) and
otherwise the same quantity on the segment's own features
(:func:`~tokensieve.methods.signals.received_attention`; Qwen and InternVL towers for now);
``"features"`` always uses the latter; ``"encoder"`` takes the adapter's summary signal
(``context.encoder_attention``; negative values, e.g. the frame-mean logit stand-in, count as 0).

Reference defaults differ by family: LLaVA ``min_segments=8, adts="v2"``; Qwen2.5/3-VL
``min_segments=4, adts="v1"``. The method never knows the family, so the LLaVA constants are
the defaults and the Qwen ones one option away.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, validate_choice
from .budget import BUDGET_POLICIES, COUNT_RULES, apportion, frame_budget
from .cluster import cluster_means, cosine, dpc_knn, segment_lengths, topk_det, transition_similarity
from .inllm import DEPTHS, FixedRatioPrune, scaled_layers
from .signals import received_attention

FLASHVID_REF_DEPTH = 28  # LLaVA-OV-7B's Qwen2-7B (FlashVID arXiv 2602.08024: K_l = 20, rho_l = 0.3)
PRESETS = ("exact", "paper")


def layer_averaged_ratio(expansion: float, layer: int, ratio: float, num_layers: int) -> float:
    """The paper's layer-averaged visual share of the paper preset: ``e·(K_l + (L − K_l)·ρ_l)/L``
    (1.25·(20 + 8·0.3)/28 = 1 for Qwen2-7B, 1.25·(28 + 8·0.1)/36 = 1 for Qwen3-VL-8B)."""
    return expansion * (layer + (num_layers - layer) * ratio) / num_layers


def adts(x: torch.Tensor, w: torch.Tensor, count: int) -> torch.Tensor:
    """ADTS picks of one frame: ``count`` ascending indices into ``x`` ``[M, D]`` by the weighted
    greedy max–min of cosine distances (weights ``w`` ``[M]``, non-negative)."""
    M = x.shape[0]
    count = max(0, min(int(count), M))
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    dist = (1.0 - cosine(x, x)) * w.float().clamp_min(0.0)[None, :]  # [i, j]: distance of j to i, weighted by w_j
    first = dist.clone()
    first.fill_diagonal_(float("inf"))
    score = first.min(dim=0).values if M > 1 else w.float()
    picked = [int(torch.argmax(score))]
    nearest = dist[picked[0]].clone()
    taken = torch.zeros(M, dtype=torch.bool)
    taken[picked[0]] = True
    for _ in range(1, count):
        s = nearest.masked_fill(taken, -float("inf"))
        j = int(torch.argmax(s))  # first maximum: the smaller index
        picked.append(j)
        taken[j] = True
        nearest = torch.minimum(nearest, dist[j])
    return torch.sort(torch.tensor(picked, dtype=torch.int64)).values


def tree_merge(
    x: torch.Tensor, picked: torch.Tensor, threshold: float, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSTM on one segment ``x`` ``[L, M, D]`` with ADTS picks ``picked`` ``[L, M]`` (bool).

    Returns ``(roots, features)``: ``roots`` ``[L, M]`` bool (non-ADTS tokens that head a tree)
    and ``features`` ``[L, M, D]`` fp32, each root's tree mean (other entries: the raw token).
    At least ``budget`` roots remain whenever there are that many non-ADTS tokens.
    """
    L, M, D = x.shape
    xf = x.float()
    free = ~picked
    link = torch.full((L, M), -float("inf"))
    parent = torch.zeros(L, M, dtype=torch.int64)
    if L > 1:
        sim = cosine(x[1:], x[:-1])  # [L-1, M(now), M(previous)]
        sim = sim.masked_fill(~free[:-1, None, :], -float("inf"))
        best, arg = sim.max(dim=-1)  # first maximum: the smaller index
        link[1:] = torch.where(free[1:], best, torch.full_like(best, -float("inf")))
        parent[1:] = arg
    linked = link > threshold
    n_free = int(free.sum())
    if n_free - int(linked.sum()) < budget:
        linked = torch.zeros(L * M, dtype=torch.bool)
        linked[topk_det(link.flatten(), n_free - budget)] = True
        linked = linked.view(L, M)
    sums = xf.clone()
    counts = torch.ones(L, M)
    for t in range(L - 1, 0, -1):  # back to front: a tree's sum reaches its root
        m = linked[t]
        if bool(m.any()):
            sums[t - 1].index_add_(0, parent[t][m], sums[t][m])
            counts[t - 1].index_add_(0, parent[t][m], counts[t][m])
    roots = free & ~linked
    return roots, sums / counts.unsqueeze(-1)


ATTENTION_SIGNALS = ("received", "features", "encoder")


def attention_weights(mode: str, x: torch.Tensor, context: SegmentContext | None, method: str) -> torch.Tensor:
    """``[T, M]`` per-token attention for the methods that weight or rank by it.

    ``"received"``: the tower's own received attention (``context.encoder_received``) where the
    adapter gives it, else the same quantity on the features (:func:`received_attention`);
    ``"features"``: always the latter; ``"encoder"``: the adapter's summary signal
    (``context.encoder_attention``: a pooling-probe map or the frame-mean stand-in).
    """
    T, M, _ = x.shape
    if mode == "received" and context is not None and context.encoder_received is not None:
        attn = context.encoder_received
    elif mode in ("received", "features"):
        return received_attention(x)
    else:
        attn = context.encoder_attention if context is not None else None
    if attn is None:
        raise InputError(f"method {method!r} with attention='encoder' needs the vision-encoder attention")
    if tuple(attn.shape) != (T, M):
        raise InputError(f"{method}: vision-encoder attention must be [{T}, {M}], got {tuple(attn.shape)}")
    return attn.float()


class ReadsAttention:
    """The signals of a selector with an ``attention`` option (FlashVID, FastVID, HoliTom): never
    the question; the encoder's signals unless ``attention="features"``."""

    attention: str

    @property
    def needs_text(self) -> bool:
        return False

    @property
    def needs_encoder_attention(self) -> bool:
        return self.attention != "features"


@dataclass
class FlashVID(ReadsAttention):
    """Configured FlashVID selector (see the module docstring)."""

    alpha: float = field(default=0.7, metadata={"range": "[0, 1]", "help": "share of each frame's budget picked by ADTS"})
    tree_threshold: float = field(default=0.8, metadata={"range": "[-1, 1]", "help": "cosine above which a token links to the previous frame"})
    segment_threshold: float = field(default=0.9, metadata={"range": "[-1, 1]", "help": "frame-similarity below which a segment ends"})
    min_segments: int = field(default=8, metadata={"range": "[1, inf)", "help": "minimum number of segments (Qwen reference: 4)"})
    adts: str = field(default="v2", metadata={"help": "'v2' (attention x event relevance; LLaVA reference) or 'v1' (attention; Qwen reference)"})
    attention: str = field(default="received", metadata={"help": "'received' (the tower's, else on the tokens), 'features' or 'encoder' (the adapter's summary signal)"})
    budget: str = field(default="uniform", metadata={"help": "per-frame budget: 'uniform' (reference) or 'fca'"})
    preset: str = field(default="exact", metadata={"help": "'exact' (r counts LLM-input tokens) or 'paper' (e=1.25 plus the in-LLM stage)"})
    expansion: float | None = field(default=None, metadata={"range": "[1, inf)", "help": "e: pre-LLM keeps r*e (None: 1 for 'exact', 1.25 for 'paper')"})
    llm_layer: int = field(default=20, metadata={"range": "[1, inf)", "help": "paper preset: first decoder layer that sees the pruned sequence"})
    llm_ratio: float = field(default=0.3, metadata={"range": "(0, 1]", "help": "paper preset: share of visual tokens kept at llm_layer"})
    depth: str = field(default="published", metadata={"help": "'published' (llm_layer as given) or 'scaled' (given for 28 layers)"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        validate_choice("flashvid option adts", self.adts, ("v1", "v2"))
        validate_choice("flashvid option attention", self.attention, ATTENTION_SIGNALS)
        validate_choice("flashvid option budget", self.budget, BUDGET_POLICIES)
        validate_choice("flashvid option preset", self.preset, PRESETS)
        validate_choice("flashvid option depth", self.depth, DEPTHS)
        validate_choice("flashvid option count_rule", self.count_rule, COUNT_RULES)

    @property
    def e(self) -> float:
        if self.expansion is not None:
            return float(self.expansion)
        return 1.25 if self.preset == "paper" else 1.0

    def llm_stage(self) -> FixedRatioPrune | None:
        """The in-LLM stage of the paper preset (``None`` for ``preset="exact"``)."""
        if self.preset != "paper":
            return None
        return FixedRatioPrune(name="flashvid", layer=self.llm_layer, ratio=self.llm_ratio)

    def for_depth(self, num_layers: int) -> "FlashVID":
        if self.depth == "published":
            return self
        (k,) = scaled_layers((self.llm_layer,), num_layers, FLASHVID_REF_DEPTH, low=1)
        return dataclasses.replace(self, llm_layer=k, depth="published")

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one video ``x`` ``[T, M, D]``; every kept token's feature in ``features``."""
        T, M, D = check_segment(x)
        a = attention_weights(self.attention, x, context, "flashvid")
        r_pre = min(1.0, float(retain) * self.e)
        b, weights = frame_budget(x, r_pre, self.budget, count_rule=self.count_rule)
        A = torch.clamp(torch.ceil(self.alpha * b.double()).to(torch.int64), min=1)
        A = torch.minimum(A, b)
        g = x.float().mean(dim=1)
        lengths = segment_lengths(transition_similarity(g), self.segment_threshold, min_segments=self.min_segments)
        keep_parts: list[torch.Tensor] = []
        feat_parts: list[torch.Tensor] = []
        start = 0
        for L in lengths.tolist():
            seg = x[start:start + L]
            picked = torch.zeros(L, M, dtype=torch.bool)
            relevance = None
            if self.adts == "v2":
                relevance = (seg.float() @ g[start:start + L].mean(dim=0)).clamp_min(0.0)  # [L, M]
            for i in range(L):
                w = a[start + i] * relevance[i] if relevance is not None else a[start + i]
                picked[i, adts(seg[i], w, int(A[start + i]))] = True
            S = int((b[start:start + L] - A[start:start + L]).sum())
            kept, feats = self._merge(seg, picked, S)
            keep_parts.append(kept + start * M)
            feat_parts.append(feats)
            start += L
        keep = torch.cat(keep_parts)
        features = torch.cat(feat_parts)
        order = torch.argsort(keep)
        keep, features = keep[order], features[order]
        counts = torch.bincount(keep // M, minlength=T)
        return Selection(keep=keep, frame_counts=counts, features=features.to(x.dtype), frame_weights=weights)

    def _merge(self, seg: torch.Tensor, picked: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept flat indices into the segment and their features: ADTS picks raw, ``S`` merged tokens."""
        L, M, D = seg.shape
        flat = seg.reshape(L * M, D).float()
        idx = [picked.flatten().nonzero(as_tuple=True)[0]]
        feats = [flat[idx[0]]]
        if S > 0:
            roots, tree = tree_merge(seg, picked, self.tree_threshold, S)
            tree = tree.reshape(L * M, D)
            n_f = roots.sum(dim=1)
            if int(n_f.sum()) == S:
                r = roots.flatten().nonzero(as_tuple=True)[0]
                idx.append(r)
                feats.append(tree[r])
            else:
                c = apportion(n_f.double(), S, n_f, lower=0)
                for f in range(L):
                    members = roots[f].nonzero(as_tuple=True)[0] + f * M
                    cf = int(c[f])
                    if cf == 0:
                        continue
                    if cf == members.numel():
                        idx.append(members)
                        feats.append(tree[members])
                        continue
                    centres, assign = dpc_knn(tree[members], cf, min(cf, 7))
                    idx.append(members[centres])
                    feats.append(cluster_means(tree[members], assign, cf))
        return torch.cat(idx), torch.cat(feats)
