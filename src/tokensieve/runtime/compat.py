"""The one place that knows how the supported transformers releases take their arguments.

transformers renames internal arguments between minor releases (5.24 renamed the KV-cache
argument ``past_key_values`` to ``cache`` everywhere: model and decoder-layer ``forward``,
the mask builders, the output classes, ``generate``'s model kwargs). The runtime never
spells such a name itself: it asks this module. Everything here is read off the installed
release's signatures, and :func:`check_language_model` refuses — at ``compress`` time,
before anything is patched — a release outside the tested range or a language model whose
layers take arguments the runtime was not written for. A wrong guess would not fail: it
would hand the layers a cache they do not update and decode from the wrong state.

Supported: transformers ``SUPPORTED_LOWEST`` to ``SUPPORTED_HIGHEST`` (minor releases,
every patch release of them); CI runs the whole suite at both ends.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from typing import Any, Callable

import torch

from ..errors import InputError

#: lowest and highest transformers minor release the runtime is written for and tested on
SUPPORTED_LOWEST = (5, 18)
SUPPORTED_HIGHEST = (5, 24)
#: the two spellings of the KV-cache argument, newest first
CACHE_NAMES = ("cache", "past_key_values")


class UnsupportedTransformers(InputError):
    """The installed transformers (or a model's layers) take arguments the runtime does not know."""


def supported_range() -> str:
    lo, hi = SUPPORTED_LOWEST, SUPPORTED_HIGHEST
    return f"{lo[0]}.{lo[1]}.x to {hi[0]}.{hi[1]}.x"


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def parse_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"5.24.0"`` or ``"5.25.0.dev0"``."""
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        raise UnsupportedTransformers(f"cannot read the transformers version {text!r}") from None


def check_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTransformers` unless ``version`` (default: the installed one)
    lies in the supported range."""
    version = transformers_version() if version is None else version
    if not SUPPORTED_LOWEST <= parse_version(version) <= SUPPORTED_HIGHEST:
        raise UnsupportedTransformers(
            f"transformers {version} is not supported: tokensieve is written for and tested on transformers "
            f"{supported_range()} (internal argument names change between releases, and a wrong guess would "
            f"give wrong tokens, not an error); install a supported release, e.g. "
            f"pip install 'transformers>={SUPPORTED_LOWEST[0]}.{SUPPORTED_LOWEST[1]},"
            f"<{SUPPORTED_HIGHEST[0]}.{SUPPORTED_HIGHEST[1] + 1}'"
        )


# --- signatures ---------------------------------------------------------------------------------


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Parameters of ``fn`` as callers see them (``functools.wraps`` wrappers are followed, so a
    deprecation shim shows the new names)."""
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _cache_name_of(params: dict[str, inspect.Parameter]) -> str | None:
    return next((n for n in CACHE_NAMES if n in params), None)


@functools.lru_cache(maxsize=None)
def _mask_builders() -> tuple[Callable[..., Any], Callable[..., Any]]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return create_causal_mask, create_sliding_window_causal_mask


@functools.lru_cache(maxsize=None)
def mask_cache_name() -> str:
    """Name of the cache argument of transformers' mask builders."""
    names = {_cache_name_of(_parameters(fn)) for fn in _mask_builders()}
    if len(names) != 1 or None in names:
        raise UnsupportedTransformers(
            f"transformers {transformers_version()}: its mask builders take no cache argument the runtime "
            f"knows ({' or '.join(CACHE_NAMES)}); supported: {supported_range()}"
        )
    return names.pop()  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def output_cache_name() -> str:
    """Field of ``BaseModelOutputWithPast`` that carries the cache (what ``generate`` reads back)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    name = next((n for n in CACHE_NAMES if n in fields), None)
    if name is None:
        raise UnsupportedTransformers(
            f"transformers {transformers_version()}: BaseModelOutputWithPast has no cache field the runtime "
            f"knows; supported: {supported_range()}"
        )
    return name


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a call passes, under either spelling (``None`` if none)."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove every spelling of the cache argument from ``kwargs``; return the cache given."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            if found is not None and value is not found:
                raise InputError(f"two different KV caches were passed ({' and '.join(CACHE_NAMES)})")
            found = value
    return found


def model_output(hidden: torch.Tensor, cache: Any) -> Any:
    """``BaseModelOutputWithPast`` with the cache under the field this release reads."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden, **{output_cache_name(): cache})


def causal_mask(config: Any, kind: str, h: torch.Tensor, mask2d: torch.Tensor, cache: Any, layer: int) -> Any:
    """transformers' own mask for one layer (``kind``: ``"full_attention"``, ``"sliding_attention"``
    or ``"linear_attention"``) of a sequence whose 2-D key mask is ``mask2d``. A linear-attention
    layer (Qwen3.5's Gated DeltaNet) takes the 2-D padding mask of its own tokens, or ``None``."""
    if kind == "linear_attention":
        from transformers.masking_utils import create_recurrent_attention_mask

        return create_recurrent_attention_mask(config=config, inputs_embeds=h, attention_mask=mask2d,
                                               **{mask_cache_name(): cache})
    full, sliding = _mask_builders()
    fn = sliding if kind == "sliding_attention" else full
    return fn(config=config, inputs_embeds=h, attention_mask=mask2d, position_ids=None, layer_idx=layer,
              **{mask_cache_name(): cache})


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as attention implementation ``name`` (once)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, fn)


def attention_function(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """The attention kernel ``name`` as ``module`` would call it (``"eager"``: the function of
    ``module``'s own modelling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


@dataclasses.dataclass(frozen=True)
class LMCalls:
    """How the runtime calls one language model's decoder layers and attention modules."""

    cache: str  # the name of the cache argument of the layers and attention modules

    def cache_kw(self, cache: Any) -> dict[str, Any]:
        return {self.cache: cache}


# what the runtime passes, by callee (besides the cache argument)
_LAYER_ARGS = ("hidden_states", "attention_mask", "position_ids", "use_cache", "position_embeddings")
_ATTN_ARGS = ("hidden_states", "position_embeddings", "attention_mask", "position_ids")
_LM_ARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "use_cache")
_LM_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")
_LAYER_PARTS = ("self_attn", "input_layernorm")


def _refuse(where: str, what: str) -> UnsupportedTransformers:
    return UnsupportedTransformers(
        f"{where} {what}; the in-LLM runtime is written for the decoder layers of transformers "
        f"{supported_range()} (installed: {transformers_version()}) and refuses rather than guess"
    )


def _check_call(fn: Callable[..., Any], where: str, passed: tuple[str, ...], cache: str | None) -> str:
    params = _parameters(fn)
    if not params:
        raise _refuse(where, "has no readable signature")
    name = _cache_name_of(params)
    if name is None or (cache is not None and name != cache):
        seen = name or "none"
        raise _refuse(where, f"takes its KV cache as {seen!r}, not as {cache or ' or '.join(CACHE_NAMES)!r}")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [a for a in passed if a not in params and not takes_any]
    if missing:
        raise _refuse(where, f"takes no argument {', '.join(map(repr, missing))}")
    given = set(passed) | {name}
    required = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and n not in given
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise _refuse(where, f"requires argument(s) {', '.join(map(repr, required))} the runtime does not pass")
    return name


def layer_types(lm: torch.nn.Module) -> list[str]:
    """Each decoder layer's kind (``config.layer_types``: ``"full_attention"``,
    ``"sliding_attention"``, ``"linear_attention"``; all full attention when the config has none)."""
    types = getattr(lm.config, "layer_types", None)
    return list(types) if types else ["full_attention"] * len(lm.layers)


def check_language_model(lm: torch.nn.Module) -> LMCalls:
    """Check everything the in-LLM runtime calls on ``lm`` and say how to call it.

    Raises :class:`UnsupportedTransformers` (an :class:`InputError`) naming the part that
    differs: the transformers version, a missing sub-module, or a ``forward`` whose arguments
    are not the ones the runtime passes. Called by ``compress`` before anything is patched.
    """
    check_version()
    name = type(lm).__name__
    for part in _LM_PARTS:
        if not hasattr(lm, part):
            raise _refuse(name, f"has no {part!r}")
    layers = list(lm.layers)
    if not layers:
        raise _refuse(name, "has no decoder layers")
    cache = mask_cache_name()
    output_cache_name()
    _check_call(lm.forward, f"{name}.forward", _LM_ARGS, cache)
    kinds = layer_types(lm)
    for i, layer in enumerate(layers):
        where = f"decoder layer {i} ({type(layer).__name__})"
        linear = kinds[i] == "linear_attention"
        for part in (("linear_attn", "input_layernorm") if linear else _LAYER_PARTS):
            if not hasattr(layer, part):
                raise _refuse(where, f"has no {part!r}")
        _check_call(layer.forward, f"{where}.forward", _LAYER_ARGS, cache)
        if not linear:
            _check_call(layer.self_attn.forward, f"{where}.self_attn.forward", _ATTN_ARGS, cache)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not callable(getattr(ALL_ATTENTION_FUNCTIONS, "register", None)):
        raise _refuse("transformers' attention-function registry", "cannot register a function")
    return LMCalls(cache=cache)
