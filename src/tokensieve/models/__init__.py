"""Model adapters, looked up by the model's class name."""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import Adapter, Prepared, Segment
from .llava_onevision import LlavaOnevisionAdapter
from .internvl import InternVLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3_5Adapter, Qwen3VLAdapter

ADAPTERS: tuple[Adapter, ...] = (LlavaOnevisionAdapter(), Qwen2VLAdapter(), Qwen3VLAdapter(), Qwen3_5Adapter(),
                                 InternVLAdapter())


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.classes]


def get_adapter(model: object) -> Adapter:
    """The adapter for ``model``'s class; unsupported classes raise :class:`InputError`."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"compress() expects a loaded transformers model, got {type(model).__name__}")
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.classes:
            return adapter
    raise InputError(
        f"tokensieve has no adapter for model class {name}; supported: {', '.join(supported_classes())} "
        "(load the checkpoint with its *ForConditionalGeneration class or AutoModelForImageTextToText)"
    )


__all__ = ["Adapter", "Prepared", "Segment", "get_adapter", "supported_classes", "ADAPTERS"]
