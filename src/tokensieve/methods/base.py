"""What a method is: its declared properties (:class:`MethodSpec`) and its output (:class:`Selection`).

Pure tensor code; no transformers import. A *pre-LLM* method is a callable object with

``select(x: Tensor[T, M, D], retain: float) -> Selection``

that sees the content tokens of one segment (one image or one video of one sample), frame
major, and returns which of the ``T·M`` tokens stay.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..errors import InputError


@dataclass
class Selection:
    """The kept tokens of one segment.

    Attributes:
        keep: ``[K]`` int64, strictly ascending flat indices into the segment's ``T·M`` tokens.
        frame_counts: ``[T]`` int64, kept tokens per frame (``sum == K``).
        features: optional ``[K, D]`` replacement features for the kept tokens (merging methods);
            ``None`` keeps the original features.
        frame_weights: optional ``[T]`` continuous share of each frame (budget policies).
    """

    keep: torch.Tensor
    frame_counts: torch.Tensor
    features: torch.Tensor | None = None
    frame_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentContext:
    """What a method may know about the segment it scores, besides its features.

    Attributes:
        modality: ``"image"`` or ``"video"``.
        ordinal: index of the segment inside its sample (0, 1, ...); seeds per-segment streams.
        grid: ``(T, H, W)`` in tokens when the segment is a regular grid, else ``(T, 1, M)``.
        text: ``[Q, D]`` embeddings of the sample's question tokens in the LLM embedding space
            (same space as the segment's features); given only to methods with ``needs_text``.
        encoder_attention: ``[T, M]`` non-negative importance of each token from the vision
            encoder (summary-token / pooling-probe attention, or a fallback the adapter
            documents); given only to methods with ``needs_encoder_attention``.
    """

    modality: str = "video"
    ordinal: int = 0
    grid: tuple[int, int, int] | None = None
    text: torch.Tensor | None = None
    encoder_attention: torch.Tensor | None = None


class Selector(Protocol):
    """A configured pre-LLM method."""

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection: ...


@dataclass(frozen=True)
class MethodSpec:
    """Declared properties of a method, shown by ``tokensieve methods``.

    ``default_positions`` maps a model's position style (``"1d"`` or ``"mrope"``) to the
    position handling the method's reference implementation used there.
    """

    name: str
    stage: str
    summary: str
    factory: Callable[..., Selector]
    needs_text: bool = False
    needs_encoder_attention: bool = False
    default_positions: dict[str, str] = field(default_factory=lambda: {"1d": "compact", "mrope": "preserve"})
    budget_policies: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    reference: str = ""

    def create(self, **options: Any) -> Selector:
        """Build a configured selector; unknown options raise :class:`InputError`."""
        unknown = sorted(set(options) - set(self.options))
        if "positions" in unknown:
            raise InputError(
                f"positions is not an option of method {self.name!r}: every method takes it from "
                "compress(model, method, positions='preserve' | 'compact') (CLI: --positions)"
            )
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise InputError(f"method {self.name!r} does not accept option(s) {', '.join(unknown)}; accepted: {accepted}")
        return self.factory(**options)

    def positions_for(self, style: str) -> str:
        return self.default_positions.get(style, "compact")


def options_of(cls: type) -> dict[str, str]:
    """Option name → description for a dataclass selector (from its field metadata)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = f"{f.metadata.get('help', '')} (default {default!r})".strip()
    return out


def validate_choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise InputError(f"{name} must be one of {', '.join(map(repr, accepted))}, got {value!r}")


def check_segment(x: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"a segment must be a [T, M, D] tensor with T, M >= 1, got {shape}")
    return tuple(x.shape)  # type: ignore[return-value]


def gather_per_frame(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flat sorted kept indices from a per-frame ranking.

    Args:
        order: ``[T, M]`` int64, each row the frame's local token indices best-first.
        counts: ``[T]`` tokens to keep per frame.
    Returns:
        ``[Σ counts]`` ascending flat indices ``t·M + m``.
    """
    T, M = order.shape
    parts = []
    for t in range(T):
        local = torch.sort(order[t, : int(counts[t])]).values
        parts.append(local + t * M)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def rank_ascending(score: torch.Tensor) -> torch.Tensor:
    """Per-row indices sorted by ascending score, ties by smaller index (deterministic)."""
    return torch.sort(score, dim=-1, stable=True).indices


def signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect._empty}
