"""Token budgets: how many tokens a segment keeps, and how they are spread over its frames.

Pure tensor code. Two policies are provided, both usable by any per-frame method:

* ``uniform`` – every frame gets the same share ``r · M`` (remainders go to the earliest frames);
* ``fca``     – VidCom2's *frame compression adjustment*: frames that are more unique with
  respect to the whole video get a larger share (``specs/vidcom2.md`` §3 step 3 and §8).

Exact totals: a segment of ``N = T·M`` content tokens keeps exactly
``retained_count(T, N, r) = clamp(round(r·N), T, N)`` tokens – every frame keeps at least one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError

#: Gaussian bandwidths of VidCom2's multi-scale kernel.
ALPHAS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
#: Softmax temperature of the frame budget.
TAU: float = 0.01
#: Fraction of channels (lowest variance) used for scoring.
CH_RATIO: float = 0.5

COUNT_RULES = ("round", "floor")


def check_retain(retain: object) -> float:
    """Validate a retain ratio (any real scalar: Python, NumPy or a 0-d tensor) and return it as
    a float; raises :class:`InputError`."""
    from .base import as_scalar

    retain = as_scalar(retain)
    if isinstance(retain, bool) or not isinstance(retain, (int, float)):
        raise InputError(f"retain must be a number in (0, 1], got {retain!r} ({type(retain).__name__})")
    value = float(retain)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise InputError(f"retain must be in (0, 1] (the fraction of visual tokens kept), got {retain!r}")
    return value


def retained_count(num_frames: int, num_tokens: int, retain: float, rule: str = "round") -> int:
    """Number of content tokens a segment keeps.

    ``rule="round"`` (default): ``round(r·N)`` with halves rounded up, computed in float64.
    ``rule="floor"``: ``⌊float32(r)·N⌋``, the count used by serving engines that size
    placeholders before the encoder runs. Either way the result is clamped to ``[T, N]``
    so every frame can keep at least one token.
    """
    if num_frames < 1 or num_tokens < num_frames:
        raise InputError(f"a segment needs T >= 1 frames and N >= T tokens, got T={num_frames}, N={num_tokens}")
    if rule == "round":
        k = math.floor(float(retain) * num_tokens + 0.5)
    elif rule == "floor":
        k = math.floor(float(torch.tensor(retain, dtype=torch.float32).item()) * num_tokens)
    else:
        raise InputError(f"count rule must be one of {COUNT_RULES}, got {rule!r}")
    return max(num_frames, min(k, num_tokens))


def apportion(
    quotas: torch.Tensor,
    total: int,
    upper: torch.Tensor,
    priority: torch.Tensor | None = None,
    lower: int | torch.Tensor = 1,
) -> torch.Tensor:
    """Integer budgets ``k`` with ``Σk = total`` and ``lower ≤ k_t ≤ upper_t``, close to ``quotas``.

    Largest-remainder apportionment with bounds (``specs/vidcom2.md`` §7.2):

    1. water-filling: find ``λ`` with ``Σ clip(λ·a_t, lower, upper_t) = total``;
    2. floor the clipped quotas and give the remaining units to the frames with the largest
       fractional part that are below their upper bound; ties go to larger ``priority``,
       then to the smaller frame index.

    Args:
        quotas: ``[T]`` non-negative continuous shares (any scale).
        total: the exact sum required; ``T·lower ≤ total ≤ Σ upper``.
        upper: ``[T]`` per-frame maxima (tokens available in each frame).
        priority: optional ``[T]`` tie-break values (larger wins).
        lower: the per-frame minimum, one integer for all or ``[T]`` integers.
    Returns:
        ``[T]`` int64 budgets.
    """
    a = quotas.detach().to(torch.float64).clamp_min(0.0)
    hi = upper.detach().to(torch.float64)
    T = a.numel()
    if T == 0:
        raise InputError("cannot apportion a budget over zero frames")
    lo = lower.detach().to(torch.float64).clone() if isinstance(lower, torch.Tensor) else torch.full_like(a, float(lower))
    if total < int(lo.sum().item()) or total > int(hi.sum().item()):
        raise InputError(f"budget {total} is outside [{int(lo.sum().item())}, {int(hi.sum().item())}] for {T} frames")
    if float(a.sum()) <= 0.0:
        a = torch.ones_like(a)
    # 1. water-filling for lambda
    fixed = torch.zeros(T, dtype=torch.bool)
    fixed_value = torch.zeros_like(a)
    for _ in range(T + 1):
        free = ~fixed
        free_sum = float(a[free].sum())
        remaining = total - float(fixed_value[fixed].sum())
        lam = remaining / free_sum if free_sum > 0 else 0.0
        q = torch.where(fixed, fixed_value, a * lam)
        newly_hi = free & (q > hi)
        newly_lo = free & (q < lo)
        if not bool(newly_hi.any() or newly_lo.any()):
            break
        # clamp the worst violators on one side at a time (keeps the iteration monotone)
        if bool(newly_hi.any()):
            fixed_value = torch.where(newly_hi, hi, fixed_value)
            fixed = fixed | newly_hi
        else:
            fixed_value = torch.where(newly_lo, lo, fixed_value)
            fixed = fixed | newly_lo
    q = torch.minimum(torch.maximum(q, lo), hi)
    # 2. floors plus largest remainders
    base = torch.floor(q + 1e-9).clamp(max=hi)
    base = torch.maximum(base, lo)
    rest = total - int(base.sum().item())
    if rest < 0:  # numerical corner: take units back from the smallest remainders
        frac = q - base
        order = sorted(range(T), key=lambda t: (float(frac[t]), t))
        for t in order:
            if rest == 0:
                break
            if base[t] > lo[t]:
                base[t] -= 1
                rest += 1
    if rest > 0:
        frac = q - base
        pri = priority.detach().to(torch.float64) if priority is not None else torch.zeros_like(a)
        room = base < hi
        candidates = [t for t in range(T) if bool(room[t])]
        candidates.sort(key=lambda t: (-float(frac[t]), -float(pri[t]), t))
        while rest > 0:
            progressed = False
            for t in candidates:
                if rest == 0:
                    break
                if base[t] < hi[t]:
                    base[t] += 1
                    rest -= 1
                    progressed = True
            if not progressed:  # pragma: no cover - excluded by the bounds check above
                raise RuntimeError("apportionment failed to place every unit")
    return base.to(torch.int64)


def uniform_budget(num_frames: int, tokens_per_frame: int, total: int) -> torch.Tensor:
    """Equal per-frame shares of ``total`` over ``T`` frames of ``M`` tokens; ``[T]`` int64."""
    quotas = torch.full((num_frames,), float(tokens_per_frame))
    upper = torch.full((num_frames,), tokens_per_frame, dtype=torch.int64)
    return apportion(quotas, total, upper)


@dataclass(frozen=True)
class FrameScores:
    """VidCom2 steps 0–3 for one video. Shapes: ``s_vid``/``s_frm`` ``[T, M]``, ``u``/``p`` ``[T]``."""

    s_vid: torch.Tensor
    s_frm: torch.Tensor
    uniqueness: torch.Tensor
    p: torch.Tensor


def _gaussian_sum(z: torch.Tensor, centre: torch.Tensor, alphas: tuple[float, ...]) -> torch.Tensor:
    d2 = (z - centre).pow(2).sum(-1)
    out = torch.zeros_like(d2)
    for alpha in alphas:
        out = out + torch.exp(-d2 / (2.0 * alpha))
    return out


def frame_scores(
    x: torch.Tensor,
    *,
    tau: float = TAU,
    alphas: tuple[float, ...] = ALPHAS,
    ch_ratio: float = CH_RATIO,
) -> FrameScores:
    """VidCom2 scoring of one video ``x`` of shape ``[T, M, D]`` (any float dtype; maths in fp32).

    Low-variance channel subset, unit rows, multi-scale Gaussian similarity to the video
    centre and to each frame centre, frame uniqueness and its temperature softmax.
    """
    if x.dim() != 3:
        raise InputError(f"frame_scores expects a [T, M, D] tensor, got shape {tuple(x.shape)}")
    T, M, D = x.shape
    flat = x.reshape(T * M, D).float()
    n_ch = max(1, int(math.floor(D * ch_ratio)))
    # population variance per channel, two-pass (as accurate as torch.var, ~2x faster on CPU)
    var = (flat - flat.mean(dim=0)).square_().mean(dim=0)
    # smallest variances first, stable so equal variances resolve by channel index; the subset
    # is then read in ascending channel order (the maths is order-free, the gather is faster)
    channels = torch.sort(torch.sort(var, stable=True).indices[:n_ch]).values
    sub = flat.index_select(1, channels)
    z = sub / sub.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = z.view(T, M, n_ch)
    g_v = z.mean(dim=(0, 1))
    g_f = z.mean(dim=1, keepdim=True)
    s_vid = _gaussian_sum(z, g_v, alphas)
    s_frm = _gaussian_sum(z, g_f, alphas)
    u = -s_vid.mean(dim=1)
    p = torch.softmax((u - u.max()) / tau, dim=0)
    return FrameScores(s_vid=s_vid, s_frm=s_frm, uniqueness=u, p=p)


def fca_ratios(p: torch.Tensor, retain: float) -> torch.Tensor:
    """Per-frame ratios ``r_t = min(1, r·(1 + p_t − 1/T))``; ``[T]`` float32."""
    T = p.numel()
    return torch.clamp(retain * (1.0 + p - 1.0 / T), max=1.0)


def fca_budget(
    x: torch.Tensor,
    retain: float,
    *,
    exact: bool = True,
    total: int | None = None,
    count_rule: str = "round",
    scores: FrameScores | None = None,
    tau: float = TAU,
    alphas: tuple[float, ...] = ALPHAS,
    ch_ratio: float = CH_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCA per-frame budgets for one video ``x`` ``[T, M, D]``.

    Returns ``(k, weights)``: ``k`` ``[T]`` int64 token counts and ``weights`` ``[T]`` the
    continuous share of each frame (``r_t·M / Σ r_s·M``).
    ``exact=False`` reproduces the reference rounding ``max(1, round_half_even(r_t·M))``
    (no total guarantee); ``exact=True`` gives exactly ``total`` (default
    :func:`retained_count`) by bounded largest-remainder apportionment, ties to the more
    unique frame, then the earlier one.
    """
    T, M, _ = x.shape
    sc = scores if scores is not None else frame_scores(x, tau=tau, alphas=alphas, ch_ratio=ch_ratio)
    r_t = fca_ratios(sc.p, retain)
    quotas = r_t.to(torch.float64) * M
    weights = quotas / quotas.sum()
    if not exact:
        k = torch.clamp(torch.round(quotas), min=1).to(torch.int64)
        return k, weights
    K = total if total is not None else retained_count(T, T * M, retain, count_rule)
    upper = torch.full((T,), M, dtype=torch.int64)
    k = apportion(quotas, K, upper, priority=sc.p)
    return k, weights


BUDGET_POLICIES = ("uniform", "fca")


def frame_budget(
    x: torch.Tensor,
    retain: float,
    policy: str,
    *,
    count_rule: str = "round",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame budgets ``[T]`` for ``x`` ``[T, M, D]`` under ``policy`` with an exact total."""
    T, M, _ = x.shape
    K = retained_count(T, T * M, retain, count_rule)
    if policy == "uniform":
        k = uniform_budget(T, M, K)
        return k, torch.full((T,), 1.0 / T, dtype=torch.float64)
    if policy == "fca":
        return fca_budget(x, retain, total=K)
    raise InputError(f"unknown budget policy {policy!r}; accepted: {', '.join(BUDGET_POLICIES)}")
