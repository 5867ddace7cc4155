"""A bounded cache of video features: several questions about one video encode it once.

While a model is compressed with ``encoder_cache_mb=``, its ``get_video_features`` is wrapped on
the instance. A call is keyed by a BLAKE2 digest of the pixel tensor's bytes (shape and dtype
included) and the other arguments (the grid, the feature layer and selection strategy), and the
cache belongs to one compressed model — so one encoder stage and one merging setting — and is
dropped by ``restore``. A hit returns the stored features without running the tower; entries
are evicted least recently used first once their features pass the bound. Only what the
adapters read is kept: the spliced features (``pooler_output``) and Qwen3-VL's DeepStack levels;
the tower's hidden states are not (methods that read the tower's attention are refused with a
cache, since a hit would not compute it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from ..errors import InputError
from ._missing import MISSING as _MISSING

#: what a cached output keeps (the fields the adapters read)
KEPT_FIELDS = ("pooler_output", "deepstack_features")


def _digest(value: Any, h: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _digest(v, h)
        h.update(b"]")
    elif isinstance(value, dict):
        for k in sorted(value):
            h.update(repr(k).encode())
            _digest(value[k], h)
    else:
        h.update(repr(value).encode())


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class FeatureCache:
    """Wraps ``module.get_video_features``; :meth:`remove` restores it exactly."""

    def __init__(self, module: torch.nn.Module, max_mb: float) -> None:
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0:
            raise InputError(f"encoder_cache_mb must be a positive number of megabytes, got {max_mb!r}")
        self.module, self.limit = module, int(float(max_mb) * 2**20)
        self.entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self.saved = module.__dict__.get("get_video_features", _MISSING)
        self.original = module.get_video_features
        module.get_video_features = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = hashlib.blake2b(digest_size=20)
        _digest(list(args), h)
        _digest(kwargs, h)
        key = h.hexdigest()
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return _fresh(found[0])
        self.misses += 1
        out = self.original(*args, **kwargs)
        kept = _light(out)
        size = sum(_nbytes(getattr(kept, f, None)) for f in KEPT_FIELDS)
        if size <= self.limit:
            self.entries[key] = (kept, size)
            self.bytes += size
            while self.bytes > self.limit:
                _, (_, freed) = self.entries.popitem(last=False)
                self.bytes -= freed
        return out

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries),
                "mb": round(self.bytes / 2**20, 3), "limit_mb": round(self.limit / 2**20, 3)}

    def remove(self) -> None:
        self.module.__dict__.pop("get_video_features", None)
        if self.saved is not _MISSING:
            self.module.__dict__["get_video_features"] = self.saved
        self.entries.clear()
        self.bytes = 0


def _light(out: Any) -> Any:
    """A copy of a features output with only :data:`KEPT_FIELDS` (detached)."""
    values = {f: getattr(out, f, None) for f in KEPT_FIELDS}
    values = {f: _detach(v) for f, v in values.items() if v is not None}
    return type(out)(**values)


def _fresh(out: Any) -> Any:
    """A new output object over the stored tensors (callers may reassign its fields)."""
    return type(out)(**{f: getattr(out, f) for f in KEPT_FIELDS if getattr(out, f, None) is not None})


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value
