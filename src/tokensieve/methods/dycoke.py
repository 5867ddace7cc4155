"""DyCoke stage 1 (TTM, temporal token merging), pre-LLM and attention-free.

``specs/baselines.md`` §4.1. Frames are grouped in fours:

1. **pairs** ``(i, i+1)``, ``i = 0, 2, 4, … < T−1``: frame ``i`` stays whole; frame ``i+1``
   keeps its tokens least cosine-similar to frame ``i`` at the same grid position;
2. **quads** ``i = 0, 4, 8, …`` while ``i < T−4`` (``ttm_last_quad="reference"``) or while
   frame ``i+2`` exists (``"process"``): frame ``i+2`` (whole after step 1) is likewise pruned
   against frame ``i``.

So every 4th frame (and, for odd ``T``, the last frame) is an **anchor** kept whole; every
other frame is **pruned**. Kept tokens are emitted in raster order (``ttm_keep_order="raster"``);
the official code emits a pruned frame's kept tokens in ascending-similarity (top-k) order,
which ``ttm_keep_order="similarity"`` reproduces. For odd ``T`` the last frame is emitted
whole (the official code drops it, and fails for ``T <= 4``). By default dropped tokens are discarded
(the reference); ``ttm_op="average_into_anchor"`` instead averages each dropped token into
the token at the same position of the frame it was compared to (following chains to a kept
token), and returns the group means as ``features``.

Counts (a function of ``(T, M, retain)`` and the options only, see :func:`dycoke_count`):
with ``W`` anchor and ``P`` pruned frames,

* ``dycoke_k`` given (the reference's merging ratio, retain ignored): every pruned frame keeps
  ``q = clamp(⌊(1 − k)·M⌋, 1, M)`` in float64, as the official code's Python float (a float32
  ``k`` would keep one token fewer at e.g. M = 300, k = 0.3), total ``W·M + P·q``
  (T = 32, M = 196, k = 0.7 → 9·196 + 23·58 = 3098, 49.4%);
* ``dycoke_k=None`` (default): the total is ``min(N, max(W·M + P, retained_count(T, N, r)))``
  — exactly the library's count whenever it is reachable; below ``W·M + P`` (anchors whole,
  one token per pruned frame) DyCoke cannot go, which is why it is not usable for small
  ``r``. The pruned frames share ``total − W·M`` by bounded largest-remainder apportionment.

Budget policy: DyCoke fixes its own grouping (anchors are always whole), so FCA cannot
redistribute the whole segment's budget (``vidcom2.md`` §8.2). ``budget="fca"`` only biases
the pruned frames' targets: their shared budget is apportioned with quotas ``r_t·M`` from
VidCom2's frame-uniqueness ratios instead of equally; anchor frames are unaffected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .inllm import DyCokeDP
from .base import SegmentContext, Selection, check_segment, gather_per_frame, rank_ascending, validate_choice
from .budget import BUDGET_POLICIES, COUNT_RULES, TAU, apportion, fca_ratios, frame_scores, retained_count

NORM_FLOOR = 1e-6


def ttm_plan(num_frames: int, last_quad: str = "reference") -> torch.Tensor:
    """Anchor of each frame, ``[T]`` int64: ``-1`` for a frame kept whole, else the frame it is pruned against."""
    T = int(num_frames)
    anchor = torch.full((T,), -1, dtype=torch.int64)
    for i in range(0, T - 1, 2):
        anchor[i + 1] = i
    if last_quad == "reference":
        stop = T - 4
    elif last_quad == "process":
        stop = T - 2
    else:
        raise InputError(f"dycoke option ttm_last_quad must be 'reference' or 'process', got {last_quad!r}")
    for i in range(0, max(stop, 0), 4):
        anchor[i + 2] = i
    return anchor


def dycoke_count(
    num_frames: int,
    tokens_per_frame: int,
    retain: float,
    *,
    dycoke_k: float | None = None,
    last_quad: str = "reference",
    count_rule: str = "round",
) -> int:
    """Tokens a ``T × M`` segment keeps under TTM (see the module docstring)."""
    T, M = int(num_frames), int(tokens_per_frame)
    plan = ttm_plan(T, last_quad)
    P = int((plan >= 0).sum())
    W = T - P
    if dycoke_k is not None:
        q = min(M, max(1, int((1.0 - float(dycoke_k)) * M)))
        return W * M + P * q
    return min(T * M, max(W * M + P, retained_count(T, T * M, retain, count_rule)))


def same_position_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of ``a`` and ``b`` ``[M, D]`` row by row (fp32, norms floored at ``1e-6``): ``[M]``."""
    af, bf = a.float(), b.float()
    return (af * bf).sum(-1) / (af.norm(dim=-1).clamp_min(NORM_FLOOR) * bf.norm(dim=-1).clamp_min(NORM_FLOOR))


@dataclass
class DyCoke:
    """Configured DyCoke selector: stage 1 (TTM) before the LLM; with ``dp=True`` also stage 2,
    the decode-time dynamic pruning of the visual KV cache (:class:`~tokensieve.methods.inllm.DyCokeDP`)."""

    dycoke_k: float | None = field(
        default=None,
        metadata={"range": "[0, 1)", "help": "merging ratio K in [0, 1): pruned frames keep floor((1-K)*M); None: from retain"},
    )
    budget: str = field(
        default="uniform",
        metadata={"help": "pruned frames' budgets: 'uniform' or 'fca' (anchor frames always whole)"},
    )
    ttm_op: str = field(
        default="drop", metadata={"help": "dropped tokens: 'drop' (reference) or 'average_into_anchor'"}
    )
    ttm_last_quad: str = field(
        default="reference", metadata={"help": "last quad: 'reference' (i < T-4) or 'process' (every frame i+2)"}
    )
    ttm_pair_source: str = field(
        default="own",
        metadata={"help": "pair similarity: the 'own' pair's (official HEAD), or the 'previous' pair's "
                          "(the official first commit's off-by-one)"},
    )
    ttm_keep_order: str = field(
        default="raster",
        metadata={"help": "order of a pruned frame's kept tokens: 'raster' or 'similarity' (official code)"},
    )
    count_rule: str = field(
        default="round", metadata={"help": "total from retain: 'round' r*N or 'floor' float32(r)*N"}
    )
    dp: bool = field(default=False, metadata={"help": "stage 2: dynamic visual KV pruning while decoding"})
    dp_layer: int = field(default=3, metadata={"range": "[1, inf)", "help": "stage 2: first decoder layer whose visual KV is pruned"})
    dp_prune: float = field(default=0.7, metadata={"range": "[0, 1)", "help": "stage 2: fraction of visual KV hidden on a changed step"})
    dp_threshold: float = field(default=0.9, metadata={"help": "stage 2: cosine below which the selection is redone"})
    dp_stable: str = field(default="reference", metadata={"help": "stage 2 on stable steps: 'reference' or 'reuse_previous'"})
    depth: str = field(default="published", metadata={
        "help": "'published' (dp_layer as given) or 'scaled' (given for 28 layers, placed at the same depth fraction)"})

    def for_depth(self, num_layers: int) -> "DyCoke":
        """This configuration with a concrete ``dp_layer`` for a ``num_layers``-layer model."""
        if self.depth == "published":
            return self
        from .inllm import DYCOKE_REF_DEPTH, scaled_layers

        (layer,) = scaled_layers((self.dp_layer,), num_layers, DYCOKE_REF_DEPTH, low=1)
        return dataclasses.replace(self, dp_layer=layer, depth="published")

    def decode_stage(self) -> DyCokeDP | None:
        """The configured stage 2 (``dp=True``), run by the runtime while decoding."""
        if not self.dp:
            return None
        return DyCokeDP(layer=self.dp_layer, prune=self.dp_prune, threshold=self.dp_threshold, stable=self.dp_stable)

    def __post_init__(self) -> None:
        if not isinstance(self.dp, bool):
            raise InputError(f"dycoke option dp must be True or False, got {self.dp!r}")
        if self.dp:
            self.decode_stage()  # validates the stage-2 options
        if self.dycoke_k is not None:
            k = self.dycoke_k
            if isinstance(k, bool) or not isinstance(k, (int, float)) or math.isnan(k) or not 0.0 <= k < 1.0:
                raise InputError(f"dycoke option dycoke_k must be a merging ratio in [0, 1) or None, got {k!r}")
        validate_choice("dycoke option budget", self.budget, BUDGET_POLICIES)
        validate_choice("dycoke option ttm_op", self.ttm_op, ("drop", "average_into_anchor"))
        validate_choice("dycoke option ttm_last_quad", self.ttm_last_quad, ("reference", "process"))
        validate_choice("dycoke option ttm_pair_source", self.ttm_pair_source, ("own", "previous"))
        validate_choice("dycoke option ttm_keep_order", self.ttm_keep_order, ("raster", "similarity"))
        validate_choice("dycoke option count_rule", self.count_rule, COUNT_RULES)
        validate_choice("dycoke option depth", self.depth, ("published", "scaled"))

    def count(self, num_frames: int, tokens_per_frame: int, retain: float) -> int:
        """Tokens kept for a ``T × M`` segment: see :func:`dycoke_count`."""
        return dycoke_count(
            num_frames, tokens_per_frame, retain,
            dycoke_k=self.dycoke_k, last_quad=self.ttm_last_quad, count_rule=self.count_rule,
        )

    def frame_counts(self, x: torch.Tensor, retain: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame kept counts ``[T]`` and continuous frame shares ``[T]`` for ``x`` ``[T, M, D]``."""
        T, M, _ = x.shape
        plan = ttm_plan(T, self.ttm_last_quad)
        pruned = plan >= 0
        P = int(pruned.sum())
        counts = torch.full((T,), M, dtype=torch.int64)
        if P:
            budget = self.count(T, M, retain) - (T - P) * M
            if self.budget == "fca":
                p = frame_scores(x, tau=TAU).p
                quotas = fca_ratios(p, budget / (P * M)).to(torch.float64)[pruned] * M
                priority = p[pruned]
            else:
                quotas = torch.ones(P, dtype=torch.float64)
                priority = None
            counts[pruned] = apportion(quotas, budget, torch.full((P,), M), priority=priority)
        weights = counts.double() / counts.sum()
        return counts, weights

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, M]`` fp32 same-position cosine of each pruned frame to its reference (0 on anchors)."""
        T, M, _ = x.shape
        plan = ttm_plan(T, self.ttm_last_quad)
        sim = torch.zeros(T, M)
        n_pairs = T // 2
        for t in range(T):
            a = int(plan[t])
            if a < 0:
                continue
            src, ref = t, a
            if self.ttm_pair_source == "previous" and t % 2 == 1:
                j = ((t // 2) - 1) % n_pairs  # previous pair; the first pair uses the last one
                src, ref = 2 * j + 1, 2 * j
            sim[t] = same_position_similarity(x[src], x[ref])
        return sim

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one video ``x`` ``[T, M, D]`` (``features`` ``[K, D]`` only with averaging)."""
        T, M, D = check_segment(x)
        counts, weights = self.frame_counts(x, retain)
        ranking = rank_ascending(self.similarity(x))  # least similar first, ties: smaller m
        keep = gather_per_frame(ranking, counts)
        features = None
        if self.ttm_op == "average_into_anchor":
            features = self._average(x, keep)
        order = None
        if self.ttm_keep_order == "similarity":  # each frame's kept tokens least similar first
            emitted = torch.cat([ranking[t, : int(counts[t])] + t * M for t in range(T)])
            order = torch.searchsorted(keep, emitted)
        return Selection(keep=keep, frame_counts=counts, features=features, frame_weights=weights, order=order)

    def _average(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean of every kept token's group (itself plus the dropped tokens chained to it): ``[K, D]``."""
        T, M, D = x.shape
        plan = ttm_plan(T, self.ttm_last_quad)
        kept = torch.zeros(T * M, dtype=torch.bool)
        kept[keep] = True
        kept = kept.view(T, M)
        m_idx = torch.arange(M).view(1, M).expand(T, M)
        root = torch.arange(T).view(T, 1).expand(T, M).clone()
        for _ in range(T):
            moving = ~kept[root, m_idx]
            if not bool(moving.any()):
                break
            root = torch.where(moving, plan[root], root)
        rep = (root * M + m_idx).reshape(-1)
        sums = torch.zeros(T * M, D).index_add_(0, rep, x.float().reshape(-1, D))
        n = torch.zeros(T * M).index_add_(0, rep, torch.ones(T * M))
        return (sums[keep] / n[keep].unsqueeze(-1)).to(x.dtype)
