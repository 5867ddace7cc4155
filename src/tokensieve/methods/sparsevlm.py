"""SparseVLM (and SparseVLM+, ``variant="v2"``), in-LLM and text-guided: the pure-tensor parts.

``specs/sparsevlm.md``. The runtime runs the decoder layer by layer; at each pruning layer it
computes the post-softmax attention rows of the *rater* text tokens (fp32, from the layer's
own post-RoPE Q and K, over all keys) and calls the functions here with plain tensors:

1. :func:`select_raters` – once, before layer 0, from the input embeddings (§2.1);
2. :func:`significance` – per pruning layer, the rater-averaged attention on each visual
   token (§2.2), optionally with SparseVLM+'s gravity correction (:func:`rope_gravity`) and
   priority heads (§7);
3. a keep count – from a fixed schedule (:data:`SCHEDULES`, :func:`schedule_for`), a ratio
   schedule for other models (:func:`ratio_schedule`, §3.3) or the rank of the rater
   attention (:func:`rank_keep`, §3.2); the runtime keeps the top-``k`` by significance,
   ties to the smaller index, in the original order (§2.3);
4. :func:`recycle` – the pruned tokens' DPC-kNN merge (§4), inserted after the kept visual
   tokens and before the text.

Book-keeping: :func:`simulate_schedule` (per-layer counts with the §4 recycling rule),
:func:`equivalent_tokens` (§8) and :func:`prefill_flops` (§9).

Conventions: every score is computed in fp32 (rotary kernels and counts in float64);
orderings are stable, ties go to the smaller index; nothing here is random unless a
``seed`` is given. Pure tensor code, no transformers import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .base import validate_choice
from .budget import check_retain
from .inllm import InLLMMethod, PruneContext, SampleLayout, check_layers, prefill_flops  # noqa: F401 - §9

#: Pruning layers of v1.5 and v2 (§1).
PRUNING_LAYERS: tuple[int, ...] = (2, 6, 15)
#: Pruning layers of v1.0 (arXiv v1, rank-based budgets).
PRUNING_LAYERS_V1_0: tuple[int, ...] = (2, 6, 15, 19)
#: The geometry the reference schedules were written for: LLaVA-1.5 (576 visual tokens, 32 layers).
REFERENCE_V0: int = 576
REFERENCE_NUM_LAYERS: int = 32

#: Keep-k at layers 2, 6, 15 per variant and target (§3.1). ``"v1.5"`` 96 is the main-branch table.
SCHEDULES: dict[str, dict[int, tuple[int, ...]]] = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
#: ``(scale, bias)`` of the v1.0 rank budget ``keep = ⌊scale·rank + bias⌋`` per target (§3.2).
RANK_SCALE_BIAS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}

VARIANTS: tuple[str, ...] = ("v1.0", "v1.5", "v2")
_VARIANT_ALIASES = {"v1.0": "v1.0", "v1": "v1.0", "v1.5": "v1.5", "v2": "v2", "v2.0": "v2"}

#: Recycling: candidate share τ and cluster share θ (§4).
RECYCLE_TAU: float = 0.3
RECYCLE_THETA: float = 0.1
#: Amplitude of the reference's density tie-break noise, ``U(0, 1)·1e-6`` (used only with a seed).
DENSITY_NOISE: float = 1e-6
#: SparseVLM+ defaults (§7).
PRIORITY_HEADS: int = 14
GRAVITY_FLOOR: float = 1.0
ROPE_THETA: float = 10000.0

MERGES: tuple[str, ...] = ("mean", "sum")
RANK_FORMS: tuple[str, ...] = ("paper", "v1code")
BUDGETS: tuple[str, ...] = ("schedule", "ratio", "rank")
POSITIONS: tuple[str, ...] = ("compact", "preserve")


def canonical_variant(variant: str) -> str:
    """``"v1.0"``, ``"v1.5"`` or ``"v2"`` (``"v1"`` and ``"v2.0"`` are accepted spellings)."""
    try:
        return _VARIANT_ALIASES[variant]
    except (KeyError, TypeError):
        raise InputError(f"sparsevlm variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --- §2.1 raters -------------------------------------------------------------------------------


def rater_relevance(h_visual: torch.Tensor, h_text: torch.Tensor) -> torch.Tensor:
    """Relevance of each text token to the image, ``r = mean_v softmax_t(Hᵥ·H_tᵀ)`` (§2.1).

    Args:
        h_visual: ``[V0, D]`` layer-0 input embeddings of the visual tokens (all visual blocks).
        h_text: ``[Nt, D]`` layer-0 embeddings of every token after the last visual token
            (question, instruction suffix and chat template; not the system prompt).
    Returns:
        ``[Nt]`` fp32, non-negative, summing to 1. Raw dot products: no ``1/√D``, no temperature.
    """
    if not isinstance(h_visual, torch.Tensor) or h_visual.dim() != 2 or h_visual.shape[0] < 1:
        raise InputError(f"h_visual must be a [V0, D] tensor with V0 >= 1, got {_shape(h_visual)}")
    if not isinstance(h_text, torch.Tensor) or h_text.dim() != 2 or h_text.shape[0] < 1:
        raise InputError(
            f"h_text must be a [Nt, D] tensor with Nt >= 1 (SparseVLM needs text after the image), got {_shape(h_text)}"
        )
    if h_visual.shape[1] != h_text.shape[1]:
        raise InputError(f"h_visual and h_text must share the hidden size, got {h_visual.shape[1]} and {h_text.shape[1]}")
    g = h_visual.float() @ h_text.float().T
    return torch.softmax(g, dim=1).mean(dim=0)


def raters_from_relevance(r: torch.Tensor) -> torch.Tensor:
    """``{i : r_i > mean(r)}`` (strict), ``[R]`` int64 ascending.

    Degenerate case: when no entry is strictly above the mean (every ``r_i`` equal, e.g. a
    single text token), **every** text token is a rater, so scoring stays defined.
    """
    if not isinstance(r, torch.Tensor) or r.dim() != 1 or r.numel() < 1:
        raise InputError(f"relevance must be a non-empty [Nt] tensor, got {_shape(r)}")
    rf = r.float()
    idx = torch.nonzero(rf > rf.mean(), as_tuple=True)[0]
    if idx.numel() == 0:
        return torch.arange(r.numel(), dtype=torch.int64)
    return idx.to(torch.int64)


def select_raters(h_visual: torch.Tensor, h_text: torch.Tensor) -> torch.Tensor:
    """The rater text tokens (§2.1): ``[R]`` int64 ascending indices **relative to the text start**.

    ``h_visual`` ``[V0, D]`` and ``h_text`` ``[Nt, D]`` as in :func:`rater_relevance`. The set is
    fixed for the whole prefill; at each layer the runtime re-offsets it by the current text
    start. If no text token is strictly above the mean relevance, all ``Nt`` are returned.
    """
    return raters_from_relevance(rater_relevance(h_visual, h_text))


# --- §2.2 + §7 significance --------------------------------------------------------------------


def head_count(heads: int | float | None, num_heads: int) -> int:
    """Heads averaged by :func:`significance`.

    ``None`` → all ``H``; an int ``k >= 1`` → ``min(k, H)`` (the reference's 14 on a model with
    fewer heads means all of them); a float in ``(0, 1]`` → ``max(1, round(heads·H))``, halves up.
    """
    if heads is None:
        return num_heads
    if _is_int(heads):
        if heads < 1:
            raise InputError(f"priority heads must be an int >= 1, a fraction in (0, 1] or None, got {heads!r}")
        return min(int(heads), num_heads)
    if isinstance(heads, float):
        if not (0.0 < heads <= 1.0):
            raise InputError(f"a fraction of priority heads must be in (0, 1], got {heads!r}")
        return max(1, min(num_heads, math.floor(heads * num_heads + 0.5)))
    raise InputError(f"priority heads must be an int >= 1, a fraction in (0, 1] or None, got {heads!r}")


def significance(
    attn: torch.Tensor,
    visual_cols: torch.Tensor | None = None,
    *,
    heads: int | float | None = None,
    gravity: torch.Tensor | None = None,
    gravity_floor: float = GRAVITY_FLOOR,
) -> torch.Tensor:
    """Rater-averaged attention on each visual token (§2.2, with the §7 options).

    Args:
        attn: ``[H, R, Lk]`` post-softmax attention probabilities of the rater rows of the
            pruning layer itself, over all ``Lk`` keys (any float dtype; maths in fp32).
        visual_cols: ``[V]`` int64 key columns of the current visual tokens (kept + recycled),
            in sequence order; ``None`` means ``attn`` already holds only those columns.
        heads: ``None`` (all heads, v1.x), an int (top-``k`` heads by mass, v2 uses 14) or a
            fraction of ``H`` (see :func:`head_count`).
        gravity: ``[R, V]`` SparseVLM+ RoPE-gravity kernel (:func:`rope_gravity`) of the rater
            rows × visual columns, or ``None`` (no correction).
        gravity_floor: the kernel is clamped to ``>= gravity_floor`` (> 0) before dividing, so
            the correction never divides by less (long contexts make the raw kernel ≤ 0).
    Returns:
        ``[V]`` fp32 significance ``s``.

    Order (§7): correction ``A ← A ⊘ max(R, floor)`` → head selection by
    ``σ_h = Σ_{raters, visual} A[h]`` on the corrected values (top-``k``, ties to the smaller
    head index) → mean over the selected heads → mean over raters.
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 3 or min(attn.shape) < 1:
        raise InputError(f"attn must be a non-empty [H, R, Lk] tensor, got {_shape(attn)}")
    H, R, Lk = attn.shape
    if visual_cols is None:
        a = attn.float()
    else:
        cols = torch.as_tensor(visual_cols, dtype=torch.int64, device=attn.device)
        if cols.dim() != 1 or cols.numel() < 1:
            raise InputError(f"visual_cols must be a non-empty [V] index tensor, got {_shape(cols)}")
        if int(cols.min()) < 0 or int(cols.max()) >= Lk:
            raise InputError(f"visual_cols must lie in [0, {Lk}) (the key length of attn)")
        a = attn.index_select(2, cols).float()
    V = a.shape[2]
    if gravity is not None:
        if not isinstance(gravity, torch.Tensor) or tuple(gravity.shape) != (R, V):
            raise InputError(f"gravity must be a [R, V] = [{R}, {V}] tensor, got {_shape(gravity)}")
        if not (isinstance(gravity_floor, (int, float)) and gravity_floor > 0):
            raise InputError(f"gravity_floor must be a positive number, got {gravity_floor!r}")
        a = a / gravity.to(device=a.device, dtype=torch.float32).clamp_min(float(gravity_floor))
    k = head_count(heads, H)
    if k < H:
        mass = a.sum(dim=(1, 2))
        chosen = torch.sort(mass, descending=True, stable=True).indices[:k]
        a = a.index_select(0, torch.sort(chosen).values)
    return a.mean(dim=0).mean(dim=0)


def select_heads(attn: torch.Tensor, heads: int | float | None) -> torch.Tensor:
    """The heads :func:`significance` averages for ``attn`` ``[H, R, V]`` (already column-selected
    and corrected): ``[k]`` int64 ascending, the top-``k`` by total mass, ties to the smaller index."""
    H = attn.shape[0]
    k = head_count(heads, H)
    mass = attn.float().sum(dim=(1, 2))
    return torch.sort(torch.sort(mass, descending=True, stable=True).indices[:k]).values


# --- §7.1 RoPE gravity -------------------------------------------------------------------------


def _positions(pos: torch.Tensor, axes: int, name: str) -> torch.Tensor:
    p = torch.as_tensor(pos).detach().to("cpu")
    if p.dim() == 1:
        return p.to(torch.float64).unsqueeze(0).expand(axes, -1)
    if p.dim() == 2 and p.shape[0] == axes:
        return p.to(torch.float64)
    want = "[N]" if axes == 1 else f"[N] or [{axes}, N]"
    raise InputError(f"{name} must be {want} position ids, got {_shape(p)}")


def mrope_axes(mrope_section: Sequence[int], interleaved: bool = False) -> torch.Tensor:
    """Position axis (0 = t, 1 = h, 2 = w, …) of each rotary frequency, ``[Σ section]`` int64.

    ``interleaved=False`` (Qwen2-VL / Qwen2.5-VL): contiguous blocks, block ``i`` of length
    ``section[i]`` uses axis ``i``. ``interleaved=True`` (Qwen3-VL): frequency ``f`` uses axis
    ``a >= 1`` when ``f ≡ a (mod 3)`` and ``f < 3·section[a]``, else axis 0.
    """
    section = [int(s) for s in mrope_section]
    if not section or any(s < 0 for s in section):
        raise InputError(f"mrope_section must be a non-empty list of non-negative ints, got {list(mrope_section)!r}")
    F = sum(section)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section, dtype=torch.int64))
    if len(section) != 3:
        raise InputError(f"interleaved M-RoPE needs a 3-entry mrope_section, got {section!r}")
    axis = torch.zeros(F, dtype=torch.int64)
    for a in (1, 2):
        axis[a : 3 * section[a] : 3] = a
    return axis


def rope_gravity(
    row_pos: torch.Tensor,
    col_pos: torch.Tensor,
    head_dim: int,
    theta: float = ROPE_THETA,
    mrope_section: Sequence[int] | None = None,
    *,
    mrope_interleaved: bool = False,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """SparseVLM+ attention-gravity kernel ``R = q̂·k̂ᵀ/√d`` of all-ones q, k under RoPE (§7.1).

    For 1-D RoPE (HF ``rotate_half`` layout), ``R_ij = (2/√d)·Σ_{k<d/2} cos((p_i − p_j)·θ_k)``
    with ``θ_k = theta^(−2k/d)``; for ``d = 128``: ``R(0) = 11.31``, ``R(10) = 7.57``,
    ``R(100) = 5.40``, ``R(300) = 3.47``, ``R(600) = 2.35``. It depends on ``p_i − p_j`` only and is
    the same for every head. The floor (``gravity_floor``) is applied by :func:`significance`.

    Args:
        row_pos: ``[R]`` positions of the rater rows, or ``[A, R]`` M-RoPE ids.
        col_pos: ``[V]`` positions of the visual columns, or ``[A, V]`` M-RoPE ids.
        head_dim: ``d`` (the ``1/√d`` scale and the default frequencies).
        theta: RoPE base for the default frequencies.
        mrope_section: M-RoPE split of the ``d/2`` frequencies over the ``A`` position axes
            (e.g. ``[16, 24, 24]``); frequency ``k`` then uses the difference of its own axis.
            1-D positions are broadcast to every axis (text tokens).
        mrope_interleaved: Qwen3-VL's interleaved layout (see :func:`mrope_axes`).
        inv_freq: ``[F]`` the model's own inverse frequencies (scaled RoPE variants); ``F < d/2``
            means partial rotary: the ``d − 2F`` unrotated dims add ``(d − 2F)/√d``.
        attention_scaling: the model's cos/sin amplitude (1 for plain RoPE); multiplies the
            rotary part by its square.
    Returns:
        ``[R, V]`` fp32 on ``row_pos``'s device (computed on the CPU in float64 as
        ``cos_i·cos_j + sin_i·sin_j`` products, so the memory is ``O((R + V)·d)``).
    """
    if not _is_int(head_dim) or head_dim < 2:
        raise InputError(f"head_dim must be an int >= 2, got {head_dim!r}")
    d = int(head_dim)
    if inv_freq is None:
        if not (isinstance(theta, (int, float)) and theta > 0):
            raise InputError(f"theta must be a positive number, got {theta!r}")
        inv = float(theta) ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2.0 / d)
    else:
        inv = torch.as_tensor(inv_freq).detach().to("cpu", torch.float64).reshape(-1)
        if inv.numel() < 1 or 2 * inv.numel() > d:
            raise InputError(f"inv_freq must have between 1 and head_dim/2 = {d // 2} entries, got {inv.numel()}")
    F = inv.numel()
    if mrope_section is None:
        axes = 1
        axis = torch.zeros(F, dtype=torch.int64)
    else:
        axis = mrope_axes(mrope_section, mrope_interleaved)
        axes = len(list(mrope_section))
        if axis.numel() != F:
            raise InputError(f"mrope_section must sum to the number of rotary frequencies {F}, got {list(mrope_section)!r}")
    rows = _positions(row_pos, axes, "row_pos")
    cols = _positions(col_pos, axes, "col_pos")
    ang_r = rows.index_select(0, axis).T * inv  # [R, F]
    ang_c = cols.index_select(0, axis).T * inv  # [V, F]
    kernel = ang_r.cos() @ ang_c.cos().T + ang_r.sin() @ ang_c.sin().T
    out = (2.0 * float(attention_scaling) ** 2 * kernel + (d - 2 * F)) / math.sqrt(d)
    device = row_pos.device if isinstance(row_pos, torch.Tensor) else None
    return out.to(device=device, dtype=torch.float32)


# --- §3.2 rank budget --------------------------------------------------------------------------


def rank_keep(
    P: torch.Tensor,
    *,
    form: str = "paper",
    lam: float = 1.0,
    scale: float = 1.0,
    bias: float = 0.0,
    skip: bool = True,
) -> int:
    """Keep count from the rank of the rater attention ``P`` ``[R, V]`` (§3.2).

    ``rank = matrix_rank(P)`` in fp32 with the default tolerance ``σ_max·max(R, V)·ε_fp32``.

    * ``form="paper"``: ``N_del = ⌊lam·(V − rank)⌋``, ``keep = V − N_del``;
    * ``form="v1code"``: ``keep = ⌊scale·rank + bias⌋`` (:data:`RANK_SCALE_BIAS` per target).

    The result is clipped to ``[1, V − 1]``, except that with ``skip=True`` (default) a layer with
    nothing to delete returns exactly ``V``, meaning "skip this layer: no pruning, no recycling"
    (paper: ``N_del = 0`` → skipped; v1.0 code: ``V − rank = 0`` → nothing pruned). That happens
    for ``paper`` when ``⌊lam·(V − rank)⌋ = 0`` and for ``v1code`` when ``rank = V``. ``V = 1``
    always returns 1.
    """
    if not isinstance(P, torch.Tensor) or P.dim() != 2 or min(P.shape) < 1:
        raise InputError(f"P must be a non-empty [R, V] tensor, got {_shape(P)}")
    validate_choice("rank form", form, RANK_FORMS)
    V = int(P.shape[1])
    rank = int(torch.linalg.matrix_rank(P.float()))
    if V == 1:
        return 1
    if form == "paper":
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise InputError(f"lam must be a non-negative number, got {lam!r}")
        n_del = math.floor(float(lam) * (V - rank))
        if skip and n_del <= 0:
            return V
        keep = V - n_del
    else:
        if skip and rank >= V:
            return V
        keep = math.floor(float(scale) * rank + float(bias))
    return max(1, min(keep, V - 1))


# --- §4 recycling ------------------------------------------------------------------------------


def recycle_counts(num_pruned: int, tau: float = RECYCLE_TAU, theta: float = RECYCLE_THETA) -> tuple[int, int]:
    """``(n1, c)`` for ``Np`` pruned tokens: ``n1 = min(Np, ⌊τ·Np⌋ + 1)`` candidates and
    ``c = min(n1, ⌊θ·n1⌋ + 1)`` clusters; ``(0, 0)`` when nothing was pruned.

    With the defaults: ``Np = 276 → (83, 9)``. (For τ = 0.3, θ = 0.1 the float products agree
    with the exact ``⌊3·Np/10⌋`` and ``⌊n1/10⌋`` for every ``Np`` below 200 000.)
    """
    _check_share("tau", tau)
    _check_share("theta", theta)
    n = int(num_pruned)
    if n <= 0:
        return 0, 0
    n1 = min(n, math.floor(float(tau) * n) + 1)
    c = min(n1, math.floor(float(theta) * n1) + 1)
    return n1, c


def _check_share(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise InputError(f"recycling share {name} must be in (0, 1], got {value!r}")


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """``cdist(x, x)/√C`` for ``x`` ``[n, C]``: ``[n, n]`` fp32, symmetric, exact zeros on the diagonal.

    Computed as ``|a|² + |b|² − 2a·b`` on mean-centred rows (as fast as a GEMM; centring keeps
    the cancellation error small for hidden states with large shared offsets).
    """
    xf = x.float()
    xf = xf - xf.mean(dim=0, keepdim=True)
    sq = (xf * xf).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xf @ xf.T)).clamp_min(0.0)
    d2 = 0.5 * (d2 + d2.T)
    d2.fill_diagonal_(0.0)
    return d2.sqrt() / math.sqrt(x.shape[1])


def dpc_knn(
    x: torch.Tensor,
    num_clusters: int,
    *,
    k: int | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering (§4 step 3) of ``x`` ``[n, C]`` into ``c = num_clusters`` clusters.

    * ``D = cdist(x, x)/√C`` (:func:`pairwise_distance`);
    * density ``ρ_i = exp(−mean of D_ij²`` over the ``k`` nearest ``j``, itself included) with
      ``k = c`` by default;
    * ``δ_i = min D_ij`` over the points denser than ``i``; the densest point gets the global
      ``max D``; score ``γ = δ·ρ``; the top-``c`` by ``γ`` (ties to the smaller index) are the
      centres, cluster ids in that order;
    * every point joins its nearest centre (ties to the smaller cluster id); centres are forced
      onto themselves.

    Ties in density: the reference adds ``U(0, 1)·1e-6`` noise. Here ``seed=None`` (default) adds
    none and orders equal densities by index — the smaller index counts as denser — so the
    result is deterministic; ``seed=int`` adds the reference noise from a generator seeded with
    it (reproducible), then the same index rule.

    Returns:
        ``(centres, assign)``: ``[c]`` int64 row indices of the centres in cluster-id order and
        ``[n]`` int64 cluster id of every row.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1:
        raise InputError(f"x must be a non-empty [n, C] tensor, got {_shape(x)}")
    n = int(x.shape[0])
    if not _is_int(num_clusters) or not 1 <= num_clusters <= n:
        raise InputError(f"num_clusters must be an int in [1, {n}], got {num_clusters!r}")
    c = int(num_clusters)
    kk = c if k is None else int(k)
    if kk < 1:
        raise InputError(f"k (nearest neighbours) must be >= 1, got {k!r}")
    kk = min(kk, n)
    dist = pairwise_distance(x)
    nearest = torch.topk(dist, kk, dim=1, largest=False, sorted=False).values
    density = torch.exp(-(nearest * nearest).mean(dim=1))
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        density = density + torch.rand(n, generator=g, dtype=torch.float32).to(density.device) * DENSITY_NOISE
    idx = torch.arange(n, device=dist.device)
    di, dj = density[:, None], density[None, :]
    denser = (dj > di) | ((dj == di) & (idx[None, :] < idx[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values
    gamma = delta * density
    centres = torch.sort(gamma, descending=True, stable=True).indices[:c]
    assign = torch.argmin(dist.index_select(1, centres), dim=1)
    assign[centres] = torch.arange(c, device=dist.device)
    return centres.to(torch.int64), assign.to(torch.int64)


def recycle(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    *,
    tau: float = RECYCLE_TAU,
    theta: float = RECYCLE_THETA,
    merge: str = "mean",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token recycling (§4): merge the most significant pruned tokens into ``c`` tokens.

    Args:
        hidden: ``[Np, D]`` the pruning layer's **output** hidden states of the pruned visual
            tokens, in sequence order.
        scores: ``[Np]`` their significance (the same ``s`` that chose the kept tokens).
        tau, theta: candidate and cluster shares (see :func:`recycle_counts`).
        merge: ``"mean"`` (the reference code; exact ``1/count`` where the code divides by
            ``count + 1e-6``) or ``"sum"`` (the paper's formula).
        seed: see :func:`dpc_knn` (``None``: deterministic index tie-break, no noise).
    Returns:
        ``(merged, centre_index)``: ``[c, D]`` merged tokens in cluster-id order (descending
        ``γ``), in ``hidden``'s dtype (merged in fp32), and ``[c]`` int64 index into the ``Np``
        pruned tokens of each cluster's centre (the position a merged token takes under
        ``positions="preserve"``). ``Np = 0`` gives ``[0, D]`` and ``[0]``.

    Candidates are the top ``n1`` by score (ties to the smaller index), clustered in ascending
    index order, so DPC ties resolve towards the earlier token.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise InputError(f"hidden must be a [Np, D] tensor, got {_shape(hidden)}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != hidden.shape[0]:
        raise InputError(f"scores must be a [Np] = [{hidden.shape[0]}] tensor, got {_shape(scores)}")
    validate_choice("recycle merge", merge, MERGES)
    Np, D = hidden.shape
    n1, c = recycle_counts(Np, tau, theta)
    if Np == 0:
        return hidden.new_zeros((0, D)), torch.zeros(0, dtype=torch.int64, device=hidden.device)
    top = torch.sort(scores.float(), descending=True, stable=True).indices[:n1]
    cand = torch.sort(top).values
    x = hidden.index_select(0, cand)
    centres, assign = dpc_knn(x, c, seed=seed)
    xf = x.float()
    merged = torch.zeros(c, D, dtype=torch.float32, device=hidden.device).index_add_(0, assign, xf)
    if merge == "mean":
        counts = torch.bincount(assign, minlength=c).to(torch.float32)
        merged = merged / counts[:, None]
    return merged.to(hidden.dtype), cand[centres]


# --- §3 budgets and §8 accounting --------------------------------------------------------------


def schedule_for(variant: str, target: int, layers: Sequence[int] = PRUNING_LAYERS) -> dict[int, int]:
    """The fixed §3.1 schedule ``{layer: keep}`` of ``variant`` (``"v1.5"`` or ``"v2"``) for
    ``target`` ∈ {192, 128, 96, 64}; ``layers`` relabels the three stages (default 2, 6, 15)."""
    v = canonical_variant(variant)
    if v not in SCHEDULES:
        raise InputError(f"fixed schedules exist for 'v1.5' and 'v2' only, got variant {variant!r}")
    table = SCHEDULES[v]
    if target not in table:
        raise InputError(f"no {v} schedule for target {target!r}; accepted: {', '.join(map(str, sorted(table)))}")
    values = table[target]
    layers = tuple(int(layer) for layer in layers)
    if len(layers) != len(values):
        raise InputError(f"the fixed schedules have {len(values)} stages, got {len(layers)} pruning layers {layers}")
    return dict(zip(layers, values))


def check_schedule(schedule: Mapping[int, int], num_visual: int, num_layers: int) -> dict[int, int]:
    """Validate a keep schedule for ``V0 = num_visual`` tokens and an LLM of ``num_layers``.

    Requirements (each violation raises :class:`InputError` before any model state changes):
    layer indices are ints in ``[0, num_layers)``; keep counts are ints ``>= 1``, never
    increasing from one pruning layer to the next (equal is allowed; the runtime clips to
    ``V − 1``) and never above ``V0`` ("schedule longer than the sequence": the fixed tables are
    written for 576 tokens; use the ratio budget for fewer). Returns the schedule sorted by layer.
    """
    if not _is_int(num_layers) or num_layers < 1:
        raise InputError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if not _is_int(num_visual) or num_visual < 1:
        raise InputError(f"the number of visual tokens must be an int >= 1, got {num_visual!r}")
    if not isinstance(schedule, Mapping):
        raise InputError(f"a schedule must be a mapping {{layer: keep}}, got {type(schedule).__name__}")
    for layer in schedule:
        _check_layer(layer, num_layers)
    out: dict[int, int] = {}
    for layer in sorted(schedule):
        keep = schedule[layer]
        if not _is_int(keep) or keep < 1:
            raise InputError(f"keep count at layer {layer} must be an int >= 1, got {keep!r}")
        if keep > num_visual:
            raise InputError(
                f"schedule longer than the sequence: layer {layer} keeps {keep} tokens but the input has only "
                f"{num_visual} visual tokens (fixed schedules assume {REFERENCE_V0}; use budget='ratio')"
            )
        if out and keep > out[max(out)]:
            prev = max(out)
            raise InputError(
                f"a schedule must not increase: layer {layer} keeps {keep} > {out[prev]} kept at layer {prev}"
            )
        out[int(layer)] = int(keep)
    return out


def _check_layer(layer: object, num_layers: int) -> None:
    check_layers("sparsevlm", (layer,), num_layers)  # type: ignore[arg-type]


def equivalent_tokens(v_in: Sequence[int], v_out: Sequence[int]) -> tuple[float, float]:
    """``(E_out, E_in)`` (§8): the mean over all layers of the visual tokens leaving / entering
    each layer (``E_out`` counts recycled tokens; it is the reference's "equal token num")."""
    if len(v_in) != len(v_out) or len(v_in) < 1:
        raise InputError(f"v_in and v_out must be non-empty and of equal length, got {len(v_in)} and {len(v_out)}")
    n = len(v_in)
    return sum(v_out) / n, sum(v_in) / n


def bounded_keep(keep: int, num_visual: int) -> int:
    """Visual tokens a scheduled pruning layer keeps out of ``V`` in: ``min(keep, V − 1)``, the
    reference's rule (§2: it always prunes at least one token, which recycling may bring back
    as a merged one); a layer reached with ``V <= 1`` cannot prune and keeps ``V``."""
    V = int(num_visual)
    return V if V <= 1 else min(int(keep), V - 1)


def simulate_schedule(
    num_visual: int,
    num_layers: int,
    schedule: Mapping[int, int],
    recycle: bool = True,
    *,
    tau: float = RECYCLE_TAU,
    theta: float = RECYCLE_THETA,
) -> dict:
    """Visual-token counts of a prefill under ``schedule`` (``{layer: keep}``), as the runtime does it.

    At a pruning layer with ``V`` visual tokens in: ``k = min(keep, V − 1)``; with recycling
    ``c = recycle_counts(V − k)[1]`` merged tokens come back; ``V ← k + c``. A layer reached with
    ``V <= 1`` cannot prune and is skipped.

    Returns a dict: ``v_in`` / ``v_out`` (lists, one entry per layer), ``kept`` and ``recycled``
    (``{layer: count}`` for the layers that pruned), ``e_out`` and ``e_in`` (§8).
    """
    sched = check_schedule(schedule, num_visual, num_layers)
    V = int(num_visual)
    v_in: list[int] = []
    v_out: list[int] = []
    kept: dict[int, int] = {}
    recycled: dict[int, int] = {}
    for layer in range(num_layers):
        v_in.append(V)
        if layer in sched and V >= 2:
            k = bounded_keep(sched[layer], V)
            c = recycle_counts(V - k, tau, theta)[1] if recycle else 0
            kept[layer], recycled[layer] = k, c
            V = k + c
        v_out.append(V)
    e_out, e_in = equivalent_tokens(v_in, v_out)
    return {"v_in": v_in, "v_out": v_out, "kept": kept, "recycled": recycled, "e_out": e_out, "e_in": e_in}


def _ratio_candidate(
    alpha: float,
    shape: Sequence[float],
    layers: Sequence[int],
    num_visual: int,
    recycle: bool,
    tau: float,
    theta: float,
) -> dict[int, int]:
    V = num_visual
    prev = num_visual
    out: dict[int, int] = {}
    for layer, f in zip(layers, shape):
        if V < 2:
            break
        k = math.floor(alpha * f * num_visual + 0.5)
        k = max(1, min(k, V - 1, prev))
        out[layer] = k
        prev = k
        V = k + (recycle_counts(V - k, tau, theta)[1] if recycle else 0)
    return out


def solve_ratio(
    retain: float,
    num_visual: int,
    num_layers: int,
    *,
    layers: Sequence[int] = PRUNING_LAYERS,
    variant: str = "v1.5",
    shape: Sequence[float] | None = None,
    recycle: bool = True,
    equivalent: str = "output",
    tau: float = RECYCLE_TAU,
    theta: float = RECYCLE_THETA,
) -> tuple[float, dict[int, int]]:
    """``(α, schedule)`` of the ratio budget (§3.3); see :func:`ratio_schedule`."""
    rho = check_retain(retain)
    validate_choice("ratio budget option equivalent", equivalent, ("output", "input"))
    if not _is_int(num_visual) or num_visual < 1:
        raise InputError(f"the number of visual tokens must be an int >= 1, got {num_visual!r}")
    if not _is_int(num_layers) or num_layers < 1:
        raise InputError(f"num_layers must be an int >= 1, got {num_layers!r}")
    layers = tuple(layers)
    for layer in layers:
        _check_layer(layer, num_layers)
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
        raise InputError(f"pruning layers must be a non-empty strictly increasing tuple of ints, got {layers!r}")
    if shape is None:
        v = canonical_variant(variant)
        base = SCHEDULES["v1.5" if v == "v1.0" else v][192]
        shape = tuple(keep / REFERENCE_V0 for keep in base)
    shape = tuple(float(f) for f in shape)
    if len(shape) != len(layers) or any(not (f > 0) for f in shape):
        raise InputError(f"shape must hold one positive fraction per pruning layer ({len(layers)}), got {shape!r}")
    if rho >= 1.0:
        return math.inf, {}
    target = rho * num_visual
    key = "e_out" if equivalent == "output" else "e_in"

    def evaluate(alpha: float) -> tuple[float, dict[int, int]]:
        sched = _ratio_candidate(alpha, shape, layers, num_visual, recycle, tau, theta)
        sim = simulate_schedule(num_visual, num_layers, sched, recycle, tau=tau, theta=theta)
        return sim[key], sched

    lo, hi = 0.0, 1.0 / min(shape) + 1.0
    e_lo, s_lo = evaluate(lo)
    if e_lo >= target:
        return lo, s_lo
    e_hi, s_hi = evaluate(hi)
    if e_hi < target:
        return hi, s_hi
    # invariant: E(lo) < target <= E(hi); E is a non-decreasing step function of alpha
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        e_mid, s_mid = evaluate(mid)
        if e_mid >= target:
            hi, e_hi, s_hi = mid, e_mid, s_mid
        else:
            lo, e_lo, s_lo = mid, e_mid, s_mid
    if target - e_lo <= e_hi - target:
        return lo, s_lo
    return hi, s_hi


def ratio_schedule(
    retain: float,
    num_visual: int,
    num_layers: int,
    *,
    layers: Sequence[int] = PRUNING_LAYERS,
    variant: str = "v1.5",
    shape: Sequence[float] | None = None,
    recycle: bool = True,
    equivalent: str = "output",
    tau: float = RECYCLE_TAU,
    theta: float = RECYCLE_THETA,
) -> dict[int, int]:
    """Keep schedule ``{layer: keep}`` so that the equivalent tokens are about ``retain·V0`` (§3.3).

    ``keep_l(α) = clip(round(α·f_l·V0), 1, V_l − 1)``, also capped by the previous stage's keep
    (monotone non-increasing), where ``f`` is ``shape`` or the variant's 192-token table over 576
    (v1.5: ``(300, 200, 110)/576``; v1.0 uses v1.5's) and ``V_l`` the visual tokens entering
    layer ``l``. ``round`` is halves-up.

    Accounting: ``E_out`` (``equivalent="output"``, the spec's choice) or ``E_in`` (``"input"``) of
    :func:`simulate_schedule`. With ``recycle=True`` the recycled tokens are counted exactly as
    the runtime will produce them, since ``c`` depends on the pruned count only (§4); they also
    raise ``V_l`` of later stages. ``E`` is a non-decreasing step function of ``α``: bisection
    finds the step where it crosses ``retain·V0`` and the closer side is returned (ties to the
    smaller ``E``). Targets below what one token per stage gives return ``α = 0`` (keep 1
    everywhere); targets above what is reachable return the largest schedule. ``retain = 1``
    returns ``{}`` (no pruning).

    Example (§3.3): 28 layers, ``retain = 0.25``, no recycling → ``α ≈ 0.650``, keep
    ≈ ``(0.339, 0.226, 0.124)·V0``.
    """
    return solve_ratio(
        retain,
        num_visual,
        num_layers,
        layers=layers,
        variant=variant,
        shape=shape,
        recycle=recycle,
        equivalent=equivalent,
        tau=tau,
        theta=theta,
    )[1]


# --- §9 FLOPs: :func:`tokensieve.methods.inllm.prefill_flops` (shared by every method) ---------


# --- options -----------------------------------------------------------------------------------


@dataclass
class SparseVLMOptions:
    """Configured SparseVLM (§13). ``None`` fields take the variant's default.

    Variant defaults: ``"v1.5"`` – layers (2, 6, 15), fixed schedule, recycling, compact
    positions, all heads, no gravity correction; ``"v2"`` (SparseVLM+) – v2 schedules, no
    recycling, preserved (original) positions, gravity correction, 14 priority heads;
    ``"v1.0"`` – layers (2, 6, 15, 19), rank budget ``⌊scale·rank + bias⌋`` (``RANK_SCALE_BIAS``
    for ``target``), recycling, compact positions. Positions are not an option of the method:
    ``compress(positions=...)`` chooses them for every method (default: the registry's, set by
    measurement); :attr:`variant_positions` is the variant's reference choice (the spec's
    "contiguous" = ``"compact"``, "original" = ``"preserve"``); M-RoPE models always preserve.
    """

    variant: str = field(default="v1.5", metadata={"help": "'v1.5' (ICML code), 'v1.0' (rank budgets) or 'v2' (SparseVLM+)"})
    pruning_layers: tuple[int, ...] | None = field(default=None, metadata={"range": "[0, inf)", "help": "increasing layer indices"})
    budget: str | None = field(default=None, metadata={"help": "'schedule', 'ratio' (retain-driven) or 'rank'"})
    target: int = field(default=192, metadata={"help": "equivalent tokens of the fixed tables: 192, 128, 96 or 64"})
    recycle: bool | None = field(default=None, metadata={"help": "recycle pruned tokens by DPC-kNN"})
    recycle_tau: float = field(default=RECYCLE_TAU, metadata={"range": "(0, 1]", "help": "share of pruned tokens clustered"})
    recycle_theta: float = field(default=RECYCLE_THETA, metadata={"range": "(0, 1]", "help": "clusters per candidate"})
    recycle_merge: str = field(default="mean", metadata={"help": "'mean' (code) or 'sum' (paper)"})
    gravity_correction: bool | None = field(default=None, metadata={"help": "divide attention by the RoPE kernel"})
    gravity_floor: float = field(default=GRAVITY_FLOOR, metadata={"range": "(0, inf)", "help": "lower clamp of the RoPE kernel"})
    priority_heads: int | float | None = field(default=None, metadata={"help": "top-k heads (int) or fraction"})
    rank_form: str | None = field(default=None, metadata={"help": "'paper' or 'v1code'"})
    lam: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "paper rank form: tokens deleted = lam*(V - rank)"})
    scale: float | None = field(default=None, metadata={"help": "v1code rank form scale"})
    bias: float | None = field(default=None, metadata={"help": "v1code rank form bias"})
    seed: int | None = field(default=None, metadata={"range": "[0, inf)", "help": "recycling tie-break noise seed (None: by index)"})

    def __post_init__(self) -> None:
        self.variant = canonical_variant(self.variant)
        v = self.variant
        if self.pruning_layers is None:
            self.pruning_layers = PRUNING_LAYERS_V1_0 if v == "v1.0" else PRUNING_LAYERS
        layers = tuple(self.pruning_layers)
        if not layers or not all(_is_int(x) and x >= 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise InputError(f"sparsevlm option pruning_layers must be strictly increasing ints >= 0, got {layers!r}")
        self.pruning_layers = tuple(int(x) for x in layers)
        if self.budget is None:
            self.budget = "rank" if v == "v1.0" else "schedule"
        validate_choice("sparsevlm option budget", self.budget, BUDGETS)
        if self.recycle is None:
            self.recycle = v != "v2"
        if not isinstance(self.recycle, bool):
            raise InputError(f"sparsevlm option recycle must be True or False, got {self.recycle!r}")
        recycle_counts(1, self.recycle_tau, self.recycle_theta)
        validate_choice("sparsevlm option recycle_merge", self.recycle_merge, MERGES)
        if self.gravity_correction is None:
            self.gravity_correction = v == "v2"
        if not isinstance(self.gravity_correction, bool):
            raise InputError(f"sparsevlm option gravity_correction must be True or False, got {self.gravity_correction!r}")
        if not (isinstance(self.gravity_floor, (int, float)) and self.gravity_floor > 0):
            raise InputError(f"sparsevlm option gravity_floor must be a positive number, got {self.gravity_floor!r}")
        if self.priority_heads is None and v == "v2":
            self.priority_heads = PRIORITY_HEADS
        head_count(self.priority_heads, 1 << 30)
        if self.rank_form is None:
            self.rank_form = "v1code" if v == "v1.0" else "paper"
        validate_choice("sparsevlm option rank_form", self.rank_form, RANK_FORMS)
        if self.budget == "schedule":
            schedule_for("v1.5" if v == "v1.0" else v, self.target, self.pruning_layers)
        if self.rank_form == "v1code" and (self.scale is None or self.bias is None):
            default = RANK_SCALE_BIAS.get(self.target, (1.0, 0.0))
            self.scale = default[0] if self.scale is None else self.scale
            self.bias = default[1] if self.bias is None else self.bias
        self.scale = 1.0 if self.scale is None else float(self.scale)
        self.bias = 0.0 if self.bias is None else float(self.bias)

    @property
    def variant_positions(self) -> str:
        """Positions of the variant's reference code on 1-D RoPE models: SparseVLM+ (v2) keeps the
        original ids, v1.0 / v1.5 renumber the kept tokens contiguously."""
        return "preserve" if self.variant == "v2" else "compact"

    def plan(self, num_visual: int, num_layers: int, retain: float | None = None) -> dict[int, int] | None:
        """The checked keep schedule for ``V0`` tokens and ``num_layers``, or ``None`` for the rank
        budget (decided per layer by :func:`rank_keep`). ``budget="ratio"`` needs ``retain``."""
        layers = self.pruning_layers
        assert layers is not None
        for layer in layers:
            _check_layer(layer, num_layers)
        if self.budget == "rank":
            return None
        if self.budget == "ratio":
            if retain is None:
                raise InputError("budget='ratio' needs a retain ratio")
            sched = ratio_schedule(
                retain,
                num_visual,
                num_layers,
                layers=layers,
                variant=self.variant,
                recycle=bool(self.recycle),
                tau=self.recycle_tau,
                theta=self.recycle_theta,
            )
        else:
            sched = schedule_for("v1.5" if self.variant == "v1.0" else self.variant, self.target, layers)
        return check_schedule(sched, num_visual, num_layers)

    def keep_count(self, P: torch.Tensor) -> int:
        """Rank-budget keep count of the rater attention ``P`` ``[R, V]`` (:func:`rank_keep`)."""
        return rank_keep(P, form=str(self.rank_form), lam=self.lam, scale=float(self.scale), bias=float(self.bias))


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


@dataclass
class SparseVLM(SparseVLMOptions, InLLMMethod):
    """SparseVLM as an in-LLM method of the runtime (§2): text raters chosen once from the
    layer-0 embeddings judge the visual tokens through each pruning layer's own attention;
    the pruning layer's output keeps the top tokens, and recycled (clustered) tokens are
    inserted right after the kept visual tokens.

    ``budget="ratio"`` (the default here) spreads ``retain`` over the pruning layers with the
    v1.5 shape (§3.3) so that the ``equivalent`` count is ``retain·V0``; ``"schedule"`` uses the
    published absolute tables (LLaVA-1.5's 576 tokens, ``target``); ``"rank"`` decides each keep
    count from the rank of the rater attention (§3.2). ``frame_budget="fca"`` spreads each
    keep count over frames with VidCom2's FCA weights (recycled tokens stay outside the split).
    """

    budget: str | None = field(default="ratio", metadata={"help": "'ratio' (from retain), 'schedule' (tables) or 'rank'"})
    equivalent: str = field(default="input", metadata={"help": "retain means E_in ('input') or E_out ('output')"})
    frame_budget: str = field(default="uniform", metadata={"help": "'uniform' (global top-k) or 'fca' per-frame budgets"})
    depth: str = field(default="published", metadata={
        "help": "'published' (pruning_layers as given) or 'scaled' (given for 32 layers, placed at the same depth fractions)"})

    stage = "in-llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_choice("sparsevlm option equivalent", self.equivalent, ("input", "output"))
        validate_choice("sparsevlm option frame_budget", self.frame_budget, ("uniform", "fca"))
        validate_choice("sparsevlm option depth", self.depth, ("published", "scaled"))

    @property
    def uses_fca(self) -> bool:
        return self.frame_budget == "fca"

    def for_depth(self, num_layers: int) -> "SparseVLM":
        """This configuration with concrete pruning layers for a ``num_layers``-layer model."""
        if self.depth == "published":
            return self
        from .inllm import SPARSEVLM_REF_DEPTH, scaled_layers

        layers = scaled_layers(tuple(self.pruning_layers or ()), num_layers, SPARSEVLM_REF_DEPTH, low=0)
        return dataclasses.replace(self, pruning_layers=layers, depth="published")

    def check_depth(self, num_layers: int) -> None:
        for layer in self.pruning_layers or ():
            _check_layer(layer, num_layers)

    def plan(self, num_visual: int, num_layers: int, retain: float | None = None) -> list:  # type: ignore[override]
        """Prune points ``[PrunePoint(layer, keep, "self")]`` for ``V0`` visual tokens."""
        from .inllm import PrunePoint

        self.check_depth(num_layers)
        if self.budget == "rank":
            return [PrunePoint(layer, num_visual, "self") for layer in self.pruning_layers or ()]
        if self.budget == "ratio":
            if retain is None:
                raise InputError("budget='ratio' needs a retain ratio")
            layers = tuple(self.pruning_layers or PRUNING_LAYERS)
            alpha, sched = solve_ratio(retain, num_visual, num_layers, layers=layers, variant=self.variant,
                                       shape=self.shape_for(len(layers)), recycle=bool(self.recycle),
                                       equivalent=self.equivalent, tau=self.recycle_tau, theta=self.recycle_theta)
            if alpha == 0.0 and retain < 1.0:
                # even one token per stage overshoots: the layers up to the first pruning layer
                # see every visual token; a schedule of single tokens is not what was asked for
                sim = simulate_schedule(num_visual, num_layers, sched, bool(self.recycle),
                                        tau=self.recycle_tau, theta=self.recycle_theta)
                reached = sim["e_out" if self.equivalent == "output" else "e_in"] / num_visual
                if reached > retain + 1e-9:
                    raise InputError(
                        f"sparsevlm: retain={retain} is not above the minimum this schedule reaches on {num_layers} "
                        f"layers ({reached:.3f} with equivalent={self.equivalent!r}: the layers up to pruning layer "
                        f"{layers[0]} see every visual token); raise retain, lower pruning_layers, or use "
                        "equivalent='output'"
                    )
        else:
            sched = schedule_for("v1.5" if self.variant == "v1.0" else self.variant, self.target,
                                 self.pruning_layers or PRUNING_LAYERS)
        sched = check_schedule(sched, num_visual, num_layers)
        return [PrunePoint(layer, keep, "self") for layer, keep in sorted(sched.items())]

    def shape_for(self, n: int) -> tuple[float, ...]:
        """Keep fractions of ``V0`` per pruning layer for the ratio budget: the variant's 192-token
        table over 576 (three layers); other layer counts interpolate it linearly by stage."""
        base = [keep / REFERENCE_V0 for keep in SCHEDULES["v1.5" if self.variant == "v1.0" else self.variant][192]]
        if n == len(base):
            return tuple(base)
        if n == 1:
            return (base[0],)
        out = []
        for i in range(n):
            x = i * (len(base) - 1) / (n - 1)
            lo = min(int(math.floor(x)), len(base) - 2)
            out.append(base[lo] + (base[lo + 1] - base[lo]) * (x - lo))
        return tuple(out)

    def prepare_sample(self, h_visual: torch.Tensor, h_text: torch.Tensor) -> torch.Tensor:
        """Rater indices (relative to the text after the visual tokens), once per prefill."""
        return select_raters(h_visual, h_text)

    def rows(self, layout: SampleLayout, state: Any = None) -> torch.Tensor:
        """The raters' rows (``state``: their indices relative to the text, from :meth:`prepare_sample`)."""
        text, raters = layout.text, state
        if raters is None or raters.numel() == 0:
            return text
        raters = raters.to(text.device)
        return text[raters[raters < text.numel()]]

    def score(self, attn: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
        visual = ctx.layout.visual
        gravity = None
        if self.gravity_correction:
            row_pos, col_pos = ctx.positions[..., ctx.rows], ctx.positions[..., visual]
            section = list(ctx.mrope_section) if ctx.mrope_section is not None else None
            gravity = rope_gravity(row_pos, col_pos, ctx.head_dim, theta=ctx.rope_theta, mrope_section=section)
        return significance(attn, visual, heads=self.priority_heads, gravity=gravity, gravity_floor=self.gravity_floor)

    def keep_bound(self, keep: int, num_visual: int) -> int:
        """Scheduled keep counts follow :func:`bounded_keep` (``min(keep, V − 1)``); the rank
        budget's count is used as it is (``V`` means: skip this layer)."""
        return min(int(keep), int(num_visual)) if self.budget == "rank" else bounded_keep(keep, num_visual)

    def dynamic_keep(self, attn: torch.Tensor, ctx: PruneContext) -> int | None:
        """Rank budget: the keep count from the rater attention ``P``; ``None`` for fixed budgets."""
        if self.budget != "rank":
            return None
        P = attn.float().mean(0)[:, ctx.layout.visual]
        return self.keep_count(P)

    def recycle_tokens(self, hidden: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.recycle:
            return None
        return recycle(hidden, scores, tau=self.recycle_tau, theta=self.recycle_theta, merge=self.recycle_merge,
                       seed=self.seed)
