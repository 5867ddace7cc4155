"""Public API: ``compress``, ``restore``, ``stats``."""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import methods as _methods
from .errors import InputError
from .methods.budget import check_retain
from .methods.encoder import stage_options
from .models import get_adapter
from .runtime import POSITION_MODES, TrimState, TrimStats, get_state, install, uninstall
from .runtime.inllm import check_ranking_layers
from .runtime.patch import check_transformers, lm_shape
from .runtime.tower import check_tower


class TrimHandle:
    """Returned by :func:`compress`. Use as a context manager to restore on exit."""

    def __init__(self, model: torch.nn.Module, state: TrimState) -> None:
        self.model = model
        self.state = state

    @property
    def method(self) -> str:
        return self.state.spec.name

    @property
    def retain(self) -> float:
        return self.state.retain

    @property
    def positions(self) -> str:
        return self.state.positions

    def stats(self) -> TrimStats:
        return stats(self.model)

    def restore(self) -> None:
        if get_state(self.model) is self.state:
            uninstall(self.model)

    def __enter__(self) -> "TrimHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (
            f"TrimHandle(method={self.method!r}, retain={self.retain}, positions={self.positions!r}, "
            f"model={type(self.model).__name__})"
        )


def compress(
    model: torch.nn.Module,
    method: str = "vidcom2",
    retain: float = 0.25,
    *,
    positions: str | None = None,
    **options: Any,
) -> TrimHandle:
    """Patch ``model`` in place so its visual tokens are compressed by ``method``.

    Args:
        model: a loaded ``LlavaOnevisionForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
            ``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration`` (in-LLM methods
            must rank at a full-attention layer) or ``InternVLForConditionalGeneration``.
        method: a registered method name (``tokensieve.methods.names()``).
        retain: fraction of each image's / video's content tokens kept, in (0, 1]; the
            kept count is exactly ``round(retain · N)`` per segment (at least one per frame).
        positions: ``"preserve"`` (kept tokens keep their original position ids) or
            ``"compact"`` (renumbered); default: what the method's reference used on this
            model family.
        **options: method options (see ``tokensieve.methods.get(method).options``), and the
            encoder stage every method composes with (``specs/encoder.md`` E0):
            ``encoder_frames`` — the fraction of each video's frames (Qwen: temporal patches) the
            vision encoder sees, in (0, 1], the others never encoded — and ``encoder_policy``
            (``"dp"``, ``"topk"`` or ``"uniform"``: how those frames are chosen from pixels). A
            pre-LLM method then keeps its ``round(retain · N)`` tokens among the encoded frames
            (give only ``encoder_policy`` to encode the fewest frames that hold them); an in-LLM
            method receives the encoded frames' tokens and prunes them at its own ratio.
            ``encoder_merge`` (in (0, 1]) merges tokens inside the vision tower's blocks (ToMe,
            with proportional attention) down to that fraction, from block
            ``encoder_merge_start`` (default 0) through the one the projector reads, then
            unmerges them: the tower is cheaper and every count after it is unchanged.
            ``encoder_cache_mb`` keeps the features of recent videos (up to that many MB, least
            recently used out first): asking about the same video again skips the tower.

    Every argument is validated before the model is touched; an invalid call leaves the
    model unchanged. Compressing an already compressed model is an error.
    """
    adapter = get_adapter(model)
    spec = _methods.get(method)
    value = check_retain(retain)
    if positions is not None and positions not in POSITION_MODES:
        raise InputError(f"positions must be one of {', '.join(map(repr, POSITION_MODES))} or None, got {positions!r}")
    merge, stage, cache_mb, method_options = stage_options(options)
    method = spec.create(**method_options)
    if stage is None:
        stage = getattr(method, "encoder", None)  # the encoder stage as a method (keyframes)
    if stage is not None:
        if adapter.encoder_stage_unsupported:
            raise InputError(f"{spec.name!r} with an encoder stage on {type(model).__name__}: {adapter.encoder_stage_unsupported}")
        if spec.stage == "in-llm" and stage.frames is None:
            raise InputError(f"{spec.name!r} prunes inside the language model; with it, give encoder_frames in (0, 1] "
                             "(the fraction of frames the vision encoder sees) explicitly")
        if spec.stage != "in-llm" and stage.frames is not None and stage.frames < value:
            raise InputError(f"encoder_frames={stage.frames} encodes fewer frames than retain={value} keeps tokens; "
                             "encoder_frames must be at least retain")
    if cache_mb is not None and spec.stage != "in-llm" and spec.signals(method)[1]:
        raise InputError(f"{spec.name!r} reads the vision tower's attention, which a cached video would not "
                         "compute; use encoder_cache_mb with methods that read the features only")
    tower_layout = check_tower(adapter.tower_layout(model), merge, type(model).__name__) if merge is not None else None
    num_layers = lm_shape(model)[3]
    for_depth = getattr(method, "for_depth", None)  # depth="scaled": published layers placed on this depth
    if for_depth is not None:
        method = for_depth(num_layers)
    inllm = method if spec.stage == "in-llm" else None
    selector = method if spec.stage != "in-llm" else None
    if selector is not None and hasattr(method, "llm_stage"):  # a pre-LLM method with an in-LLM stage (FlashVID)
        inllm = method.llm_stage()
    dp = method.decode_stage() if hasattr(method, "decode_stage") else None
    if (inllm is not None or dp is not None) and adapter.inllm_unsupported:
        raise InputError(f"{spec.name!r} on {type(model).__name__}: {adapter.inllm_unsupported}")
    for part in (inllm, dp):
        if part is not None:
            part.check_depth(num_layers)
    if inllm is not None:
        inllm.plan(10_000, num_layers, value)  # a retain this schedule cannot reach fails here, not mid-call
    if inllm is not None or dp is not None:
        check_ranking_layers(adapter.language_model(model), inllm, dp, spec.name, value)
    chosen = positions or spec.positions_for(adapter.style)
    if (inllm is not None or dp is not None) and adapter.style == "mrope" and chosen == "compact":
        raise InputError(
            f"positions='compact' is not defined for in-LLM pruning on M-RoPE models ({type(model).__name__}); "
            "use positions='preserve'"
        )
    existing = get_state(model)
    if existing is not None:
        raise InputError(
            f"model is already compressed with {existing.spec.name!r} (retain={existing.retain}); "
            "call tokensieve.restore(model) or use the handle as a context manager before compressing again"
        )
    lm_calls = check_transformers(model, adapter, inllm is not None or dp is not None)
    state = TrimState(
        spec=spec,
        selector=selector,
        retain=value,
        positions=chosen,
        adapter=adapter,
        options=dict(options),
        inllm=inllm,
        dp=dp,
        lm_calls=lm_calls,
        encoder=stage,
        tower_merge=merge,
        tower_layout=tower_layout,
        cache_mb=cache_mb,
    )
    install(model, state)
    return TrimHandle(model, state)


def restore(model: torch.nn.Module) -> None:
    """Remove tokensieve from ``model``; a model that is not compressed is left as is."""
    uninstall(model)


def is_compressed(model: torch.nn.Module) -> bool:
    return get_state(model) is not None


def stats(model: torch.nn.Module) -> TrimStats:
    """Statistics of the last compressed forward of ``model``: per sample and segment, tokens
    before/after, per-frame kept counts and scoring time in ms.

    "Last" means this thread's last compressed call when this thread has made one (so request
    threads sharing one model each see their own), else the model's last call from any thread.
    If that call failed, this raises instead of describing an older call."""
    state = get_state(model)
    if state is None:
        raise InputError("model is not compressed by tokensieve; call tokensieve.compress(model, ...) first")
    mine = state.by_thread.get(threading.get_ident())
    last = mine if mine is not None else (state.last if state.last is not None else state.last_error)
    if isinstance(last, str):
        raise InputError(f"the last compressed call on this model failed ({last}); it left no statistics")
    if last is None:
        raise InputError("no compressed forward has run yet on this model (no visual inputs seen)")
    return last
