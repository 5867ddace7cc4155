"""UTS: uncertainty-guided token sampling for the cloud–device uplink (CD-CCA, arXiv 2312.16279 §3.2).

Pure tensor code, no transformers import. Two stages, coarse to fine:

1. **Sample level** (:func:`sample_confidence`, :func:`uncertain_samples`): a device keeps (uplinks)
   the samples it answered with low confidence. Confidence comes from the logits of the device's
   own ``generate`` steps, scaled by ``temperature`` and taken before any top-p renormalisation:
   ``"prob_product"`` Π_t max_v softmax(z_t/T) (the reference code; longer answers score lower),
   ``"geo_mean"`` its n-th root (length-normalised), or ``"mean_entropy"`` the mean entropy of
   softmax(z_t/T) (uncertain when *above* the threshold). Reference: T = 0.1, uplink iff the
   product < 0.5.
2. **Token level** (:func:`token_uncertainty`, :func:`select_tokens`): within an uplinked sample,
   each token's uncertainty ``u = mean_c Var_k(dropout_k(F))`` over K seeded inverted-dropout
   copies (the reference: K = 10, p = 0.5), or its expectation in closed form
   (``estimator="analytic"``: ``u = mean_c F²·p/(1 − p)``, since an inverted-dropout copy
   ``F·b/(1−p)``, ``b ~ Bernoulli(1−p)``, has variance ``F²·p/(1−p)``; at p = 0.5 that is the
   token's mean square — the reference's "uncertainty" ranks tokens almost by their norm).
   Exactly ``⌊(1 − mask_ratio)·n⌋`` tokens are kept (the reference's strict ``<`` threshold
   can keep fewer), ties broken by slot number; ``direction="keep_low"`` keeps the least
   uncertain (the reference code), ``"keep_high"`` the most (the paper's text);
   ``scope="batch"`` ranks over the whole batch (the reference), ``"per_sample"`` per sample.

Any of the library's own token selectors can choose the uplinked tokens instead
(:func:`method_keep`): a token-compression method is a natural uplink filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import InputError
from .base import SegmentContext, validate_choice

SAMPLE_SCORES = ("prob_product", "geo_mean", "mean_entropy")
ESTIMATORS = ("mc_dropout", "analytic")
DIRECTIONS = ("keep_low", "keep_high")
SCOPES = ("batch", "per_sample")
PAYLOADS = ("dense_zeroed", "sparse")


def _steps(logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``[B, n, V]`` fp32 from ``generate``'s per-step logits (a tuple of ``[B, V]``) or a tensor."""
    if isinstance(logits, torch.Tensor):
        z = logits
    else:
        steps = list(logits)
        if not steps:
            raise InputError("sample confidence needs at least one generated step's logits")
        z = torch.stack([s.float() for s in steps], dim=1)
    if z.dim() != 3 or z.shape[1] < 1:
        raise InputError(f"logits must be [B, n, V] (n >= 1 steps), got shape {tuple(z.shape)}")
    return z.float()


def sample_confidence(
    logits: Sequence[torch.Tensor] | torch.Tensor,
    *,
    score: str = "prob_product",
    temperature: float = 0.1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Confidence (or, for ``"mean_entropy"``, uncertainty) of each sample's answer, ``[B]`` fp32.

    Args:
        logits: the raw logits of each generated step (``generate(..., output_logits=True)``):
            a sequence of ``[B, V]`` or a ``[B, n, V]`` tensor.
        score: ``"prob_product"`` (reference), ``"geo_mean"`` or ``"mean_entropy"``.
        temperature: the decoding temperature T (> 0); probabilities are softmax(z/T).
        valid: optional ``[B, n]`` bool, the steps that belong to each answer (False after its
            end-of-sequence token); default: every step.
    """
    validate_choice("UTS sample score", score, SAMPLE_SCORES)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"UTS temperature must be a positive finite number, got {temperature!r}")
    z = _steps(logits) / float(temperature)
    B, n, _ = z.shape
    mask = torch.ones(B, n, dtype=torch.bool, device=z.device) if valid is None else valid.to(z.device).bool()
    if tuple(mask.shape) != (B, n):
        raise InputError(f"valid must be [B, n] = {(B, n)}, got {tuple(mask.shape)}")
    logp = torch.log_softmax(z, dim=-1)
    count = mask.sum(dim=1).clamp_min(1).float()
    if score == "mean_entropy":
        ent = -(logp.exp() * logp).sum(-1)
        return (ent * mask).sum(1) / count
    top = logp.max(dim=-1).values * mask  # log p_t of each counted step
    total = top.sum(1)
    return total.exp() if score == "prob_product" else (total / count).exp()


def uncertain_samples(confidence: torch.Tensor, *, score: str = "prob_product", threshold: float = 0.5) -> torch.Tensor:
    """``[B]`` bool: the samples to uplink — confidence below ``threshold`` (for
    ``"mean_entropy"``: entropy above it)."""
    validate_choice("UTS sample score", score, SAMPLE_SCORES)
    return confidence > threshold if score == "mean_entropy" else confidence < threshold


def token_uncertainty(
    features: torch.Tensor,
    *,
    estimator: str = "mc_dropout",
    p: float = 0.5,
    samples: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """Per-token uncertainty ``[B, N]`` fp32 of ``features`` ``[B, N, C]``.

    ``"mc_dropout"``: the unbiased variance over ``samples`` inverted-dropout copies (drop
    probability ``p``, a generator seeded with ``seed``: reproducible), averaged over channels.
    ``"analytic"``: its expectation ``mean_c F²·p/(1−p)`` (deterministic, no sampling).
    """
    validate_choice("UTS estimator", estimator, ESTIMATORS)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or min(features.shape) < 1:
        raise InputError(f"features must be a non-empty [B, N, C] tensor, got {getattr(features, 'shape', features)!r}")
    if not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise InputError(f"UTS dropout p must be in (0, 1), got {p!r}")
    f = features.float()
    if estimator == "analytic":
        return f.square().mean(-1) * (p / (1.0 - p))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise InputError(f"UTS mc_dropout needs samples >= 2 (a variance), got {samples!r}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = torch.empty((samples, *f.shape), dtype=torch.float32)
    for k in range(samples):
        keep = (torch.rand(f.shape, generator=g) >= p).to(torch.float32)
        draws[k] = f.cpu() * keep / (1.0 - p)
    return draws.var(dim=0, unbiased=True).mean(-1).to(features.device)


def kept_count(n: int, mask_ratio: float) -> int:
    """``⌊(1 − mask_ratio)·n⌋`` tokens kept out of ``n`` (computed in float64)."""
    return int(math.floor((1.0 - float(mask_ratio)) * n + 1e-12))


def select_tokens(
    uncertainty: torch.Tensor,
    *,
    mask_ratio: float = 0.25,
    direction: str = "keep_low",
    scope: str = "batch",
) -> torch.Tensor:
    """``[B, N]`` bool keep mask: exactly :func:`kept_count` tokens (over the batch or per
    sample), the least (``keep_low``) or most (``keep_high``) uncertain, ties by slot number."""
    validate_choice("UTS direction", direction, DIRECTIONS)
    validate_choice("UTS scope", scope, SCOPES)
    if not (isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio < 1.0):
        raise InputError(f"UTS mask_ratio must be in [0, 1), got {mask_ratio!r}")
    if uncertainty.dim() != 2:
        raise InputError(f"uncertainty must be [B, N], got shape {tuple(uncertainty.shape)}")
    B, N = uncertainty.shape
    u = uncertainty.float().cpu()
    keep = torch.zeros(B * N if scope == "batch" else N, dtype=torch.bool)

    def pick(values: torch.Tensor) -> torch.Tensor:
        k = kept_count(values.numel(), mask_ratio)
        key = values if direction == "keep_low" else -values
        order = torch.sort(key, stable=True).indices  # ties: the smaller slot first
        out = torch.zeros(values.numel(), dtype=torch.bool)
        out[order[:k]] = True
        return out

    if scope == "batch":
        keep = pick(u.reshape(-1)).view(B, N)
    else:
        keep = torch.stack([pick(u[b]) for b in range(B)])
    return keep.to(uncertainty.device)


def method_keep(features: torch.Tensor, method: str, retain: float, **options: object) -> torch.Tensor:
    """``[T·M]`` bool keep mask chosen by one of the library's pre-LLM token selectors
    (e.g. ``"vidcom2"``) on one sample's ``[T, M, D]`` tokens, instead of the dropout score."""
    from . import get

    spec = get(method)
    if spec.stage != "pre-llm":
        raise InputError(f"method {method!r} prunes inside the language model; an uplink filter needs a pre-LLM method")
    if spec.needs_text or spec.needs_encoder_attention:
        raise InputError(f"method {method!r} needs the question or encoder attention, which an uplink filter "
                         "does not have; use a method that scores the tokens alone (vidcom2, dycoke, uniform, ...)")
    if features.dim() != 3:
        raise InputError(f"features must be [T, M, D], got shape {tuple(features.shape)}")
    selector = spec.create(**options)
    from .budget import check_retain

    sel = selector.select(features, check_retain(retain), SegmentContext())
    keep = torch.zeros(features.shape[0] * features.shape[1], dtype=torch.bool)
    keep[sel.keep.cpu()] = True
    return keep


@dataclass
class UTS:
    """A configured UTS uplink filter (defaults: the reference code's)."""

    sample_score: str = field(default="prob_product", metadata={"help": "'prob_product' (code), 'geo_mean', 'mean_entropy'"})
    threshold: float = field(default=0.5, metadata={"help": "uplink when confidence < threshold (entropy: >)"})
    temperature: float = field(default=0.1, metadata={"help": "decoding temperature of the confidence"})
    estimator: str = field(default="mc_dropout", metadata={"help": "'mc_dropout' (code) or 'analytic'"})
    p: float = field(default=0.5, metadata={"help": "dropout probability"})
    samples: int = field(default=10, metadata={"help": "MC-dropout copies K"})
    seed: int = field(default=0, metadata={"help": "MC-dropout generator seed"})
    mask_ratio: float = field(default=0.25, metadata={"help": "share of tokens masked (paper's best: 0.5)"})
    direction: str = field(default="keep_low", metadata={"help": "'keep_low' (code) or 'keep_high' (paper)"})
    scope: str = field(default="batch", metadata={"help": "'batch' (code) or 'per_sample'"})
    payload: str = field(default="dense_zeroed", metadata={"help": "'dense_zeroed' (code) or 'sparse'"})

    def __post_init__(self) -> None:
        validate_choice("UTS sample_score", self.sample_score, SAMPLE_SCORES)
        validate_choice("UTS estimator", self.estimator, ESTIMATORS)
        validate_choice("UTS direction", self.direction, DIRECTIONS)
        validate_choice("UTS scope", self.scope, SCOPES)
        validate_choice("UTS payload", self.payload, PAYLOADS)

    def samples_to_uplink(self, logits: Sequence[torch.Tensor] | torch.Tensor,
                          valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uplink [B] bool, confidence [B])`` from the device's generation logits."""
        conf = sample_confidence(logits, score=self.sample_score, temperature=self.temperature, valid=valid)
        return uncertain_samples(conf, score=self.sample_score, threshold=self.threshold), conf

    def tokens_to_keep(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` bool keep mask of the uplinked samples' tokens ``[B, N, C]``."""
        u = token_uncertainty(features, estimator=self.estimator, p=self.p, samples=self.samples, seed=self.seed)
        return select_tokens(u, mask_ratio=self.mask_ratio, direction=self.direction, scope=self.scope)
