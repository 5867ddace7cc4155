"""DWC: the downlink weight-update codec of CD-CCA (arXiv 2312.16279 §3.4), wire format ``VTDW`` v1.

The paper says DWC "adaptively selects and quantizes updated weight parameters"; its code
only quantises whole models. This is the normative codec of ``specs/cdcca.md`` §4:

* **State.** The cloud keeps a *mirror* of the device's trainable tensors (names matching
  ``norm | bias | lora``, never the distillation-only ``align_module``). Both sides hash that
  state: SHA-256 over the tensors in name order, each as the little-endian bytes of its storage
  dtype (:func:`state_hash`).
* **Delta** ``Δ = W_cloud − W_mirror`` in fp32 per tensor (LoRA A and B separately). Because the
  mirror is what the device really holds, earlier rounds' quantisation error is sent again
  (error feedback): repeated rounds against a fixed target converge.
* **Selection** ``"tensor_budget"``: a byte budget ``B = min(link_bytes_per_s · t_max, staging)``;
  small tensors (≤ 8,192 values: norms, biases) first in name order while they fit, then the
  rest by update energy ``‖Δ‖²/n`` (descending, ties by name), greedily while the *encoded*
  size fits; all-zero deltas are never sent. ``"element_topq"`` sends, in each chosen tensor,
  only the top ``q`` of its entries by ``|Δ|`` (ties to the lower position), with a bitmap when
  ``q > 1/16`` else LEB128 gap varints.
* **Quantisation** per group of 64 values in row-major order: ``"int4"`` (default; fp16 scale
  ``max|v|/7``, codes ``clamp(round_half_even(v/s), −7, 7)`` as two's-complement nibbles, even
  element in the low nibble), ``"nf4"`` (the 16 NormalFloat levels of QLoRA, arXiv 2305.14314,
  absmax scale), ``"int8"`` (``max|v|/127``), ``"fp16"`` (raw values).
* **Apply** (:func:`apply_update`) checks the CRC-32, that the base hash equals the device's
  current state (else :class:`ResyncNeeded`: ask for a full resync), computes every new tensor
  (fp32 ``W + v̂`` cast back to the storage dtype), checks the new hash, and only then writes —
  nothing is applied in part.

Deterministic: the same inputs give the same bytes. Decoding is strict and bounded: random or
truncated bytes give a :class:`CodecError` naming what is wrong, never a crash or a hang.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from ..errors import InputError

MAGIC = b"VTDW"
VERSION = 1
HEADER = struct.Struct("<4sBBHI32s32sI")  # magic, version, flags, reserved, round, base, new, n_records
TRAINABLE = re.compile(r"norm|bias|lora")
EXCLUDED = re.compile(r"align_module")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPE_OF = {v: k for k, v in DTYPES.items()}
QUANTS = ("int4", "nf4", "int8", "fp16")
SPARSITY = ("dense", "bitmap", "varint")
SELECTS = ("tensor_budget", "element_topq")
GROUP = 64
SMALL = 8192
#: the 16 NormalFloat-4 levels (QLoRA, arXiv 2305.14314, appendix E)
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
FP16_MAX = 65504.0
MAX_RANK = 8
MAX_NAME = 1024


class CodecError(InputError):
    """Bytes that are not a valid ``VTDW`` v1 update (bad magic, truncated, CRC, bounds, ...)."""


class ResyncNeeded(InputError):
    """The update was made for another device state (base hash mismatch): request a full resync."""


# --- state ------------------------------------------------------------------------------------


def trainable_names(names: Iterable[str]) -> list[str]:
    """The names DWC ships, sorted: ``norm | bias | lora``, never ``align_module``."""
    return sorted(n for n in names if TRAINABLE.search(n) and not EXCLUDED.search(n))


def trainable_state(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the trainable set, in name order (tensors are the live ones)."""
    items = dict(source.named_parameters()) if isinstance(source, torch.nn.Module) else dict(source)
    return {n: items[n] for n in trainable_names(items)}


def _le_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    if t.dtype not in DTYPES:
        raise InputError(f"DWC handles fp32, fp16 and bf16 tensors, got {t.dtype}")
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def state_hash(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 (32 bytes) over the tensors in name order, little-endian storage bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(_le_bytes(state[name]))
    return h.digest()


# --- quantisation -----------------------------------------------------------------------------


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def quantize(values: torch.Tensor, quant: str, group: int = GROUP) -> tuple[bytes, bytes, torch.Tensor]:
    """``(scales, payload, dequantised fp32)`` for ``values`` ``[n]`` fp32, groups of ``group``."""
    v = values.float().reshape(-1)
    n = v.numel()
    if quant == "fp16":
        half = _fp16(v)
        return b"", half.numpy().astype("<f2").tobytes(), half.float()
    pad = (-n) % group
    vp = torch.cat([v, v.new_zeros(pad)]).view(-1, group)
    absmax = vp.abs().amax(dim=1)
    if quant == "nf4":
        scale = _fp16(absmax)
        s = scale.float().unsqueeze(1)
        x = torch.where(s > 0, vp / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(vp))
        codes = (x.unsqueeze(-1) - NF4).abs().argmin(dim=-1)  # ties: the lower level
        deq = NF4[codes] * s
        nibbles = codes.to(torch.uint8).reshape(-1)[:n]
    else:
        top = 7 if quant == "int4" else 127
        scale = _fp16(absmax / top)
        s = scale.float().unsqueeze(1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.where(s > 0, torch.clamp(torch.round(vp / safe), -top, top), torch.zeros_like(vp))
        deq = codes * s
        if quant == "int8":
            payload = codes.to(torch.int8).reshape(-1)[:n].numpy().tobytes()
            return scale.numpy().astype("<f2").tobytes(), payload, deq.reshape(-1)[:n]
        nibbles = (codes.to(torch.int16).reshape(-1)[:n] & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    packed = (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()
    return scale.numpy().astype("<f2").tobytes(), packed, deq.reshape(-1)[:n]


def dequantize(quant: str, scales: bytes, payload: bytes, n: int, group: int) -> torch.Tensor:
    """fp32 values ``[n]`` from a record's scales and payload (sizes already checked)."""
    if quant == "fp16":
        return torch.from_numpy(np.frombuffer(payload, dtype="<f2").astype(np.float32).copy())
    s = torch.from_numpy(np.frombuffer(scales, dtype="<f2").astype(np.float32).copy())
    per = s.repeat_interleave(group)[:n]
    if quant == "int8":
        codes = torch.from_numpy(np.frombuffer(payload, dtype=np.int8).astype(np.float32).copy())[:n]
        return codes * per
    raw = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()).to(torch.int16)
    nib = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)[:n]
    if quant == "nf4":
        return NF4[nib.long()] * per
    signed = torch.where(nib >= 8, nib - 16, nib).float()
    return signed * per


# --- positions --------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_positions(pos: torch.Tensor, total: int, kind: str) -> bytes:
    if kind == "bitmap":
        bits = np.zeros(total, dtype=np.uint8)
        bits[pos.numpy()] = 1
        return np.packbits(bits, bitorder="little").tobytes()
    out, prev = bytearray(), -1
    for p in pos.tolist():
        out += _varint(p - prev - 1)
        prev = p
    return bytes(out)


def decode_positions(data: bytes, total: int, count: int, kind: str) -> torch.Tensor:
    if kind == "bitmap":
        if len(data) != (total + 7) // 8:
            raise CodecError(f"bitmap of {len(data)} bytes for a tensor of {total} values")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        if bits[total:].any():
            raise CodecError("bitmap sets bits past the end of its tensor")
        pos = np.nonzero(bits[:total])[0]
        if pos.size != count:
            raise CodecError(f"bitmap marks {pos.size} positions but the record has {count} values")
        return torch.from_numpy(pos.astype(np.int64))
    out, prev, i, shift, cur = [], -1, 0, 0, 0
    for b in data:
        if shift > 63:
            raise CodecError("varint gap too long")
        cur |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        prev = prev + cur + 1
        if prev >= total:
            raise CodecError(f"position {prev} past the end of a tensor of {total} values")
        out.append(prev)
        cur, shift = 0, 0
        i += 1
    if shift or len(out) != count:
        raise CodecError(f"varint positions decode to {len(out)} values (truncated?) but the record has {count}")
    return torch.tensor(out, dtype=torch.int64)


# --- records ----------------------------------------------------------------------------------


@dataclass
class Record:
    """One tensor's update: ``values`` at ``positions`` (``None``: every position, row-major)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    quant: str
    group: int
    sparsity: str
    n_values: int
    positions: torch.Tensor | None
    scales: bytes
    payload: bytes

    def values(self) -> torch.Tensor:
        return dequantize(self.quant, self.scales, self.payload, self.n_values, self.group)


def _payload_size(quant: str, n: int) -> int:
    return {"int4": (n + 1) // 2, "nf4": (n + 1) // 2, "int8": n, "fp16": 2 * n}[quant]


def record_size(name: str, rank: int, quant: str, n: int, group: int = GROUP, positions_bytes: int | None = None) -> int:
    """Encoded bytes of one record (the budget formula of ``specs/cdcca.md`` §4.2)."""
    head = 2 + len(name.encode()) + 1 + 1 + 4 * rank + 1 + 2 + 1 + 4
    pos = 0 if positions_bytes is None else 4 + positions_bytes
    scales = 0 if quant == "fp16" else 2 * math.ceil(n / group)
    return head + pos + scales + _payload_size(quant, n)


def _record_bytes(r: Record) -> bytes:
    name = r.name.encode()
    out = bytearray(struct.pack("<H", len(name)) + name)
    out += struct.pack("<BB", DTYPES[r.dtype], len(r.shape))
    out += struct.pack(f"<{len(r.shape)}I", *r.shape)
    out += struct.pack("<BHBI", QUANTS.index(r.quant), r.group, SPARSITY.index(r.sparsity), r.n_values)
    if r.sparsity != "dense":
        assert r.positions is not None
        pos = encode_positions(r.positions, int(np.prod(r.shape, dtype=np.int64)), r.sparsity)
        out += struct.pack("<I", len(pos)) + pos
    return bytes(out) + r.scales + r.payload


@dataclass
class Update:
    """A decoded ``VTDW`` update."""

    round: int
    flags: int
    base_hash: bytes
    new_hash: bytes
    records: list[Record]


@dataclass
class Encoded:
    """What :func:`encode_update` made: the bytes, the mirror after the device applies them, and
    which tensors were sent."""

    data: bytes
    mirror: dict[str, torch.Tensor]
    sent: list[str]
    budget: float


def byte_budget(link_bytes_per_s: float | None = None, t_max: float = 0.05, staging_bytes: float | None = None) -> float:
    """``B = min(link_bytes_per_s · t_max, staging_bytes)`` (``inf`` when neither is given)."""
    b_link = math.inf if link_bytes_per_s is None else float(link_bytes_per_s) * float(t_max)
    b_dev = math.inf if staging_bytes is None else float(staging_bytes)
    return min(b_link, b_dev)


def _make_record(name: str, mirror_t: torch.Tensor, delta: torch.Tensor, quant: str, group: int,
                 select: str, q: float) -> tuple[Record, torch.Tensor]:
    """The record for one tensor and the mirror tensor after applying it."""
    flat = delta.reshape(-1)
    n_total = flat.numel()
    positions = None
    sparsity = "dense"
    values = flat
    if select == "element_topq":
        k = max(1, int(math.floor(q * n_total)))
        order = torch.sort(-flat.abs(), stable=True).indices  # ties: the lower position
        positions = torch.sort(order[:k]).values
        values = flat[positions]
        sparsity = "bitmap" if q > 1.0 / 16 else "varint"
    scales, payload, deq = quantize(values, quant, group)
    rec = Record(name, mirror_t.dtype, tuple(mirror_t.shape), quant, group, sparsity, values.numel(), positions,
                 scales, payload)
    return rec, _applied(mirror_t, positions, deq)


def _applied(t: torch.Tensor, positions: torch.Tensor | None, deq: torch.Tensor) -> torch.Tensor:
    """``t + v̂`` computed in fp32 at ``positions`` (all when ``None``), cast back to ``t``'s dtype."""
    flat = t.detach().reshape(-1).float().clone()
    if positions is None:
        flat += deq
    else:
        flat[positions] += deq
    return flat.to(t.dtype).reshape(t.shape)


def encode_update(
    cloud: Mapping[str, torch.Tensor],
    mirror: Mapping[str, torch.Tensor],
    *,
    round: int,
    budget: float = math.inf,
    select: str = "tensor_budget",
    quant: str = "int4",
    group_size: int = GROUP,
    always_send_small: bool = True,
    small: int = SMALL,
    topq: float = 0.05,
) -> Encoded:
    """Encode ``cloud − mirror`` (same names, shapes and dtypes) as a ``VTDW`` v1 update.

    ``budget``: the byte budget (:func:`byte_budget`); the whole update (header, records,
    CRC) never exceeds it. Returns the bytes and the mirror the device will hold after applying
    them (keep it for the next round: the error feedback).
    """
    if select not in SELECTS:
        raise InputError(f"DWC select must be one of {SELECTS}, got {select!r}")
    if quant not in QUANTS:
        raise InputError(f"DWC quant must be one of {QUANTS}, got {quant!r}")
    if not (isinstance(group_size, int) and 1 <= group_size <= 65535):
        raise InputError(f"DWC group_size must be an integer in [1, 65535], got {group_size!r}")
    if not (isinstance(round, int) and 0 <= round < 2**32):
        raise InputError(f"DWC round must be an integer in [0, 2^32), got {round!r}")
    if not 0.0 < float(topq) <= 1.0:
        raise InputError(f"DWC topq must be in (0, 1], got {topq!r}")
    names = sorted(mirror)
    if sorted(cloud) != names:
        raise InputError("cloud and mirror must hold the same tensors: "
                         f"missing {sorted(set(names) - set(cloud))}, extra {sorted(set(cloud) - set(names))}")
    for n in names:
        if cloud[n].shape != mirror[n].shape or cloud[n].dtype != mirror[n].dtype:
            raise InputError(f"tensor {n!r}: cloud {tuple(cloud[n].shape)} {cloud[n].dtype} vs mirror "
                             f"{tuple(mirror[n].shape)} {mirror[n].dtype}")
        if mirror[n].dtype not in DTYPES or mirror[n].dim() > MAX_RANK:
            raise InputError(f"tensor {n!r}: DWC sends fp32/fp16/bf16 tensors of rank <= {MAX_RANK}")
    deltas = {n: cloud[n].detach().float().cpu() - mirror[n].detach().float().cpu() for n in names}
    candidates = [n for n in names if bool(deltas[n].any())]
    small_first = [n for n in candidates if always_send_small and deltas[n].numel() <= small]
    energy = {n: float(deltas[n].double().square().sum()) / deltas[n].numel() for n in candidates}
    rest = sorted((n for n in candidates if n not in small_first), key=lambda n: (-energy[n], n))
    used = HEADER.size + 4
    chosen: dict[str, tuple[Record, torch.Tensor]] = {}
    for n in small_first + rest:
        rec, new_t = _make_record(n, mirror[n].detach().cpu(), deltas[n], quant, group_size, select, topq)
        size = len(_record_bytes(rec))
        if used + size <= budget:
            chosen[n] = (rec, new_t)
            used += size
    new_mirror = {n: (chosen[n][1] if n in chosen else mirror[n].detach().cpu().clone()) for n in names}
    records = [chosen[n][0] for n in names if n in chosen]
    flags = 1 | (2 if any(r.sparsity != "dense" for r in records) else 0)
    body = HEADER.pack(MAGIC, VERSION, flags, 0, round, state_hash(mirror), state_hash(new_mirror), len(records))
    body += b"".join(_record_bytes(r) for r in records)
    data = body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    return Encoded(data=data, mirror=new_mirror, sent=[r.name for r in records], budget=budget)


# --- decoding ---------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise CodecError(f"truncated update: {what} needs {n} bytes at offset {self.pos}, "
                             f"{self.end - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))


def decode_update(data: bytes) -> Update:
    """Parse and check a ``VTDW`` v1 update; raises :class:`CodecError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"an update is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER.size + 4:
        raise CodecError(f"an update has at least {HEADER.size + 4} bytes, got {len(data)}")
    if data[:4] != MAGIC:
        raise CodecError(f"not a VTDW update (magic {data[:4]!r})")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
        raise CodecError("CRC-32 mismatch: the update is corrupt")
    r = _Reader(data, len(data) - 4)
    magic, version, flags, _reserved, rnd, base, new, count = r.unpack(HEADER.format, "header")
    if version != VERSION:
        raise CodecError(f"VTDW version {version} is not supported (this reader knows version {VERSION})")
    records: list[Record] = []
    seen: set[str] = set()
    for i in range(count):
        (name_len,) = r.unpack("<H", f"record {i} name length")
        if name_len == 0 or name_len > MAX_NAME:
            raise CodecError(f"record {i}: name length {name_len} outside [1, {MAX_NAME}]")
        try:
            name = r.take(name_len, f"record {i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"record {i}: name is not UTF-8") from None
        if name in seen:
            raise CodecError(f"record {i}: tensor {name!r} appears twice")
        seen.add(name)
        dtype_code, rank = r.unpack("<BB", f"record {i} dtype/rank")
        if dtype_code not in DTYPE_OF:
            raise CodecError(f"record {name!r}: unknown storage dtype code {dtype_code}")
        if rank > MAX_RANK:
            raise CodecError(f"record {name!r}: rank {rank} > {MAX_RANK}")
        shape = r.unpack(f"<{rank}I", f"record {name!r} dims")
        total = int(np.prod(shape, dtype=np.int64)) if rank else 1
        quant_code, group, sparse_code, n_values = r.unpack("<BHBI", f"record {name!r} quantisation")
        if quant_code >= len(QUANTS):
            raise CodecError(f"record {name!r}: unknown quantisation code {quant_code}")
        if sparse_code >= len(SPARSITY):
            raise CodecError(f"record {name!r}: unknown sparsity code {sparse_code}")
        quant, sparsity = QUANTS[quant_code], SPARSITY[sparse_code]
        if group < 1:
            raise CodecError(f"record {name!r}: group size 0")
        if n_values > total or (sparsity == "dense" and n_values != total) or n_values < 1:
            raise CodecError(f"record {name!r}: {n_values} values for a {shape} tensor ({sparsity})")
        positions = None
        if sparsity != "dense":
            (plen,) = r.unpack("<I", f"record {name!r} positions length")
            positions = decode_positions(r.take(plen, f"record {name!r} positions"), total, n_values, sparsity)
        scales = b"" if quant == "fp16" else r.take(2 * math.ceil(n_values / group), f"record {name!r} scales")
        payload = r.take(_payload_size(quant, n_values), f"record {name!r} payload")
        records.append(Record(name, DTYPE_OF[dtype_code], tuple(shape), quant, group, sparsity, n_values,
                              positions, scales, payload))
    if r.pos != r.end:
        raise CodecError(f"{r.end - r.pos} unexpected bytes after the last record")
    return Update(round=rnd, flags=flags, base_hash=base, new_hash=new, records=records)


def apply_update(state: Mapping[str, torch.Tensor], data: bytes) -> Update:
    """Apply a ``VTDW`` update to ``state`` (the device's live trainable tensors) in place.

    Order: CRC and format (:class:`CodecError`), base hash (:class:`ResyncNeeded`), every new
    tensor computed aside, new hash checked (:class:`CodecError`), then written. A failure at
    any step leaves ``state`` untouched.
    """
    upd = decode_update(data)
    current = state_hash(state)
    if current != upd.base_hash:
        raise ResyncNeeded(
            f"update round {upd.round} was made for device state {upd.base_hash.hex()[:16]}…, this device holds "
            f"{current.hex()[:16]}…: request a full resync"
        )
    new: dict[str, torch.Tensor] = {}
    for rec in upd.records:
        t = state.get(rec.name)
        if t is None:
            raise CodecError(f"the update changes {rec.name!r}, which this device does not have")
        if tuple(t.shape) != rec.shape or t.dtype != rec.dtype:
            raise CodecError(f"{rec.name!r}: update for {rec.shape} {rec.dtype}, device holds {tuple(t.shape)} {t.dtype}")
        new[rec.name] = _applied(t.detach().cpu(), rec.positions, rec.values())
    after = {n: new.get(n, state[n]) for n in state}
    if state_hash(after) != upd.new_hash:
        raise CodecError(f"update round {upd.round}: the state after applying it does not have the announced hash")
    with torch.no_grad():
        for n, t in new.items():
            state[n].copy_(t.to(state[n].device))
    return upd
