"""Reduction before the vision encoder (stage E0 of ``specs/encoder.md``): which frames the tower
encodes, decided from pixels, with every count fixed by the grid and the options alone.

Pure tensor code. An adapter turns a video's pixels into one small *signature* per token frame
(``[T, F]``: patch-mean colours of a LLaVA-OneVision frame, of a Qwen temporal patch), asks
:meth:`EncoderStage.frames_for` how many frames to encode — a function of ``(T, M, retain)``
and the options only, known before the tower runs, as a serving engine must size its
placeholders (vLLM's EVS does the same) — and :func:`choose_frames` which ones; the tower then
runs on those frames alone. Skipping a whole frame is exact for the frames that remain: the
towers attend within a frame (SigLIP) or a temporal patch (the Qwen ViTs) only.

The language model then receives exactly ``round(r·N)`` of the segment's ``N = T·M`` tokens:
the method that follows (any pre-LLM method) chooses them among the encoded frames' tokens
(:func:`budget_within`). :class:`KeyFrames` is the stage on its own: it encodes the fewest
frames that hold the budget and keeps their tokens (evenly thinned in each frame when the
budget is not a whole number of frames).

Frame choice (``policy``):

* ``"dp"`` (default): frame 0 and the ``K−1`` others that minimise ``Σ_t δ(x_t, x_{last kept ≤ t})``
  — exactly the error of showing each skipped frame as the last encoded one — by dynamic
  programming over ``(kept frame, frames left)``, ``O(K·T²)`` on the signatures.
* ``"topk"``: frame 0 and the ``K−1`` frames that differ most from their predecessor, as RLT
  (Choudhury et al., NeurIPS 2024) and vLLM's EVS rank; slow drift never scores.
* ``"uniform"``: ``K`` evenly spaced frames; reads no pixels (a baseline).

``δ(a, b)`` is the mean absolute difference of two signatures. Ties go to the earlier frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, validate_choice
from .baselines import evenly_spaced
from .budget import retained_count, uniform_budget

POLICIES = ("dp", "topk", "uniform")
#: compress(...) keywords that configure the encoder stage of any method
OPTION_NAMES = ("encoder_frames", "encoder_policy")
#: every compress(...) keyword of the vision-encoder stages (frames, merging, the feature cache)
STAGE_OPTIONS = OPTION_NAMES + ("encoder_merge", "encoder_merge_start", "encoder_merge_schedule", "encoder_cache_mb")


def frame_distances(signatures: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` float64 mean absolute difference between every pair of frame signatures ``[T, F]``."""
    x = signatures.to(torch.float64).flatten(1)
    return torch.cdist(x, x, p=1) / max(1, x.shape[1])


def _dp(dist: torch.Tensor, k: int) -> list[int]:
    """Frames ``0 = t₁ < … < t_k`` minimising ``Σ_t dist[t, last kept ≤ t]`` (``specs/encoder.md`` §2a).

    ``w(i, j) = Σ_{i ≤ t < j} dist[t, i]`` is the cost of frame ``i`` standing for ``i … j−1``;
    ``g₁(i) = w(i, T)``, ``g_m(i) = min_{j > i} w(i, j) + g_{m−1}(j)``; the answer is ``g_k(0)``.
    Among equal costs the earliest next frame wins."""
    T = dist.shape[0]
    # w[i, j] for j in (i, T]: prefix sums of column i below the diagonal
    col = torch.tril(dist.T.contiguous()).T  # col[i, t] = dist[t, i] for t >= i, else 0
    w = torch.zeros(T, T + 1, dtype=torch.float64)
    w[:, 1:] = torch.cumsum(col, dim=1)
    inf = float("inf")
    g = w[:, T].clone()  # g_1
    choice: list[torch.Tensor] = []
    idx = torch.arange(T + 1)
    for _m in range(2, k + 1):
        new = torch.full((T,), inf, dtype=torch.float64)
        arg = torch.zeros(T, dtype=torch.int64)
        for i in range(T - 1):
            cand = w[i, i + 1 : T] + g[i + 1 : T]  # next kept frame j in (i, T)
            if cand.numel():
                best = torch.min(cand)
                j = int(idx[i + 1 : T][cand == best][0])  # the earliest of equal costs
                new[i], arg[i] = best, j
        choice.append(arg)
        g = new
    kept = [0]
    for arg in reversed(choice):
        kept.append(int(arg[kept[-1]]))
    return kept


def choose_frames(signatures: torch.Tensor | None, k: int, policy: str = "dp", num_frames: int | None = None) -> torch.Tensor:
    """The ``k`` frames the encoder sees, ascending ``[k]`` int64; frame 0 is always one of them.

    Args:
        signatures: ``[T, F]`` per-frame pixel signatures (``None`` only for ``policy="uniform"``).
        k: frames to keep, in ``[1, T]``.
        policy: ``"dp"``, ``"topk"`` or ``"uniform"`` (module docstring).
        num_frames: ``T`` when no signatures are given.
    """
    validate_choice("encoder_policy", policy, POLICIES)
    T = int(signatures.shape[0]) if signatures is not None else int(num_frames or 0)
    if T < 1 or not 1 <= k <= T:
        raise InputError(f"cannot keep {k} of {T} frames; keep between 1 and T frames of a video with T >= 1")
    if k == T:
        return torch.arange(T, dtype=torch.int64)
    if policy == "uniform":
        return evenly_spaced(T, k) - evenly_spaced(T, k)[0]  # frame 0 first, then centred bins
    if signatures is None:
        raise InputError(f"encoder_policy={policy!r} reads pixels; no frame signatures were given")
    dist = frame_distances(signatures)
    if policy == "topk":
        change = torch.diagonal(dist, offset=-1)  # δ(x_t, x_{t−1}), t = 1 … T−1
        order = torch.sort(-change, stable=True).indices[: k - 1] + 1
        return torch.sort(torch.cat([torch.zeros(1, dtype=torch.int64), order])).values
    return torch.tensor(_dp(dist, k), dtype=torch.int64)


def budget_within(num_frames: int, per_frame: int, retain: float, encoded: int) -> tuple[int, float]:
    """``(K, r′)``: the segment's token budget ``K = round(r·T·M)`` (at least one per frame) and
    the ratio ``r′ = K / (encoded·M)`` that keeps exactly ``K`` of the encoded frames' tokens."""
    k = retained_count(num_frames, num_frames * per_frame, retain)
    if k > encoded * per_frame:
        raise InputError(
            f"retain={retain} keeps {k} of this video's {num_frames}×{per_frame} tokens, more than the "
            f"{encoded} encoded frames hold ({encoded * per_frame}); raise encoder_frames or lower retain"
        )
    return k, k / (encoded * per_frame)


@dataclass(frozen=True)
class EncoderStage:
    """Which frames of each video the vision encoder sees (stage E0).

    Attributes:
        frames: fraction of a video's token frames to encode, in ``(0, 1]``: ``K_t =
            clamp(round(frames·T), 1, T)``. ``None``: the fewest frames that hold the method's
            budget, ``⌈round(r·T·M) / M⌉``.
        policy: ``"dp"``, ``"topk"`` or ``"uniform"``.
    """

    frames: float | None = None
    policy: str = "dp"

    def __post_init__(self) -> None:
        validate_choice("encoder_policy", self.policy, POLICIES)
        if self.frames is not None:
            if isinstance(self.frames, bool) or not isinstance(self.frames, (int, float)) or not (0 < float(self.frames) <= 1):
                raise InputError(f"encoder_frames must be a number in (0, 1] (the fraction of frames encoded), got {self.frames!r}")

    def frames_for(self, num_frames: int, per_frame: int, retain: float, check: bool = True) -> int:
        """How many of a video's ``T`` token frames the encoder sees: pure in ``(T, M, r)`` and the
        options. With ``check`` (a pre-LLM method keeps ``round(r·T·M)`` of the video's tokens
        among them) raises :class:`InputError` when they cannot hold that many."""
        T, M = int(num_frames), int(per_frame)
        k = retained_count(T, T * M, retain)
        if self.frames is None:
            kt = max(1, -(-k // M))
        else:
            kt = min(T, max(1, math.floor(float(self.frames) * T + 0.5)))
        if check:
            budget_within(T, M, retain, kt)  # feasibility, before the encoder runs
        return kt


def check_cache_mb(value: object) -> float:
    """``encoder_cache_mb``: a positive number of megabytes."""
    from .base import as_scalar

    value = as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"encoder_cache_mb must be a positive number of megabytes, got {value!r}")
    return float(value)


def stage_options(options: dict[str, object]) -> tuple[Any, EncoderStage | None, float | None, dict[str, object]]:
    """``compress``'s keywords split into the vision-encoder stages they configure, each checked
    as it is built — ``(MergeSpec or None, EncoderStage or None, encoder_cache_mb or None)`` — and
    the method's own options."""
    from .tome import merge_spec

    merge, rest = merge_spec(options)
    stage, rest = encoder_stage(rest)
    cache_mb = check_cache_mb(rest.pop("encoder_cache_mb")) if "encoder_cache_mb" in rest else None
    return merge, stage, cache_mb, rest


def method_options_only(options: dict[str, object]) -> dict[str, object]:
    """The method's own options of ``compress``'s keywords: the vision-encoder stages' options
    (:data:`STAGE_OPTIONS`, which every method takes) are checked here and left out."""
    return stage_options(options)[3]


def encoder_stage(options: dict[str, object]) -> tuple[EncoderStage | None, dict[str, object]]:
    """Split ``compress``'s keywords into the encoder stage they configure (``encoder_frames``,
    ``encoder_policy``; ``None`` when neither is given) and the method's own options."""
    rest = {k: v for k, v in options.items() if k not in OPTION_NAMES}
    if not any(k in options for k in OPTION_NAMES):
        return None, rest
    from .base import as_scalar

    frames = as_scalar(options.get("encoder_frames"))
    policy = options.get("encoder_policy", "dp")
    return EncoderStage(frames=frames, policy=policy), rest  # type: ignore[arg-type]


@dataclass
class KeyFrames:
    """The encoder stage as a method: encode the fewest frames that hold ``round(r·N)`` tokens,
    chosen from pixels by ``policy``, and hand their tokens to the language model (evenly
    thinned within each frame when the budget is not a whole number of frames)."""

    policy: str = field(default="dp", metadata={"help": "frame choice from pixels: 'dp', 'topk' or 'uniform'"})

    def __post_init__(self) -> None:
        validate_choice("keyframes option policy", self.policy, POLICIES)

    @property
    def encoder(self) -> EncoderStage:
        return EncoderStage(frames=None, policy=self.policy)

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """On the encoded frames ``[K_t, M, D]`` (or, without a stage, a whole segment):
        ``round(r·K_t·M)`` tokens spread evenly over frames and, within a frame, over its raster."""
        T, M, _ = check_segment(x)
        counts = uniform_budget(T, M, retained_count(T, T * M, retain))
        parts = [evenly_spaced(M, int(counts[t])) + t * M for t in range(T)]
        return Selection(keep=torch.cat(parts), frame_counts=counts)
