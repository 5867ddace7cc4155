"""VisionZip, pre-LLM: dominant tokens by encoder attention plus merged contextual tokens.

``specs/baselines.md`` §3, run per frame (the spec's video use): each frame ``t`` gets a budget
``k_t`` from the budget policy (``uniform`` or ``fca``), split into

* ``d_t = ⌊k_t · 5.4 / 6.4⌋ = ⌊27·k_t / 32⌋`` **dominant** tokens: the frame's highest
  vision-encoder attention (``context.encoder_attention``), ties to the smaller position;
* ``c_t = k_t − d_t`` **contextual** tokens: from the remaining tokens in raster order, the
  targets sit at a uniform stride ``max(1, ⌊N_rem / c_t⌋)`` (the first ``c_t`` of
  ``0, step, 2·step, …``); every other remaining token joins the target of highest cosine
  similarity (ties to the earlier target), and the contextual embedding is the target's
  embedding **plus** the mean of its assignees (the reference rule; a target without
  assignees is unchanged) or, with ``contextual_op="mean"``, the mean of the whole group.

A contextual token sits at its target's position (so with M-RoPE it carries the target's
ids). The runtime lays kept tokens out in raster order, so the reference's "dominant first,
then contextual" sequence order is not reproduced; the set and the embeddings are.
The similarity is measured on the segment's own (post-projector) tokens, since the
encoder's keys are not part of the method interface; the official code merges before the
projector, on the encoder's keys (with an MLP projector the merged features lie about 6%
relative L2 apart). The official code also counts and keeps [CLS] inside its "54 + 10"
(CLS + 53 patches + 10 contextual); the supported towers have no [CLS], so every dominant
slot goes to a patch token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, validate_choice
from .budget import BUDGET_POLICIES, COUNT_RULES, frame_budget

NORM_FLOOR = 1e-6


def visionzip_split(k: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget of ``k`` tokens: ``⌊27k/32⌋`` and the rest (54 + 10 for 64)."""
    dominant = (27 * int(k)) // 32
    return dominant, int(k) - dominant


def contextual_merge(
    rest: torch.Tensor, count: int, op: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``rest`` ``[N, D]`` (the non-dominant tokens, raster order) into ``count`` tokens.

    Returns ``(targets, features)``: ``targets`` ``[count]`` int64 ascending row indices into
    ``rest`` (the uniform-stride targets) and ``features`` fp32 ``[count, D]``, each
    ``target + mean(assignees)`` (``op="reference"``) or ``mean(target ∪ assignees)``
    (``op="mean"``). Assignment is by maximum cosine, ties to the earlier target.
    """
    N, D = rest.shape
    if not 1 <= count <= N:
        raise InputError(f"contextual count must be in [1, {N}], got {count}")
    step = max(1, N // count)
    targets = torch.arange(count, dtype=torch.int64) * step
    xf = rest.float()
    is_target = torch.zeros(N, dtype=torch.bool)
    is_target[targets] = True
    others = torch.nonzero(~is_target, as_tuple=True)[0]
    base = xf[targets]
    if others.numel() == 0:
        return targets, base.clone()
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    assign = (unit[others] @ unit[targets].T).argmax(dim=1)  # first maximum: earlier target
    sums = torch.zeros(count, D).index_add_(0, assign, xf[others])
    n = torch.zeros(count).index_add_(0, assign, torch.ones(others.numel()))
    if op == "reference":
        feats = base + sums / n.clamp_min(1.0).unsqueeze(-1)
    elif op == "mean":
        feats = (base + sums) / (n + 1.0).unsqueeze(-1)
    else:
        raise InputError(f"visionzip option contextual_op must be 'reference' or 'mean', got {op!r}")
    return targets, feats


@dataclass
class VisionZip:
    """Configured VisionZip selector (per frame, exact total ``retained_count(T, T·M, retain)``)."""

    budget: str = field(default="uniform", metadata={"help": "per-frame budget policy: 'uniform' or 'fca'"})
    dominant_score: str = field(
        default="attention",
        metadata={"help": "dominant ranking: vision-encoder 'attention', or 'norm' (feature L2 norm proxy)"},
    )
    contextual_op: str = field(
        default="reference",
        metadata={"help": "contextual embedding: 'reference' (target + mean of assignees) or 'mean' (group mean)"},
    )
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        validate_choice("visionzip option budget", self.budget, BUDGET_POLICIES)
        validate_choice("visionzip option dominant_score", self.dominant_score, ("attention", "norm"))
        validate_choice("visionzip option contextual_op", self.contextual_op, ("reference", "mean"))
        validate_choice("visionzip option count_rule", self.count_rule, COUNT_RULES)

    @property
    def needs_text(self) -> bool:
        """VisionZip never reads the question."""
        return False

    @property
    def needs_encoder_attention(self) -> bool:
        """Whether this configuration reads ``context.encoder_attention``."""
        return self.dominant_score == "attention"

    def _scores(self, x: torch.Tensor, context: SegmentContext | None) -> torch.Tensor:
        T, M, _ = x.shape
        if self.dominant_score == "norm":
            return x.float().norm(dim=-1)
        attn = context.encoder_attention if context is not None else None
        if attn is None:
            raise InputError("method 'visionzip' needs the vision-encoder attention")
        if tuple(attn.shape) != (T, M):
            raise InputError(f"visionzip: vision-encoder attention must be [{T}, {M}], got {tuple(attn.shape)}")
        return attn.float()

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one segment ``x`` ``[T, M, D]``; embeddings of all kept tokens in ``features`` ``[K, D]``."""
        T, M, D = check_segment(x)
        scores = self._scores(x, context)
        k, weights = frame_budget(x, retain, self.budget, count_rule=self.count_rule)
        order = torch.sort(-scores, dim=1, stable=True).indices  # best first, ties: smaller m
        keep_parts: list[torch.Tensor] = []
        feat_parts: list[torch.Tensor] = []
        for t in range(T):
            d, c = visionzip_split(int(k[t]))
            dominant = order[t, :d]
            is_dom = torch.zeros(M, dtype=torch.bool)
            is_dom[dominant] = True
            rest = torch.nonzero(~is_dom, as_tuple=True)[0]
            targets, ctx_feats = contextual_merge(x[t, rest], c, self.contextual_op)
            local = torch.cat([dominant, rest[targets]])
            feats = torch.cat([x[t, dominant].float(), ctx_feats])
            srt = torch.sort(local)
            keep_parts.append(srt.values + t * M)
            feat_parts.append(feats[srt.indices])
        keep = torch.cat(keep_parts)
        features = torch.cat(feat_parts).to(x.dtype)
        return Selection(keep=keep, frame_counts=k, features=features, frame_weights=weights)
