"""The uplink payload: the device's uncertain samples and their kept tokens, as safetensors + a manifest.

Tensors travel as `safetensors <https://github.com/huggingface/safetensors>`_ bytes (never
pickle: the receiving side must not execute anything it is sent) next to a small JSON manifest
(device id, round, sample ids, kept tokens per sample, the device's answers and confidences, every tensor's
shape and dtype, and the SHA-256 of the tensor bytes). :func:`decode_uplink` checks all of it
and raises :class:`UplinkError` on anything that does not match.

Payloads (UTS, ``specs/cdcca.md`` §2.2): ``"dense_zeroed"`` sends ``[B, N, C]`` with the
masked tokens zeroed (the reference); ``"sparse"`` sends only the kept tokens ``[K, C]`` plus the
``[B, N]`` slot mask, and the receiver scatters them back into zeros.

Token precision (``dtype``): the tokens' own dtype (e.g. fp16) as they are, or ``"int8"``:
symmetric per-token quantisation, ``q = round(127·x / max|x|)`` with the fp16 ``scale``
``max|x| / 127`` of each token sent beside it (half the bytes of fp16; the receiver gets
``q·scale``, within half a step of each value).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError

FORMAT = "tokensieve-uplink/1"
#: Token precisions :func:`encode_uplink` knows: the tokens as they are, or int8 with per-token scales.
DTYPES = ("as-is", "int8")
MAX_MANIFEST = 1 << 20


class UplinkError(InputError):
    """An uplink payload or manifest that is malformed or does not match its hash."""


@dataclass
class Uplink:
    """What a device sends for one round: ``tokens`` ``[B, N, C]`` (masked tokens zeroed) and the
    ``[B, N]`` bool ``keep`` mask of the uplinked samples, with their metadata."""

    device_id: str
    round: int
    sample_ids: list[str]
    tokens: torch.Tensor
    keep: torch.Tensor
    answers: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def quantise_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 values, fp16 scales)`` of ``tokens`` ``[..., C]``: one symmetric scale per token."""
    scale = (tokens.float().abs().amax(dim=-1) / 127).to(torch.float16)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    return (tokens.float() / safe).round().clamp(-127, 127).to(torch.int8), scale


def encode_uplink(up: Uplink, payload: str = "sparse", dtype: str = "as-is") -> tuple[bytes, dict[str, Any]]:
    """``(safetensors bytes, manifest)`` of ``up``; ``payload`` ``"sparse"`` or ``"dense_zeroed"``,
    ``dtype`` ``"as-is"`` (the tokens' own dtype) or ``"int8"`` (per-token scales; module docstring)."""
    from safetensors.torch import save

    if payload not in ("sparse", "dense_zeroed"):
        raise InputError(f"uplink payload must be 'sparse' or 'dense_zeroed', got {payload!r}")
    if dtype not in DTYPES:
        raise InputError(f"uplink token dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if up.tokens.dim() != 3 or tuple(up.keep.shape) != tuple(up.tokens.shape[:2]):
        raise InputError(f"tokens must be [B, N, C] and keep [B, N], got {tuple(up.tokens.shape)} and {tuple(up.keep.shape)}")
    B = up.tokens.shape[0]
    if len(up.sample_ids) != B:
        raise InputError(f"{len(up.sample_ids)} sample ids for {B} samples")
    keep = up.keep.bool().cpu()
    tokens = up.tokens.detach().cpu().contiguous()
    if payload == "sparse":
        tensors = {"tokens": tokens[keep].contiguous(), "keep": keep.to(torch.uint8)}
    else:
        tensors = {"tokens": (tokens * keep.unsqueeze(-1).to(tokens.dtype)).contiguous(), "keep": keep.to(torch.uint8)}
    if dtype == "int8":
        tensors["tokens"], tensors["scale"] = quantise_int8(tensors["tokens"])
    blob = save(tensors)
    manifest = {
        "format": FORMAT,
        "device_id": str(up.device_id),
        "round": int(up.round),
        "payload": payload,
        "sample_ids": [str(s) for s in up.sample_ids],
        # per sample, how many tokens it keeps (the slots themselves are the `keep` tensor: listing
        # them here would make the manifest grow with every token)
        "kept_per_sample": keep.sum(dim=1).tolist(),
        "shape": list(tokens.shape),
        "answers": list(up.answers),
        "confidences": [float(c) for c in up.confidences],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "extra": up.extra,
    }
    return blob, manifest


def decode_uplink(blob: bytes, manifest: dict[str, Any] | str | bytes) -> Uplink:
    """Check ``blob`` against ``manifest`` and rebuild the :class:`Uplink` (dense, zeros where masked)."""
    from safetensors.torch import load

    if isinstance(manifest, (str, bytes)):
        if len(manifest) > MAX_MANIFEST:
            raise UplinkError(f"manifest larger than {MAX_MANIFEST} bytes")
        try:
            manifest = json.loads(manifest)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UplinkError(f"manifest is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UplinkError(f"manifest is not a {FORMAT} manifest")
    if not isinstance(blob, (bytes, bytearray)):
        raise UplinkError("the uplink payload must be bytes")
    if manifest.get("bytes") != len(blob) or manifest.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise UplinkError("the uplink payload does not match its manifest's size and SHA-256")
    try:
        tensors = load(bytes(blob))
    except Exception as exc:  # noqa: BLE001 - any parse failure of foreign bytes is a clear refusal
        raise UplinkError(f"the uplink payload is not valid safetensors: {exc}") from None
    described = manifest.get("tensors")
    if not isinstance(described, dict) or set(tensors) != set(described) or set(tensors) - {"scale"} != {"tokens", "keep"}:
        raise UplinkError("the uplink payload must hold exactly the tensors its manifest lists: 'tokens', 'keep' "
                          "and, for int8 tokens, 'scale'")
    for k, t in tensors.items():
        d = described[k]
        if not isinstance(d, dict) or d.get("shape") != list(t.shape) or d.get("dtype") != str(t.dtype).removeprefix("torch."):
            raise UplinkError(f"tensor {k!r} does not match its manifest entry")
    try:
        shape = [int(x) for x in manifest["shape"]]
        sample_ids = [str(s) for s in manifest["sample_ids"]]
        B, N, C = shape
    except (KeyError, TypeError, ValueError):
        raise UplinkError("manifest needs 'shape' [B, N, C] and 'sample_ids'") from None
    keep = tensors["keep"]
    if tuple(keep.shape) != (B, N) or keep.dtype != torch.uint8 or bool((keep > 1).any()) or len(sample_ids) != B:
        raise UplinkError("the keep mask does not match the manifest's shape and samples")
    keep = keep.bool()
    if manifest.get("kept_per_sample") != keep.sum(dim=1).tolist():
        raise UplinkError("the manifest's kept-token counts do not match the keep mask")
    tok = tensors["tokens"]
    if "scale" in tensors:
        scale = tensors["scale"]
        if tok.dtype != torch.int8 or scale.dtype != torch.float16 or tuple(scale.shape) != tuple(tok.shape[:-1]):
            raise UplinkError("int8 tokens need int8 values and one fp16 scale per token")
        if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise UplinkError("the int8 tokens' scales must be finite and non-negative")
        tok = tok.float() * scale.float().unsqueeze(-1)
    elif not tok.is_floating_point():
        raise UplinkError(f"tokens of dtype {tok.dtype} need a 'scale' tensor")
    if manifest.get("payload") == "sparse":
        if tuple(tok.shape) != (int(keep.sum()), C):
            raise UplinkError("sparse tokens do not match the number of kept slots")
        dense = tok.new_zeros(B, N, C)
        dense[keep] = tok
    elif manifest.get("payload") == "dense_zeroed":
        if tuple(tok.shape) != (B, N, C):
            raise UplinkError("dense tokens do not match the manifest's shape")
        dense = tok
    else:
        raise UplinkError(f"unknown payload {manifest.get('payload')!r}")
    return Uplink(device_id=str(manifest.get("device_id", "")), round=int(manifest.get("round", 0)),
                  sample_ids=sample_ids, tokens=dense, keep=keep, answers=list(manifest.get("answers", [])),
                  confidences=[float(c) for c in manifest.get("confidences", [])],
                  extra=dict(manifest.get("extra") or {}))
