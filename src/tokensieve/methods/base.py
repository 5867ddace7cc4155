"""What a method is: its declared properties (:class:`MethodSpec`) and its output (:class:`Selection`).

Pure tensor code; no transformers import. A *pre-LLM* method is a callable object with

``select(x: Tensor[T, M, D], retain: float) -> Selection``

that sees the content tokens of one segment (one image or one video of one sample), frame
major, and returns which of the ``T·M`` tokens stay.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

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
        order: optional ``[K]`` permutation of ``range(K)``: the kept tokens enter the language
            model as ``keep[order]`` (a method whose reference emits them out of raster order);
            ``None``: in ``keep``'s (raster) order.
    """

    keep: torch.Tensor
    frame_counts: torch.Tensor
    features: torch.Tensor | None = None
    frame_weights: torch.Tensor | None = None
    order: torch.Tensor | None = None


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
        encoder_received: ``[T, M]`` mean attention each token receives in the vision tower's
            last used layer (heads and queries averaged), where the adapter computes it (LLaVA-
            OneVision's SigLIP); ``None`` elsewhere. Given with ``encoder_attention``.
    """

    modality: str = "video"
    ordinal: int = 0
    grid: tuple[int, int, int] | None = None
    text: torch.Tensor | None = None
    encoder_attention: torch.Tensor | None = None
    encoder_received: torch.Tensor | None = None


class Selector(Protocol):
    """A configured pre-LLM method."""

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection: ...


@runtime_checkable
class ConfiguredSignals(Protocol):
    """A selector whose configuration decides which signals it reads (LFTR's ``spatial`` stage,
    VisionZip's ``dominant_score``): it says so with these two properties, which take precedence
    over its :class:`MethodSpec`'s declared ``needs_text`` / ``needs_encoder_attention``."""

    @property
    def needs_text(self) -> bool: ...

    @property
    def needs_encoder_attention(self) -> bool: ...


@dataclass(frozen=True)
class MethodSpec:
    """Declared properties of a method, shown by ``tokensieve methods``.

    ``default_positions`` maps a model's position style (``"1d"`` or ``"mrope"``) to the
    position handling tokensieve uses there unless ``compress(positions=...)`` says otherwise
    (set from the position A/B, ``benchmarks/quality/ab.md``); ``reference_positions`` to the
    handling the method's reference implementation used (one option away).
    """

    name: str
    stage: str
    summary: str
    factory: Callable[..., Selector]
    needs_text: bool = False
    needs_encoder_attention: bool = False
    default_positions: dict[str, str] = field(default_factory=lambda: {"1d": "preserve", "mrope": "preserve"})
    reference_positions: dict[str, str] = field(default_factory=lambda: {"1d": "compact", "mrope": "preserve"})
    budget_policies: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    reference: str = ""

    def signals(self, selector: Selector) -> tuple[bool, bool]:
        """``(needs_text, needs_encoder_attention)`` of a configured ``selector`` of this method."""
        if isinstance(selector, ConfiguredSignals):
            return bool(selector.needs_text), bool(selector.needs_encoder_attention)
        return self.needs_text, self.needs_encoder_attention

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
        if dataclasses.is_dataclass(self.factory):
            options = check_options(self.name, self.factory, options)
        return self.factory(**options)

    def positions_for(self, style: str) -> str:
        return self.default_positions.get(style, "preserve")


# --- option values ------------------------------------------------------------------------------

INT64_MAX = 2**63 - 1


def as_scalar(value: object) -> object:
    """A 0-d tensor or NumPy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None:
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):
            return value
        return out if isinstance(out, (bool, int, float)) else value
    return value


def _interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` → ``(0.0, 1.0, False, True)``; ``inf`` allowed as a bound."""
    lo_s, hi_s = text[1:-1].split(",")
    return float(lo_s), float(hi_s), text[0] == "[", text[-1] == "]"


def _in_interval(x: float, text: str) -> bool:
    lo, hi, lo_closed, hi_closed = _interval(text)
    return (x > lo or (lo_closed and x == lo)) and (x < hi or (hi_closed and x == hi))


def _number(method: str, name: str, value: object, kind: type, interval: str | None) -> float | int:
    accepted = _describe(kind, interval)
    value = as_scalar(value)
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad and kind is int and isinstance(value, float):
        bad = not (math.isfinite(value) and value.is_integer())
    if bad:
        raise InputError(f"{method} option {name} must be {accepted}, got {value!r} ({type(value).__name__})")
    if kind is int:
        number: float | int = int(value)  # type: ignore[arg-type]
        if not -INT64_MAX - 1 <= number <= INT64_MAX:
            raise InputError(f"{method} option {name} must be {accepted} (a 64-bit integer), got {value!r}")
    else:
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number):
            raise InputError(f"{method} option {name} must be {accepted}, got {value!r}")
    if interval is not None and not _in_interval(float(number), interval):
        raise InputError(f"{method} option {name} must be {accepted}, got {value!r}")
    return number


def check_option(method: str, name: str, value: object, hint: object, interval: str | None = None) -> object:
    """Check one option value against its declared type (``float``, ``int``, ``bool``, ``str``,
    ``tuple[int, ...]``, ``tuple[float, ...]``, unions with ``None``) and, for numbers, the
    interval declared in the field's metadata (``"range"``, e.g. ``"(0, 1]"``). Returns the value
    normalised (NumPy / 0-d tensor scalars become Python numbers, lists become tuples).
    Raises :class:`InputError` naming the option, the value and what is accepted."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    value = as_scalar(value)
    if value is None:
        if type(None) in args:
            return None
        raise InputError(f"{method} option {name} must not be None")
    kinds = [a for a in args if a is not type(None)]
    errors: list[InputError] = []
    for kind in kinds:
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise InputError(f"{method} option {name} must be True or False, got {value!r}")
                return value
            if kind is str:
                if not isinstance(value, str):
                    raise InputError(f"{method} option {name} must be a string, got {value!r} ({type(value).__name__})")
                return value
            if kind in (int, float):
                return _number(method, name, value, kind, interval)
            if typing.get_origin(kind) is tuple:
                item = typing.get_args(kind)[0]
                if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                    raise InputError(
                        f"{method} option {name} must be a list of {'integers' if item is int else 'numbers'}"
                        + (f" in {interval}" if interval else "") + f", got {value!r}"
                    )
                return tuple(_number(method, name, v, item, interval) for v in value)
            return value  # a type this check does not know: the method validates it
        except InputError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    accepted = " or ".join(_describe(k, interval) for k in kinds)
    raise InputError(f"{method} option {name} must be {accepted}, got {value!r}")


def _describe(kind: object, interval: str | None) -> str:
    if kind is int:
        return "an integer" + (f" in {interval}" if interval else "")
    if kind is float:
        return "a finite number" + (f" in {interval}" if interval else "")
    return getattr(kind, "__name__", str(kind))


def check_options(method: str, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """:func:`check_option` for every given option of the dataclass method ``cls``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in options.items():
        f = fields[name]
        out[name] = check_option(method, name, value, hints.get(name), f.metadata.get("range"))
    return out


def options_of(cls: type) -> dict[str, str]:
    """Option name → description for a dataclass selector (from its field metadata)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        bounds = f"range {f.metadata['range']}; " if "range" in f.metadata else ""
        out[f.name] = f"{f.metadata.get('help', '')} ({bounds}default {default!r})".strip()
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
