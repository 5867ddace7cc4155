"""Method registry: ``tokensieve.methods.get(name)`` and ``tokensieve.methods.list()``.

Everything under ``tokensieve.methods`` is pure tensor code (no transformers import), usable
on plain tensors and by other engines.
"""

from __future__ import annotations

import builtins

from ..errors import InputError
from .base import MethodSpec, SegmentContext, Selection, Selector, options_of
from .baselines import RandomSelect, UniformSelect, evenly_spaced
from .budget import (
    BUDGET_POLICIES,
    apportion,
    check_retain,
    fca_budget,
    frame_budget,
    frame_scores,
    retained_count,
    uniform_budget,
)
from .dycoke import DyCoke
from .encoder import EncoderStage, KeyFrames, choose_frames
from .fastvid import FastVID
from .flashvid import FlashVID
from .holitom import HoliTom
from .sparsevlm import SparseVLM
from .inllm import DyCokeDP, FastV, FixedRatioPrune, PDrop, PrunePoint, SampleLayout, select_top
from .lftr import LFTR
from .vidcom2 import VidCom2
from .visionzip import VisionZip

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; names are unique."""
    if spec.name in _REGISTRY:
        raise InputError(f"a method named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``; unknown names raise :class:`InputError`."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def list() -> builtins.list[MethodSpec]:  # noqa: A001 - the public name is part of the API
    """All registered methods, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def names() -> builtins.list[str]:
    return sorted(_REGISTRY)


#: Position handling by default, set by measurement (the position A/B on the two trained
#: embedded models, ``benchmarks/quality/ab.md``): keeping the original position ids beat
#: renumbering for every method on both position schemes except LFTR on 1-D RoPE, where
#: renumbering was 3 points better at every retain. ``reference_positions`` says what each
#: method's reference code did.
PRESERVE = {"1d": "preserve", "mrope": "preserve"}

register(
    MethodSpec(
        name="vidcom2",
        stage="pre-llm",
        summary="VidCom2: frame budgets from frame uniqueness (FCA), tokens by within-frame and video uniqueness",
        factory=VidCom2,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=("fca", "uniform"),
        options=options_of(VidCom2),
        reference="Liu et al., EMNLP 2025 (arXiv 2505.14454)",
    )
)
register(
    MethodSpec(
        name="random",
        stage="pre-llm",
        summary="seeded random subset of each frame's tokens",
        factory=RandomSelect,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=BUDGET_POLICIES,
        options=options_of(RandomSelect),
    )
)
register(
    MethodSpec(
        name="uniform",
        stage="pre-llm",
        summary="evenly spaced spatial subsampling of each frame",
        factory=UniformSelect,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=BUDGET_POLICIES,
        options=options_of(UniformSelect),
    )
)

register(
    MethodSpec(
        name="keyframes",
        stage="pre-encoder",
        summary="encode only the frames that hold the budget, chosen from pixels before the vision encoder",
        factory=KeyFrames,
        default_positions=PRESERVE,
        reference_positions=PRESERVE,
        options=options_of(KeyFrames),
        reference="specs/encoder.md E0 (frame skipping before the tower; RLT, NeurIPS 2024, ranks changes alike)",
    )
)

register(
    MethodSpec(
        name="lftr",
        stage="pre-llm",
        summary="LFTR: adjacent-frame temporal merging, then per-frame spatial removal by question relevance or encoder attention",
        factory=LFTR,
        needs_text=True,
        needs_encoder_attention=False,
        default_positions={"1d": "compact", "mrope": "preserve"},
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(LFTR),
        reference="Zhao, Li and Li, arXiv 2501.17391",
    )
)
register(
    MethodSpec(
        name="visionzip",
        stage="pre-llm",
        summary="VisionZip per frame: dominant tokens by encoder attention plus similarity-merged contextual tokens",
        factory=VisionZip,
        needs_encoder_attention=True,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=BUDGET_POLICIES,
        options=options_of(VisionZip),
        reference="VisionZip, CVPR 2025",
    )
)
register(
    MethodSpec(
        name="dycoke",
        stage="pre-llm",
        summary="DyCoke stage 1 (TTM): every 4th frame whole, the others keep tokens unlike their anchor frame",
        factory=DyCoke,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=BUDGET_POLICIES,
        options=options_of(DyCoke),
        reference="DyCoke, CVPR 2025 (arXiv 2411.15024)",
    )
)

register(
    MethodSpec(
        name="flashvid",
        stage="pre-llm",
        summary="FlashVID: segments, attention-and-diversity picks per frame, temporal tree merging, DPC clustering "
        "(preset='paper': plus its in-LLM stage)",
        factory=FlashVID,
        needs_encoder_attention=True,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(FlashVID),
        reference="Fan et al., ICLR 2026 (arXiv 2602.08024)",
    )
)

register(
    MethodSpec(
        name="fastvid",
        stage="pre-llm",
        summary="FastVID: dynamic segments, salient tokens by encoder attention, density-peak context tokens on "
        "anchor frames that absorb the dropped ones",
        factory=FastVID,
        needs_encoder_attention=True,
        default_positions=PRESERVE,
        reference_positions={"1d": "preserve", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(FastVID),
        reference="Shen et al., NeurIPS 2025 (arXiv 2503.11187)",
    )
)

register(
    MethodSpec(
        name="holitom",
        stage="pre-llm",
        summary="HoliTom: static windows by dynamic programming, static positions merged over time "
        "and clustered, dynamic tokens by attention (inner=True: plus its in-LLM merge)",
        factory=HoliTom,
        needs_encoder_attention=True,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=(),
        options=options_of(HoliTom),
        reference="Shao et al., NeurIPS 2025 (arXiv 2505.21334)",
    )
)

register(
    MethodSpec(
        name="fastv",
        stage="in-llm",
        summary="FastV: after layer K-1, keep the visual tokens the last prompt token attends to most",
        factory=FastV,
        default_positions=PRESERVE,
        reference_positions={"1d": "preserve", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(FastV),
        reference="Chen et al., ECCV 2024 (arXiv 2403.06764)",
    )
)
register(
    MethodSpec(
        name="pdrop",
        stage="in-llm",
        summary="PyramidDrop: geometric visual-token drops at stage boundaries, ranked by the last instruction token",
        factory=PDrop,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(PDrop),
        reference="Xing et al., CVPR 2025",
    )
)

register(
    MethodSpec(
        name="sparsevlm",
        stage="in-llm",
        summary="SparseVLM: text raters rank visual tokens at layers 2/6/15 by their own attention; pruned ones recycled",
        factory=SparseVLM,
        needs_text=True,
        default_positions=PRESERVE,
        reference_positions={"1d": "compact (v1.x) / preserve (v2)", "mrope": "preserve"},
        budget_policies=("uniform", "fca"),
        options=options_of(SparseVLM),
        reference="Zhang et al., ICML 2025 (arXiv 2410.04417); SparseVLM+ as variant='v2'",
    )
)

__all__ = [
    "MethodSpec",
    "SegmentContext",
    "Selection",
    "Selector",
    "get",
    "list",
    "names",
    "register",
    "apportion",
    "check_retain",
    "fca_budget",
    "frame_budget",
    "frame_scores",
    "retained_count",
    "uniform_budget",
    "evenly_spaced",
    "VidCom2",
    "RandomSelect",
    "UniformSelect",
    "LFTR",
    "VisionZip",
    "DyCoke",
    "EncoderStage",
    "KeyFrames",
    "choose_frames",
    "FlashVID",
    "FastVID",
    "HoliTom",
    "FixedRatioPrune",
    "DyCokeDP",
    "SparseVLM",
    "FastV",
    "PDrop",
    "PrunePoint",
    "SampleLayout",
    "select_top",
]
