"""Helpers shared by the segment-and-cluster video methods (FlashVID, FastVID, HoliTom).

Pure tensor code, fp32, deterministic (``specs/sota.md`` §0). The reference codes break ties
with ``torch.topk`` (unspecified order) and add ``U(0, 1)·1e-6`` noise to DPC densities; here
every tie goes to the smaller index instead, so a selection is a function of the features.

* :func:`topk_det` – top-k by (−score, index);
* :func:`dpc_knn` – density-peak clustering with k-nearest-neighbour densities
  (Du et al., 2016; as used by FastVID arXiv 2503.11187 §3.3, HoliTom arXiv 2505.21334 §3.2,
  FlashVID arXiv 2602.08024 §3.3);
* :func:`transition_similarity` / :func:`segment_lengths` – cuts between dissimilar frames;
* :func:`cosine` – pairwise cosine similarity.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

NORM_FLOOR = 1e-12


def topk_det(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of ``score`` ``[N]``, best first, ties to the smaller index."""
    k = max(0, min(int(k), score.numel()))
    return torch.sort(-score.float(), stable=True).indices[:k]


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (fp32)."""
    xf = x.float()
    return xf / xf.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[..., N, P]`` between the rows of ``a`` ``[..., N, D]`` and ``b`` ``[..., P, D]``."""
    return unit(a) @ unit(b).transpose(-1, -2)


def transition_similarity(g: torch.Tensor) -> torch.Tensor:
    """``s_t = cos(g_t, g_{t+1})`` ``[T − 1]`` for frame descriptors ``g`` ``[T, D]``."""
    u = unit(g)
    return (u[:-1] * u[1:]).sum(-1)


def segment_lengths(
    sim: torch.Tensor,
    threshold: float,
    *,
    extra_cuts: int = 0,
    min_segments: int = 1,
) -> torch.Tensor:
    """Lengths ``[S]`` of the segments of a ``T``-frame video from its transition similarities.

    A cut after frame ``t`` (a new segment starts at ``t + 1``) where ``sim[t] < threshold``;
    also at the ``extra_cuts`` smallest ``sim[t]`` (FastVID's ``c − 1``, a union with the
    threshold cuts), and then, while there are fewer than ``min_segments`` segments, at the
    smallest ``sim[t]`` not cut yet (FlashVID). Ties go to the earlier transition.

    Args:
        sim: ``[T − 1]`` transition similarities.
    """
    n = sim.numel()
    cut = sim.float() < threshold
    if extra_cuts > 0 and n:
        cut[topk_det(-sim.float(), min(extra_cuts, n))] = True
    missing = min(int(min_segments), n + 1) - (int(cut.sum()) + 1)
    if missing > 0:
        free = (~cut).nonzero(as_tuple=True)[0]
        cut[free[topk_det(-sim.float()[free], missing)]] = True
    ends = torch.cat([cut.nonzero(as_tuple=True)[0], torch.tensor([n], dtype=torch.int64)])
    return torch.diff(ends, prepend=torch.tensor([-1], dtype=torch.int64))


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[N, N]`` between the rows of ``x`` ``[N, D]``: Gram form in float64
    (``‖a‖² + ‖b‖² − 2a·b``, clamped at 0), symmetric, zero on the diagonal."""
    xd = x.double()
    sq = (xd * xd).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xd @ xd.T)).clamp_min(0.0)
    d2 = (d2 + d2.T) / 2
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of the rows of ``x`` ``[N, D]`` into ``num_clusters`` clusters.

    ``d_ij = ‖x_i − x_j‖ / √D``; density ``ρ_i = exp(−mean d² to its k nearest rows, itself
    included)``; ``δ_i`` = distance to the nearest denser row (``j`` is denser than ``i`` iff
    ``(ρ_j, −j) > (ρ_i, −i)``, the deterministic form of the references' noise), the largest
    distance of all for the densest row. Centres: the ``num_clusters`` largest ``ρ·δ``
    (:func:`topk_det`); every row joins its nearest centre (ties to the smaller centre index),
    a centre joins itself.

    Returns:
        ``(centres, assign)``: ``centres`` ``[C]`` int64 ascending row indices and ``assign``
        ``[N]`` int64, the position in ``centres`` of each row's cluster.
    """
    N, D = x.shape
    if not 1 <= num_clusters <= N:
        raise InputError(f"dpc_knn: cannot make {num_clusters} clusters of {N} rows")
    dist = pairwise_distance(x) / math.sqrt(D)
    kk = max(1, min(int(k), N))
    near = torch.topk(dist, kk, dim=-1, largest=False).values  # values only: ties do not matter
    rho = torch.exp(-(near**2).mean(-1))
    idx = torch.arange(N)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    far = dist.max()
    delta = torch.where(denser, dist, far).min(dim=-1).values
    centres = torch.sort(topk_det(rho * delta, num_clusters)).values
    assign = dist[:, centres].argmin(dim=-1)  # first minimum: the smaller centre index
    assign[centres] = torch.arange(centres.numel())
    return centres, assign


def cluster_means(x: torch.Tensor, assign: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Mean of the rows of ``x`` ``[N, D]`` in each cluster: ``[C, D]`` fp32 (an empty cluster: zeros)."""
    sums = torch.zeros(num_clusters, x.shape[-1]).index_add_(0, assign, x.float())
    n = torch.zeros(num_clusters).index_add_(0, assign, torch.ones(assign.numel()))
    return sums / n.clamp_min(1.0).unsqueeze(-1)
