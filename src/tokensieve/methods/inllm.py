"""In-LLM methods: prune visual tokens between decoder layers, ranked by text→visual attention.

Pure tensor code. The runtime runs the decoder layer by layer and, at each prune point,
hands the method exactly the attention rows it asks for — post-softmax probabilities
``[H, R, Lk]`` (fp32) of the chosen query rows over all keys, computed from the model's own
post-RoPE queries and keys, never a full ``[H, L, L]`` map. The method turns them into one
score per visual token; the runtime keeps the top ones (optionally per frame, with FCA
budgets) and shrinks the sequence.

Words: ``V0`` visual tokens at the LLM input, ``L`` decoder layers. A :class:`PrunePoint`
prunes the *output* of decoder layer ``layer``: later layers, and their KV caches, hold only
the kept tokens. Its scores come from the attention of that layer itself
(``source="self"``: FastV, SparseVLM) or of the next layer, recomputed from the current
hidden states before it runs (``source="next"``: PDrop).

Retain and equivalent tokens (``specs/baselines.md`` §0.1, ``specs/sparsevlm.md`` §8):
``equivalent="input"`` (default) chooses the keep counts so that the mean number of visual
tokens *entering* each layer, ``E_in = (1/L)·Σ_l V_in(l)``, is ``retain·V0``;
``"output"`` uses the mean over layer outputs ``E_out`` (the SparseVLM reference count);
``"keep"`` reads ``retain`` as the fraction kept at the (first) prune point.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import InputError
from .base import validate_choice
from .budget import apportion
from .cluster import cosine

EQUIVALENT_MODES = ("input", "output", "keep")


@dataclass(frozen=True)
class PrunePoint:
    """Prune the output of decoder layer ``layer`` down to ``keep`` visual tokens."""

    layer: int
    keep: int
    source: str = "self"


@dataclass
class SampleLayout:
    """Where things are in one sample's current sequence (indices into that layer's sequence).

    Attributes:
        visual: ``[V]`` ascending indices of the visual tokens still present.
        text: ``[Nt]`` indices of the text after the last visual token (the question and the
            chat template), padding excluded.
        last: index of the last prompt token.
        frame: ``[V]`` frame id of each visual token (unique across the sample's segments).
    """

    visual: torch.Tensor
    text: torch.Tensor
    last: int
    frame: torch.Tensor


@dataclass(frozen=True)
class PruneContext:
    """What a method may read at one prune point of one sample (built by the runtime, never
    mutated).

    Attributes:
        layout: where the visual and text tokens are in this layer's sequence.
        point: the prune point (layer, scheduled keep count, attention source).
        rows: ``[R]`` the query rows whose attention was captured.
        positions: rotary positions of the sequence, ``[L]`` (1-D RoPE) or ``[3, L]`` (M-RoPE).
        head_dim, rope_theta, mrope_section: the model's rotary constants.
        state: what :meth:`InLLMMethod.prepare_sample` returned for this sample.
    """

    layout: SampleLayout
    point: PrunePoint
    rows: torch.Tensor
    positions: torch.Tensor
    head_dim: int = 0
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] | None = None
    state: Any = None


class InLLMMethod:
    """The contract between an in-LLM method and the runtime; every hook but :meth:`plan`,
    :meth:`rows`, :meth:`score` and :meth:`check_depth` has a default.

    Per prefill the runtime calls :meth:`prepare_sample` once per sample; at each prune point
    it computes the attention of :meth:`rows` over the current keys, asks :meth:`score` for one
    value per visual token, keeps ``dynamic_keep`` (if not ``None``) or ``keep_bound(point.keep, V)``
    of them — per frame with FCA weights when :attr:`uses_fca` — and inserts what
    :meth:`recycle_tokens` returns after the last kept visual token.
    """

    stage = "in-llm"

    def check_depth(self, num_layers: int) -> None:
        """Raise :class:`InputError` when a layer index does not exist in ``num_layers`` layers."""
        raise NotImplementedError

    def plan(self, num_visual: int, num_layers: int, retain: float) -> list[PrunePoint]:
        """The prune points for ``num_visual`` visual tokens in a ``num_layers``-layer model."""
        raise NotImplementedError

    def for_depth(self, num_layers: int) -> "InLLMMethod":
        """This configuration with concrete layer indices for ``num_layers`` layers."""
        return self

    def prepare_sample(self, h_visual: torch.Tensor, h_text: torch.Tensor) -> Any:
        """Per-sample state from the layer-0 embeddings (``None``: nothing to prepare)."""
        return None

    def rows(self, layout: SampleLayout, state: Any = None) -> torch.Tensor:
        """``[R]`` query rows whose attention ranks the visual tokens."""
        raise NotImplementedError

    def score(self, attn: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
        """``[V]`` score of each visual token from ``attn`` ``[H, R, Lk]`` (higher is kept)."""
        raise NotImplementedError

    def keep_bound(self, keep: int, num_visual: int) -> int:
        """How many of ``num_visual`` tokens a scheduled ``keep`` really keeps."""
        return min(int(keep), int(num_visual))

    def dynamic_keep(self, attn: torch.Tensor, ctx: PruneContext) -> int | None:
        """A keep count decided from the attention itself (``None``: the schedule's)."""
        return None

    def recycle_tokens(self, hidden: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features [c, D], centre index [c] into the pruned tokens)`` to re-insert, or ``None``."""
        return None

    @property
    def uses_fca(self) -> bool:
        """Whether keep counts are spread over frames with FCA weights."""
        return getattr(self, "budget", "uniform") == "fca"


def uses_fca(method: InLLMMethod | None) -> bool:
    """Whether an in-LLM method spreads its keep counts over frames with FCA weights."""
    return bool(method is not None and method.uses_fca)


def head_mean_rows(attn: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Mean over heads and query rows of the attention paid to each visual column: ``[V]``."""
    return attn.float().mean(dim=0)[:, visual].mean(dim=0)


def select_top(
    score: torch.Tensor,
    k: int,
    frame: torch.Tensor | None = None,
    frame_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the ``k`` best-scoring tokens; ties go to the earlier token.

    With ``frame`` ``[V]`` and ``frame_weights`` ``[F]`` (FCA), ``k`` is first apportioned over
    frames in proportion to the weights (bounded by each frame's tokens, at least one per
    frame when ``k`` allows) and each frame keeps its own best tokens.
    """
    V = score.numel()
    k = max(0, min(int(k), V))
    order = torch.sort(-score.float(), stable=True).indices
    if frame is None or frame_weights is None:
        return torch.sort(order[:k]).values
    ids, inverse = torch.unique(frame, return_inverse=True)
    counts = torch.bincount(inverse, minlength=ids.numel())
    weights = frame_weights.to(torch.float64)[ids]
    lower = 1 if k >= ids.numel() else 0
    quota = weights / weights.sum().clamp_min(1e-12) * k
    per = apportion(quota, k, counts, priority=weights, lower=lower)
    keep = []
    for j in range(ids.numel()):
        members = (inverse == j).nonzero(as_tuple=True)[0]
        local = torch.sort(-score[members].float(), stable=True).indices[: int(per[j])]
        keep.append(members[local])
    return torch.sort(torch.cat(keep)).values if keep else order[:0]


def check_layers(name: str, layers: tuple[int, ...], num_layers: int) -> None:
    """Every layer index is an integer in ``[0, num_layers)``; raises :class:`InputError` naming ``name``."""
    for layer in layers:
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or layer < 0:
            raise InputError(f"{name}: layer indices must be non-negative integers, got {layer!r}")
        if layer >= num_layers:
            raise InputError(
                f"{name}: layer {layer} is past the language model's depth ({num_layers} layers, indices 0..{num_layers - 1})"
            )


DEPTHS = ("published", "scaled")
#: depth of the language model each method's layer indices were published for
FASTV_REF_DEPTH = 32  # LLaVA-1.5-7B (FastV, arXiv 2403.06764 §4: K = 2)
PDROP_REF_DEPTH = 32  # LLaVA-1.5 / LLaVA-NeXT-7B (PyramidDrop, arXiv 2410.17247 §4: layers 8, 16, 24)
SPARSEVLM_REF_DEPTH = 32  # LLaVA-1.5-7B (SparseVLM, arXiv 2410.04417 §4: layers 2, 6, 15)
DYCOKE_REF_DEPTH = 28  # LLaVA-OV-7B's Qwen2-7B (DyCoke, arXiv 2411.15024 §4: decode layer 3)


def scaled_layers(layers: tuple[int, ...] | list[int], num_layers: int, ref_depth: int, low: int = 0) -> tuple[int, ...]:
    """Published layer indices placed at the same fraction of a model of ``num_layers`` layers.

    The rule (fixed before any accuracy was looked at): ``l' = ⌊l·L/L_ref + ½⌋``, raised to at least
    ``low`` (1 for "first layer that sees the pruned sequence" indices), then to one more than the
    previous index so the list stays strictly increasing; an index that would pass the last layer
    is an error. On the published depth the indices are unchanged.
    """
    out: list[int] = []
    for layer in layers:
        v = max(int(low), math.floor(int(layer) * num_layers / ref_depth + 0.5))
        if out:
            v = max(v, out[-1] + 1)
        out.append(v)
    if out and out[-1] >= num_layers:
        raise InputError(f"cannot place {len(out)} layers {tuple(layers)} (published for {ref_depth} layers) "
                         f"in a {num_layers}-layer language model")
    return tuple(out)


def prefill_flops(n_per_layer: Sequence[int], d: int, m: int, d_kv: int | None = None) -> float:
    """Prefill cost ``Σ_l F(n_l)`` in the FastV / SparseVLM convention (SparseVLM spec §9).

    ``F(n) = n·d·(2d + 2·d_kv) + 2·n²·d + 3·n·d·m`` with ``d_kv = H_kv·d_h`` (GQA);
    ``d_kv=None`` means MHA (``d_kv = d``), i.e. ``4nd² + 2n²d + 3ndm``. ``n_l`` is the full
    sequence length entering layer ``l`` (text + visual). The counts are multiply–accumulates
    labelled "FLOPs" (×2 for strict FLOPs); the causal ``n²`` term is not halved.
    LLaVA-1.5-7B (``d = 4096``, ``m = 11008``, 32 layers, ``n = 694``): 4.62e12.
    """
    if not (_is_int(d) and d > 0 and _is_int(m) and m > 0):
        raise InputError(f"d and m must be positive ints, got d={d!r}, m={m!r}")
    dkv = d if d_kv is None else d_kv
    if not (_is_int(dkv) and dkv > 0):
        raise InputError(f"d_kv must be a positive int or None, got {d_kv!r}")
    total = 0
    for n in n_per_layer:
        if not _is_int(n) or n < 0:
            raise InputError(f"sequence lengths must be non-negative ints, got {n!r}")
        total += n * d * (2 * d + 2 * dkv) + 2 * n * n * d + 3 * n * d * m
    return float(total)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_depth_choice(name: str, depth: str) -> None:
    validate_choice(f"{name} option depth", depth, DEPTHS)


def _keep_count(name: str, value: float, V0: int) -> int:
    k = int(math.floor(value + 0.5))
    if k < 1:
        raise InputError(f"{name}: the requested budget leaves no visual token at the prune point (V0={V0})")
    return min(k, V0)


@dataclass
class FastV(InLLMMethod):
    """FastV: after layer ``K − 1``, keep the visual tokens the last prompt token attends to most.

    ``K`` (``layer``) is the first layer that sees the pruned sequence (paper default 2).
    Positions default to ``preserve`` (the reference keeps the original ids, with gaps).
    """

    layer: int = field(default=2, metadata={"range": "[1, inf)", "help": "K: first layer that sees the pruned sequence (>= 1)"})
    query: str = field(default="last", metadata={"help": "ranking rows: 'last' prompt token or 'mean_text'"})
    equivalent: str = field(default="input", metadata={"help": "retain means E_in, E_out or 'keep' at layer K"})
    budget: str = field(default="uniform", metadata={"help": "'uniform' (global top-k) or 'fca' per-frame budgets"})
    depth: str = field(default="published", metadata={
        "help": "'published' (layer as given) or 'scaled' (layer given for 32 layers, placed at the same depth fraction)"})

    stage = "in-llm"

    def __post_init__(self) -> None:
        _check_depth_choice("fastv", self.depth)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise InputError(f"fastv option layer (K) must be an integer >= 1, got {self.layer!r}")
        validate_choice("fastv option query", self.query, ("last", "mean_text"))
        validate_choice("fastv option equivalent", self.equivalent, EQUIVALENT_MODES)
        validate_choice("fastv option budget", self.budget, ("uniform", "fca"))

    def for_depth(self, num_layers: int) -> "FastV":
        """This configuration with concrete layer indices for a ``num_layers``-layer model."""
        if self.depth == "published":
            return self
        (k,) = scaled_layers((self.layer,), num_layers, FASTV_REF_DEPTH, low=1)
        return dataclasses.replace(self, layer=k, depth="published")

    def check_depth(self, num_layers: int) -> None:
        check_layers("fastv", (self.layer,), num_layers)

    def plan(self, V0: int, num_layers: int, retain: float) -> list[PrunePoint]:
        K, L = self.layer, num_layers
        if self.equivalent == "keep":
            k = retain * V0
        elif self.equivalent == "input":  # (K·V0 + (L − K)·k) / L = r·V0
            k = (retain * L - K) * V0 / (L - K)
        else:  # ((K − 1)·V0 + (L − K + 1)·k) / L = r·V0
            k = (retain * L - (K - 1)) * V0 / (L - K + 1)
        if k < 0.5:
            raise InputError(
                f"fastv: retain={retain} leaves no visual token after layer K={K} of {L} layers with "
                f"equivalent={self.equivalent!r} (retain must be above "
                f"{K / L if self.equivalent == 'input' else (K - 1) / L:.3f}); "
                "raise retain, lower K, or use equivalent='keep'"
            )
        return [PrunePoint(K - 1, _keep_count("fastv", k, V0), "self")]

    def rows(self, layout: SampleLayout, state: Any = None) -> torch.Tensor:
        if self.query == "mean_text" and layout.text.numel():
            return layout.text
        return torch.tensor([layout.last], dtype=torch.long, device=layout.visual.device)

    def score(self, attn: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
        return head_mean_rows(attn, ctx.layout.visual)


@dataclass
class PDrop(InLLMMethod):
    """PyramidDrop: at each stage boundary ``b``, rank the visual tokens by the attention that
    layer ``b`` would pay them from the last instruction token, and keep a geometric share.

    ``layers=None`` places the boundaries at 1/4, 1/2 and 3/4 of the depth (the reference's
    8/16/24 on 32 layers). ``ratios`` gives the stage keep fractions of ``V0`` explicitly
    (reference: 0.5, 0.25, 0.125); otherwise ``λ_s = λ^s`` with ``λ`` solved so that the
    ``equivalent`` count equals ``retain·V0``. Positions default to ``compact``.
    """

    layers: tuple[int, ...] | None = field(default=None, metadata={"range": "[1, inf)", "help": "stage boundaries (None: L/4, L/2, 3L/4)"})
    ratios: tuple[float, ...] | None = field(default=None, metadata={"range": "(0, 1]", "help": "keep fraction per stage (None: from retain)"})
    equivalent: str = field(default="input", metadata={"help": "retain means E_in or E_out ('keep': first stage)"})
    budget: str = field(default="uniform", metadata={"help": "'uniform' (global top-k) or 'fca' per-frame budgets"})
    depth: str = field(default="published", metadata={
        "help": "'published' (layers as given) or 'scaled' (layers given for 32 layers, placed at the same depth fractions)"})

    stage = "in-llm"

    def __post_init__(self) -> None:
        _check_depth_choice("pdrop", self.depth)
        validate_choice("pdrop option equivalent", self.equivalent, EQUIVALENT_MODES)
        validate_choice("pdrop option budget", self.budget, ("uniform", "fca"))
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 1:
                raise InputError(f"pdrop option layers must be strictly increasing integers >= 1, got {self.layers!r}")
        if self.ratios is not None:
            self.ratios = tuple(float(r) for r in self.ratios)
            if any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
                raise InputError(f"pdrop option ratios must be non-increasing fractions in (0, 1], got {self.ratios!r}")
            if self.layers is not None and len(self.ratios) != len(self.layers):
                raise InputError("pdrop options layers and ratios must have the same length")

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        n = len(self.ratios) if self.ratios is not None else 3
        out = sorted({max(1, round(num_layers * (s + 1) / (n + 1))) for s in range(n)})
        return tuple(b for b in out if b < num_layers)

    def for_depth(self, num_layers: int) -> "PDrop":
        """Concrete boundaries for a ``num_layers``-layer model (the default ones are fractions already)."""
        if self.depth == "published" or self.layers is None:
            return dataclasses.replace(self, depth="published") if self.depth != "published" else self
        return dataclasses.replace(self, layers=scaled_layers(self.layers, num_layers, PDROP_REF_DEPTH, low=1),
                                   depth="published")

    def check_depth(self, num_layers: int) -> None:
        bounds = self.boundaries(num_layers)
        if not bounds:
            raise InputError(f"pdrop: a {num_layers}-layer model has no room for a stage boundary")
        check_layers("pdrop", bounds, num_layers)

    def _counts(self, lam: float, V0: int, n: int) -> list[int]:
        return [max(1, math.floor(V0 * lam ** (s + 1))) for s in range(n)]

    def plan(self, V0: int, num_layers: int, retain: float) -> list[PrunePoint]:
        bounds = self.boundaries(num_layers)
        L = num_layers
        if self.ratios is not None:
            counts = [max(1, math.floor(V0 * r)) for r in self.ratios]
        elif self.equivalent == "keep":
            counts = self._counts(retain, V0, len(bounds))
        else:
            shift = 0 if self.equivalent == "input" else 1

            def equiv(lam: float) -> float:
                c = self._counts(lam, V0, len(bounds))
                edges = [b - shift for b in bounds] + [L]
                total = edges[0] * V0 + sum((edges[i + 1] - edges[i]) * c[i] for i in range(len(c)))
                return total / L

            lo, hi = 0.0, 1.0
            if equiv(0.0) > retain * V0 + 1e-9:
                raise InputError(
                    f"pdrop: retain={retain} is not above the minimum this schedule reaches "
                    f"({equiv(0.0) / V0:.3f}: the layers before the first boundary see every visual token); "
                    "lower the first boundary (layers=...), raise retain, or use equivalent='output'"
                )
            for _ in range(60):
                mid = (lo + hi) / 2
                if equiv(mid) > retain * V0:
                    hi = mid
                else:
                    lo = mid
            counts = self._counts(lo, V0, len(bounds))
        counts = [min(c, V0) for c in counts]
        return [PrunePoint(b - 1, c, "next") for b, c in zip(bounds, counts)]

    def rows(self, layout: SampleLayout, state: Any = None) -> torch.Tensor:
        return torch.tensor([layout.last], dtype=torch.long, device=layout.visual.device)

    def score(self, attn: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
        return head_mean_rows(attn, ctx.layout.visual)


@dataclass
class FixedRatioPrune(InLLMMethod):
    """The in-LLM stage of a pre-LLM method (FlashVID's ``fastv_prune``, arXiv 2602.08024):
    before decoder layer ``layer``, keep ``⌈ratio·V⌉`` of the ``V`` visual tokens that reach it,
    ranked by the last prompt token's attention at layer ``layer − 1`` (head mean). Its count
    depends on ``V`` only, not on the run's retain."""

    name: str = "in-llm stage"
    layer: int = 20
    ratio: float = 0.3

    stage = "in-llm"
    #: how the owning method names these settings in its options (error messages)
    layer_option = "llm_layer"
    ratio_option = "llm_ratio"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise InputError(f"{self.name} option {self.layer_option} must be an integer >= 1, got {self.layer!r}")
        self._check_ratio()

    def _check_ratio(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise InputError(f"{self.name} option {self.ratio_option} must be in (0, 1], got {self.ratio!r}")

    def check_depth(self, num_layers: int) -> None:
        check_layers(f"{self.name} {self.layer_option}", (self.layer,), num_layers)

    def plan(self, num_visual: int, num_layers: int, retain: float) -> list[PrunePoint]:
        keep = max(1, min(num_visual, math.ceil(self.ratio * num_visual)))  # float64, as the reference
        return [PrunePoint(self.layer - 1, keep, "self")]

    def rows(self, layout: SampleLayout, state: Any = None) -> torch.Tensor:
        return torch.tensor([layout.last], dtype=torch.long, device=layout.visual.device)

    def score(self, attn: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
        return head_mean_rows(attn, ctx.layout.visual)


MERGE_OPS = ("sequential", "mean")


@dataclass
class MergePrune(FixedRatioPrune):
    """HoliTom's inner stage (arXiv 2505.21334 §3.3): before decoder layer ``layer``, keep the
    ``round(V·(1 − ratio))`` visual tokens the last prompt token attends to most at layer
    ``layer − 1`` (head mean; Python's half-to-even ``round``, as the reference), and merge every
    other visual token into its most cosine-similar kept one (:meth:`merge_dropped`)."""

    name: str = "holitom"
    layer: int = 18
    ratio: float = 0.5
    op: str = "sequential"

    layer_option = "inner_layer"
    ratio_option = "inner_ratio"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_choice(f"{self.name} option inner_op", self.op, MERGE_OPS)

    def _check_ratio(self) -> None:  # the share merged away: 0 merges nothing, 1 would keep nothing
        if not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise InputError(f"{self.name} option {self.ratio_option} must be in [0, 1), got {self.ratio!r}")

    def plan(self, num_visual: int, num_layers: int, retain: float) -> list[PrunePoint]:
        keep = max(1, min(num_visual, round(num_visual * (1 - self.ratio))))
        return [PrunePoint(self.layer - 1, keep, "self")]

    def merge_dropped(self, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """New states ``[k, D]`` of the kept tokens ``kept`` ``[k, D]`` after absorbing ``dropped``
        ``[n, D]`` (sequence order). Each dropped token goes to its most cosine-similar kept token
        (ties to the earlier one). ``op="sequential"`` is the reference's in-place pairwise
        average in sequence order, ``h ← (h + x_j)/2`` — in closed form
        ``h·2^{−n} + Σ_i x_{j_i}·2^{−(n−i+1)}``; ``op="mean"`` averages ``h`` and its tokens."""
        if dropped.shape[0] == 0:
            return kept
        kf, df = kept.float(), dropped.float()
        assign = cosine(df, kf).argmax(dim=-1)  # first maximum: the earlier kept token
        k = kf.shape[0]
        onehot = torch.nn.functional.one_hot(assign, k).to(torch.float64)  # [n, k]
        n = onehot.sum(0)  # tokens per kept one
        if self.op == "mean":
            out = (kf.double() + onehot.T @ df.double()) / (n + 1).unsqueeze(-1)
            return out.to(kept.dtype)
        later = onehot.flip(0).cumsum(0).flip(0) - onehot  # dropped tokens after j in j's group
        r = (later * onehot).sum(-1)  # [n]
        w = torch.pow(2.0, -(r + 1))
        out = kf.double() * torch.pow(2.0, -n).unsqueeze(-1) + onehot.T @ (w.unsqueeze(-1) * df.double())
        return out.to(kept.dtype)


@dataclass
class DyCokeDP:
    """DyCoke stage 2: dynamic pruning of the visual KV cache while decoding.

    At every decode step the new token's attention at layer ``layer − 1`` (head mean, visual
    columns) is compared with the previous step's by cosine similarity; when it changed
    (``< threshold``) the layers ``>= layer`` attend, for this step, only to the top
    ``(1 − prune)`` of the visual tokens by that attention. The cache itself is kept whole.
    ``stable="reference"`` attends to everything on stable steps (the reference);
    ``"reuse_previous"`` keeps the last selection.
    """

    layer: int = field(default=3, metadata={"range": "[1, inf)", "help": "first layer whose attention is pruned at decode (>= 1)"})
    prune: float = field(default=0.7, metadata={"help": "fraction of visual KV hidden per changed step, in [0, 1)"})
    threshold: float = field(default=0.9, metadata={"help": "cosine similarity below which the selection is redone"})
    stable: str = field(default="reference", metadata={"help": "'reference' or 'reuse_previous' on stable steps"})

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise InputError(f"dycoke option dp_layer must be an integer >= 1, got {self.layer!r}")
        if not (isinstance(self.prune, (int, float)) and 0 <= self.prune < 1):
            raise InputError(f"dycoke option dp_prune must be in [0, 1), got {self.prune!r}")
        validate_choice("dycoke option dp_stable", self.stable, ("reference", "reuse_previous"))

    def check_depth(self, num_layers: int) -> None:
        check_layers("dycoke dp", (self.layer,), num_layers)

    def keep_count(self, V: int) -> int:
        return max(1, math.floor((1 - self.prune) * V))

    def step(
        self, attn_row: torch.Tensor, visual: torch.Tensor, previous: torch.Tensor | None, last_keep: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One decode step for one sample.

        Args:
            attn_row: ``[H, 1, Lk]`` attention of the new token at layer ``layer − 1``.
            visual: ``[V]`` visual key indices. previous: last step's ``[V]`` attention or None.
        Returns:
            ``(keep, a)``: ascending visual key indices to attend to in layers ``>= layer``
            this step (``None``: all), and this step's ``[V]`` attention vector.
        """
        a = head_mean_rows(attn_row, visual)
        sim = 0.0 if previous is None else float(torch.nn.functional.cosine_similarity(a, previous, dim=0))
        if sim < self.threshold:
            local = select_top(a, self.keep_count(visual.numel()))
            return visual[local], a
        if self.stable == "reuse_previous":
            return last_keep, a
        return None, a
