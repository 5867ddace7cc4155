"""LFTR (learning-free token reduction), pre-LLM: temporal merging, then spatial removal.

``specs/lftr.md`` §3. One segment ``x`` of shape ``[T, M, D]`` (post-projector tokens, frame
major, raster order inside a frame) goes through two stages:

1. **temporal** (``similarity`` or ``differential``): every token of frame ``t ≥ 1`` gets a
   redundancy score against the *original* token at the same position of frame ``t − 1``;
   the ``N₀ − K_T`` most redundant tokens are absorbed into the representative of their
   position (a size-weighted running average whose anchor is the earliest member). Frame 0
   is never absorbed.
2. **spatial** (``text`` or ``topic``): each surviving representative gets a significance
   score (cosine to the mean question embedding, or the size-weighted mean encoder attention
   of its members); each anchor frame keeps its top ``k_t`` representatives, with the ``k_t``
   apportioned over frames proportionally to their survivors (``budget="uniform"``) or with
   VidCom2's frame-uniqueness weights (``budget="fca"``).

Counts (all a function of ``(T, M, retain)`` and the options only, see :func:`lftr_counts`):

* **explicit ratios** (``temporal_ratio`` / ``spatial_ratio``, retention fractions, spec
  §3.2–3.3): ``K_T = min(N₀, max(F_T, ⌊ρ_T·N₀⌋))`` and ``K = min(K_T, max(F_S, ⌊ρ_S·K_T⌋))``
  with the ratios quantised to float32 first; the given ratios override ``retain``.
* **derived from ``retain``** (a ratio left at ``None``): ``retain`` is the overall fraction,
  the total is the library's ``retained_count(T, N₀, retain)`` and the stages split it —
  ``split="sqrt"`` sets ``ρ_T = √retain`` (the spec's single-ratio entry point), the spatial
  stage then removes what is left to reach the total. ``retain = 1/16`` reproduces the paper's
  ``T = 25%, S = 25%`` setting.

``F_T = M + (T − 1)·min_per_frame`` (frame 0 is never merged; with ``min_per_frame=1`` each
later frame keeps at least one representative) and ``F_S = max(1, T·min_per_frame)``;
``min_per_frame=0`` is the spec's literal §3.3 (a frame may be emptied by merging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, gather_per_frame, validate_choice
from .budget import COUNT_RULES, TAU, apportion, fca_ratios, frame_scores, retained_count

TEMPORAL_MODES = ("similarity", "differential", "off", "none")
SPATIAL_MODES = ("text", "topic", "off", "none")
NORM_FLOOR = 1e-6


# --- counts ----------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """``value`` rounded to float32 and read back as a Python float (spec §3.3 / vidcom2 §7.1)."""
    return float(torch.tensor(float(value), dtype=torch.float32).item())


def lftr_counts(
    num_frames: int,
    tokens_per_frame: int,
    retain: float,
    *,
    temporal: bool = True,
    spatial: bool = True,
    temporal_ratio: float | None = None,
    spatial_ratio: float | None = None,
    split: str = "sqrt",
    min_per_frame: int = 1,
    count_rule: str = "round",
) -> tuple[int, int]:
    """``(K_T, K)``: tokens after the temporal stage and in the end, for a ``T × M`` segment.

    Ratios are *retention* fractions (already converted if the caller uses ``"remove"``
    semantics). See the module docstring for the rule; the result depends only on the
    arguments, so engines can size placeholders before the encoder runs.
    """
    T, M = int(num_frames), int(tokens_per_frame)
    N0 = T * M
    target = retained_count(T, N0, retain, count_rule)
    floor_t = M + (T - 1) * min_per_frame
    floor_s = max(1, T * min_per_frame)
    if temporal and T > 1:
        if temporal_ratio is not None:
            K_T = min(N0, max(floor_t, math.floor(_f32(temporal_ratio) * N0)))
        elif spatial and spatial_ratio is None and split == "sqrt":
            # the spatial stage must still be able to reach the exact total
            K_T = min(N0, max(floor_t, math.floor(_f32(math.sqrt(retain)) * N0), target))
        elif spatial and spatial_ratio is not None:
            # spatial ratio fixed: the temporal stage takes what makes ρ_T·ρ_S ≈ retain
            rho_t = min(1.0, retain / _f32(spatial_ratio))
            K_T = min(N0, max(floor_t, math.floor(_f32(rho_t) * N0)))
        else:  # temporal alone (or split="temporal_only") aims at the total itself
            K_T = min(N0, max(floor_t, target))
    else:
        K_T = N0
    if not spatial:
        return K_T, K_T
    if spatial_ratio is not None:
        K = min(K_T, max(floor_s, math.floor(_f32(spatial_ratio) * K_T)))
    else:
        K = min(K_T, target)
    return K_T, K


# --- temporal stage ------------------------------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row cosine over the last dim with norms floored at ``1e-6``; inputs fp32 ``[..., D]``."""
    na = a.norm(dim=-1).clamp_min(NORM_FLOOR)
    nb = b.norm(dim=-1).clamp_min(NORM_FLOOR)
    return (a * b).sum(-1) / (na * nb)


def temporal_scores(x: torch.Tensor, mode: str = "similarity") -> torch.Tensor:
    """Redundancy ``ψ`` ``[T − 1, M]`` of frames ``1..T−1`` against the previous raw frame.

    ``similarity``: ``cos(x[t, m], x[t−1, m])``; ``differential``:
    ``−‖x[t, m] − x[t−1, m]‖₂ / √D`` on the raw features. Higher means more redundant.
    Args: ``x`` ``[T, M, D]`` (any float dtype; computed in fp32).
    """
    xf = x.float()
    D = xf.shape[-1]
    if mode == "similarity":
        return _cosine(xf[1:], xf[:-1])
    if mode == "differential":
        return -(xf[1:] - xf[:-1]).norm(dim=-1) / math.sqrt(D)
    raise InputError(f"lftr temporal score must be 'similarity' or 'differential', got {mode!r}")


def temporal_absorb(
    scores: torch.Tensor, n_merge: int, scope: str = "global", min_per_frame: int = 1
) -> torch.Tensor:
    """Which tokens are absorbed by the temporal stage: ``[T, M]`` bool (row 0 always False).

    Args:
        scores: ``[T − 1, M]`` redundancy of frames ``1..T−1`` (higher merges first).
        n_merge: tokens to absorb, ``0 ≤ n_merge ≤ (T − 1)·(M − min_per_frame)``.
        scope: ``"global"`` – the ``n_merge`` highest over all frames, ties to the earlier
            frame then the smaller position; ``"per_frame"`` – ``⌊n_merge/(T−1)⌋`` per frame,
            the remainder to the earliest frames.
        min_per_frame: 1 keeps each frame's least redundant token (the last in the order
            above) out of the candidates, so no frame is emptied; 0 allows it.
    """
    Tm1, M = scores.shape
    absorbed = torch.zeros(Tm1 + 1, M, dtype=torch.bool)
    if n_merge <= 0 or Tm1 == 0:
        return absorbed
    cap = M - min_per_frame
    if n_merge > Tm1 * cap:
        raise InputError(f"cannot merge {n_merge} tokens from {Tm1} frames of {M} (at most {Tm1 * cap})")
    neg = -scores.float()
    if scope == "global":
        order = torch.sort(neg.flatten(), stable=True).indices  # ties: earlier (t, m)
        if min_per_frame > 0:
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            protected = torch.zeros(Tm1 * M, dtype=torch.bool)
            last = rank.view(Tm1, M).argmax(dim=1) + torch.arange(Tm1) * M
            protected[last] = True
            order = order[~protected[order]]
        chosen = order[:n_merge]
        flat = absorbed[1:].reshape(-1).clone()
        flat[chosen] = True
        absorbed[1:] = flat.view(Tm1, M)
        return absorbed
    if scope == "per_frame":
        base, rem = divmod(n_merge, Tm1)
        order = torch.sort(neg, dim=1, stable=True).indices
        for t in range(Tm1):
            c = base + (1 if t < rem else 0)
            absorbed[t + 1, order[t, :c]] = True
        return absorbed
    raise InputError(f"lftr option temporal_scope must be 'global' or 'per_frame', got {scope!r}")


@dataclass(frozen=True)
class Merged:
    """Output of :func:`temporal_merge`. Shapes ``[T, M, D]`` / ``[T, M]``.

    Attributes:
        features: fp32 representative embedding at each *surviving* position (rows of
            absorbed positions are meaningless).
        sizes: original tokens represented at each surviving position (0 at absorbed ones).
        anchor: ``[T, M]`` int64 frame index of each token's representative (its own frame
            if it survives).
        alive: ``[T, M]`` bool, the surviving positions (``~absorbed``).
    """

    features: torch.Tensor
    sizes: torch.Tensor
    anchor: torch.Tensor
    alive: torch.Tensor


def temporal_merge(x: torch.Tensor, absorbed: torch.Tensor, sizes: torch.Tensor | None = None) -> Merged:
    """Size-weighted running-average merge along time at each grid position (spec §3.4).

    Each maximal run "surviving token, then consecutive absorbed tokens" at position ``m``
    becomes one representative at the survivor's place, whose embedding is the size-weighted
    mean of the run. Args: ``x`` ``[T, M, D]``; ``absorbed`` ``[T, M]`` bool with row 0 False;
    ``sizes`` ``[T, M]`` (default all ones).
    """
    T, M, D = x.shape
    if bool(absorbed[0].any()):
        raise InputError("frame 0 has no predecessor and cannot be absorbed")
    xf = x.float()
    s = torch.ones(T, M) if sizes is None else sizes.float()
    alive = ~absorbed
    t_idx = torch.arange(T).view(T, 1).expand(T, M)
    anchor = torch.cummax(torch.where(alive, t_idx, torch.full_like(t_idx, -1)), dim=0).values
    rep = (anchor * M + torch.arange(M).view(1, M)).reshape(-1)
    sums = torch.zeros(T * M, D).index_add_(0, rep, (s.unsqueeze(-1) * xf).reshape(-1, D))
    size = torch.zeros(T * M).index_add_(0, rep, s.reshape(-1))
    mu = sums / size.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return Merged(features=mu.view(T, M, D), sizes=size.view(T, M), anchor=anchor, alive=alive)


def representative_mean(values: torch.Tensor, merged: Merged, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Size-weighted mean of a per-token signal ``[T, M]`` over each representative's members."""
    T, M = values.shape
    s = torch.ones(T, M) if sizes is None else sizes.float()
    rep = (merged.anchor * M + torch.arange(M).view(1, M)).reshape(-1)
    sums = torch.zeros(T * M).index_add_(0, rep, (s * values.float()).reshape(-1))
    return (sums / merged.sizes.reshape(-1).clamp_min(torch.finfo(torch.float32).tiny)).view(T, M)


# --- spatial stage -------------------------------------------------------------------------------


def text_scores(features: torch.Tensor, text: torch.Tensor, agg: str = "mean") -> torch.Tensor:
    """Query relevance of visual tokens (spec §3.5.2). Returns fp32 ``[...]``.

    ``agg="mean"``: ``cos(f, q̄)`` with ``q̄`` the mean of the question embeddings;
    ``agg="max"``: ``max_i cos(f, e_i)``. Norms floored at ``1e-6``.
    Args: ``features`` ``[..., D]``; ``text`` ``[Q, D]`` (``Q ≥ 1``) in the same space.
    """
    f = features.float()
    q = text.float()
    if agg == "mean":
        return _cosine(f, q.mean(dim=0))
    if agg == "max":
        fn = f / f.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        return (fn @ qn.T).max(dim=-1).values
    raise InputError(f"lftr option text_agg must be 'mean' or 'max', got {agg!r}")


def spatial_keep(
    scores: torch.Tensor, alive: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Per-frame top-``k_t`` of the surviving positions: ``[T, M]`` bool.

    Args: ``scores`` ``[T, M]`` (higher kept; ties to the smaller position), ``alive`` ``[T, M]``
    bool, ``counts`` ``[T]`` with ``k_t ≤ Σ_m alive[t]``.
    """
    key = torch.where(alive, -scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))
    order = torch.sort(key, dim=1, stable=True).indices
    T, M = scores.shape
    keep = torch.zeros(T * M, dtype=torch.bool)
    keep[gather_per_frame(order, counts)] = True
    return keep.view(T, M)


def spatial_keep_global(
    scores: torch.Tensor, alive: torch.Tensor, total: int, min_per_frame: int = 1
) -> torch.Tensor:
    """Top-``total`` surviving positions over the whole segment: ``[T, M]`` bool.

    With ``min_per_frame=1`` every frame with survivors first keeps its best one, the rest
    goes by the global order (ties to the earlier frame, then the smaller position).
    """
    T, M = scores.shape
    key = torch.where(alive, -scores.float(), torch.full((T, M), float("inf"))).reshape(-1)
    order = torch.sort(key, stable=True).indices
    keep = torch.zeros(T * M, dtype=torch.bool)
    if min_per_frame > 0:
        first = torch.sort(key.view(T, M), dim=1, stable=True).indices[:, 0] + torch.arange(T) * M
        first = first[alive.any(dim=1)]
        keep[first] = True
    room = total - int(keep.sum())
    rest = order[~keep[order]][:room]
    keep[rest] = True
    return keep.view(T, M)


def merge_dropped(features: torch.Tensor, sizes: torch.Tensor, alive: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``spatial_op="merge"``: average each dropped survivor into its most similar kept one.

    Within each frame, every survivor not kept joins the kept survivor of highest cosine
    (ties to the smaller position), size-weighted. Args: ``features`` fp32 ``[T, M, D]``,
    ``sizes``/``alive``/``kept`` ``[T, M]``. Returns the updated fp32 ``[T, M, D]``.
    """
    out = features.clone()
    T = features.shape[0]
    for t in range(T):
        k_idx = torch.nonzero(kept[t], as_tuple=True)[0]
        d_idx = torch.nonzero(alive[t] & ~kept[t], as_tuple=True)[0]
        if k_idx.numel() == 0 or d_idx.numel() == 0:
            continue
        fk, fd = features[t, k_idx], features[t, d_idx]
        nk = fk / fk.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        nd = fd / fd.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        target = (nd @ nk.T).argmax(dim=1)  # first maximum: smaller position
        sk, sd = sizes[t, k_idx].float(), sizes[t, d_idx].float()
        acc = (sk.unsqueeze(-1) * fk).index_add_(0, target, sd.unsqueeze(-1) * fd)
        tot = sk.clone().index_add_(0, target, sd)
        out[t, k_idx] = acc / tot.unsqueeze(-1)
    return out


# --- the method ---------------------------------------------------------------------------------


@dataclass
class LFTR:
    """Configured LFTR selector (``specs/lftr.md`` §3).

    Options follow spec §3.9; the ones that need signals the pure interface does not carry
    (pixel differences, the spatial-first order, threshold merging with a data-dependent
    count) are not offered. Encoder-side choices (``topic_source``, SigLIP probe input,
    frame-mean query) belong to the model adapter, which supplies
    ``context.encoder_attention``.
    """

    temporal: str = field(
        default="similarity",
        metadata={"help": "temporal stage: 'similarity', 'differential' or 'off' ('none')"},
    )
    spatial: str = field(
        default="text",
        metadata={"help": "spatial stage: 'text', 'topic' or 'off' ('none')"},
    )
    temporal_ratio: float | None = field(
        default=None,
        metadata={"range": "[1e-6, 1]", "help": "temporal retention fraction in [1e-6, 1]; None: derived from retain"},
    )
    spatial_ratio: float | None = field(
        default=None,
        metadata={"range": "[1e-6, 1]", "help": "spatial retention fraction of the temporal output; None: derived from retain"},
    )
    split: str = field(
        default="sqrt",
        metadata={"help": "retain split when no ratio is given: 'sqrt' (rho_T = sqrt(retain)) or 'temporal_only'"},
    )
    rate_semantics: str = field(
        default="retain",
        metadata={"help": "explicit ratios are 'retain' fractions or 'remove' fractions"},
    )
    temporal_scope: str = field(
        default="global",
        metadata={"help": "temporal budget: 'global' or 'per_frame'"},
    )
    text_agg: str = field(
        default="mean",
        metadata={"help": "text score: cosine to the 'mean' question embedding, or 'max' over question tokens"},
    )
    spatial_scope: str = field(
        default="per_frame",
        metadata={"help": "spatial selection: 'per_frame' or 'global'"},
    )
    spatial_op: str = field(
        default="drop",
        metadata={"help": "removed tokens are dropped ('drop') or averaged into the most similar kept one ('merge')"},
    )
    budget: str = field(
        default="uniform",
        metadata={"help": "spatial per-frame budget: 'uniform' (proportional to survivors) or 'fca'"},
    )
    min_per_frame: int = field(
        default=1,
        metadata={"range": "[0, 1]", "help": "1: every frame keeps a token; 0: spec-literal counts (merging may empty a frame)"},
    )
    count_rule: str = field(
        default="round",
        metadata={"help": "total when derived from retain: 'round' r*N or 'floor' float32(r)*N"},
    )

    def __post_init__(self) -> None:
        validate_choice("lftr option temporal", self.temporal, TEMPORAL_MODES)
        validate_choice("lftr option spatial", self.spatial, SPATIAL_MODES)
        validate_choice("lftr option split", self.split, ("sqrt", "temporal_only"))
        validate_choice("lftr option rate_semantics", self.rate_semantics, ("retain", "remove"))
        validate_choice("lftr option temporal_scope", self.temporal_scope, ("global", "per_frame"))
        validate_choice("lftr option text_agg", self.text_agg, ("mean", "max"))
        validate_choice("lftr option spatial_scope", self.spatial_scope, ("per_frame", "global"))
        validate_choice("lftr option spatial_op", self.spatial_op, ("drop", "merge"))
        validate_choice("lftr option budget", self.budget, ("uniform", "fca"))
        validate_choice("lftr option count_rule", self.count_rule, COUNT_RULES)
        if isinstance(self.min_per_frame, bool) or self.min_per_frame not in (0, 1):
            raise InputError(f"lftr option min_per_frame must be 0 or 1, got {self.min_per_frame!r}")
        for name in ("temporal_ratio", "spatial_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            if self.rate_semantics == "retain" and not (ok and 0.0 < value <= 1.0):
                raise InputError(f"lftr option {name} must be a retention fraction in (0, 1] or None, got {value!r}")
            if self.rate_semantics == "remove" and not (ok and 0.0 <= value < 1.0):
                raise InputError(f"lftr option {name} must be a removal fraction in [0, 1) or None, got {value!r}")

    # -- configuration helpers --

    @property
    def temporal_on(self) -> bool:
        return self.temporal not in ("off", "none")

    @property
    def spatial_on(self) -> bool:
        return self.spatial not in ("off", "none")

    @property
    def needs_text(self) -> bool:
        """Whether this configuration reads ``context.text``."""
        return self.spatial == "text"

    @property
    def needs_encoder_attention(self) -> bool:
        """Whether this configuration reads ``context.encoder_attention``."""
        return self.spatial == "topic"

    def _retention(self, value: float | None) -> float | None:
        if value is None:
            return None
        return float(value) if self.rate_semantics == "retain" else 1.0 - float(value)

    def counts(self, num_frames: int, tokens_per_frame: int, retain: float) -> tuple[int, int]:
        """``(K_T, K)`` for a ``T × M`` segment: see :func:`lftr_counts`."""
        return lftr_counts(
            num_frames,
            tokens_per_frame,
            retain,
            temporal=self.temporal_on,
            spatial=self.spatial_on,
            temporal_ratio=self._retention(self.temporal_ratio),
            spatial_ratio=self._retention(self.spatial_ratio),
            split=self.split,
            min_per_frame=self.min_per_frame,
            count_rule=self.count_rule,
        )

    # -- selection --

    def _spatial_scores(self, merged: Merged, x: torch.Tensor, context: SegmentContext | None) -> torch.Tensor:
        T, M, D = x.shape
        if self.spatial == "text":
            text = context.text if context is not None else None
            if text is None or text.numel() == 0:
                raise InputError("method 'lftr' with spatial='text' needs the question text (question embeddings)")
            if text.dim() != 2 or text.shape[1] != D:
                raise InputError(f"lftr: question text must be [Q, {D}] embeddings, got {tuple(text.shape)}")
            return text_scores(merged.features, text, self.text_agg)
        attn = context.encoder_attention if context is not None else None
        if attn is None:
            raise InputError("method 'lftr' with spatial='topic' needs the vision-encoder attention")
        if tuple(attn.shape) != (T, M):
            raise InputError(f"lftr: vision-encoder attention must be [{T}, {M}], got {tuple(attn.shape)}")
        a = attn.float()
        if self.spatial_scope == "global":  # topic scores are compared across frames
            a = a / a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return representative_mean(a, merged)

    def _frame_counts(
        self, x: torch.Tensor, alive: torch.Tensor, K_T: int, K: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = alive.sum(dim=1)
        if self.budget == "fca":
            p = frame_scores(x, tau=TAU).p
            r_t = fca_ratios(p, K / K_T).to(torch.float64)
            quotas = r_t * n.double()
            priority = p
        else:
            quotas = n.double()
            priority = n.double()
        k = apportion(quotas, K, n, priority=priority, lower=self.min_per_frame)
        return k, quotas / quotas.sum().clamp_min(1e-300)

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one segment ``x`` ``[T, M, D]``; merged embeddings in ``features`` ``[K, D]``."""
        T, M, D = check_segment(x)
        N0 = T * M
        K_T, K = self.counts(T, M, retain)
        merged_any = False
        if self.temporal_on and T > 1 and K_T < N0:
            psi = temporal_scores(x, self.temporal)
            absorbed = temporal_absorb(psi, N0 - K_T, self.temporal_scope, self.min_per_frame)
            merged_any = True
        else:
            absorbed = torch.zeros(T, M, dtype=torch.bool)
        merged = temporal_merge(x, absorbed)
        alive = merged.alive
        weights: torch.Tensor | None = None
        if self.spatial_on and K < K_T:
            scores = self._spatial_scores(merged, x, context)
            if self.spatial_scope == "global":
                kept = spatial_keep_global(scores, alive, K, self.min_per_frame)
            else:
                counts, weights = self._frame_counts(x, alive, K_T, K)
                kept = spatial_keep(scores, alive, counts)
            features = merged.features
            if self.spatial_op == "merge":
                features = merge_dropped(features, merged.sizes, alive, kept)
                merged_any = True
        else:  # nothing to remove: the spatial signal is not read
            kept = alive
            features = merged.features
        keep = torch.nonzero(kept.reshape(-1), as_tuple=True)[0]
        frame_counts = kept.sum(dim=1).to(torch.int64)
        out = features.reshape(N0, D)[keep].to(x.dtype) if merged_any else None
        return Selection(keep=keep, frame_counts=frame_counts, features=out, frame_weights=weights)
