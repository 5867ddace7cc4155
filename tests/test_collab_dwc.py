"""DWC codec (specs/cdcca.md §4): round trips, error bounds, budget formula, determinism,
hash checks, convergence with the mirror, and a fuzz of the decoder."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensieve.collab import dwc
from tokensieve.collab.dwc import CodecError, ResyncNeeded, apply_update, decode_update, encode_update, state_hash


def make_state(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.input_layernorm.weight": (1 + 0.1 * torch.randn(48, generator=g)).to(dtype),
        "layers.0.mlp.down_proj.bias": (0.1 * torch.randn(40, generator=g)).to(dtype),
        "layers.0.self_attn.q_proj.lora_A.weight": (0.1 * torch.randn(8, 300, generator=g)).to(dtype),
        "layers.0.self_attn.q_proj.lora_B.weight": (0.1 * torch.randn(300, 8, generator=g)).to(dtype),
        "layers.1.self_attn.v_proj.lora_A.weight": (0.1 * torch.randn(8, 2000, generator=g)).to(dtype),
    }


def shifted(state, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in state.items()}


def clone(state):
    return {n: t.clone() for n, t in state.items()}


def test_trainable_set_is_norm_bias_lora_without_align_module():
    names = ["a.norm.weight", "b.bias", "c.lora_A.weight", "d.weight", "align_module.bias", "kd.align_module.weight"]
    assert dwc.trainable_names(names) == ["a.norm.weight", "b.bias", "c.lora_A.weight"]


def test_fp16_round_trip_is_exact_with_an_unlimited_budget():
    # fp16 tensors whose deltas are exactly representable: W_dev + fp16(Δ) == W_cloud bit for bit
    dev = {n: (torch.round(t.float() * 64) / 64).to(torch.float16) for n, t in make_state(1).items()}
    g = torch.Generator().manual_seed(2)
    cloud = {n: (t.float() + torch.randint(-8, 9, t.shape, generator=g).float() / 64).to(torch.float16)
             for n, t in dev.items()}
    enc = encode_update(cloud, dev, round=1, quant="fp16")
    device = clone(dev)
    apply_update(device, enc.data)
    for n in cloud:
        assert torch.equal(device[n], cloud[n]), n
    assert state_hash(device) == state_hash(cloud) == state_hash(enc.mirror)


@pytest.mark.parametrize("quant,top", [("int4", 7), ("int8", 127)])
def test_quantisation_error_is_at_most_half_a_step(quant, top):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(1000, generator=g) * torch.logspace(-3, 1, 1000)
    scales, payload, deq = dwc.quantize(v, quant, 64)
    s = torch.tensor(list(struct.unpack(f"<{len(scales) // 2}e", scales))).repeat_interleave(64)[:1000]
    assert bool(((deq - v).abs() <= s / 2 + 1e-7 * v.abs()).all())
    assert torch.equal(dwc.dequantize(quant, scales, payload, 1000, 64), deq)
    assert len(payload) == {"int4": 500, "int8": 1000}[quant]


def test_int4_codes_are_symmetric_nibbles_even_element_low():
    v = torch.tensor([7.0, -7.0, 1.0, -1.0, 0.0])
    scales, payload, deq = dwc.quantize(v, "int4", 64)
    assert struct.unpack("<e", scales)[0] == 1.0
    assert payload == bytes([0x7 | (0x9 << 4), 0x1 | (0xF << 4), 0x0])  # -7 = 0x9, -1 = 0xF (two's complement)
    assert deq.tolist() == v.tolist()


def test_nf4_uses_the_normalfloat_levels():
    v = torch.tensor([1.0, -1.0, 0.0, 0.5626170039176941, -0.09105003625154495])
    _, payload, deq = dwc.quantize(v, "nf4", 64)
    torch.testing.assert_close(deq, v)


@pytest.mark.parametrize("quant", dwc.QUANTS)
@pytest.mark.parametrize("select", dwc.SELECTS)
def test_encoded_size_equals_the_budget_formula(quant, select):
    dev = make_state(4)
    cloud = shifted(dev, 5)
    enc = encode_update(cloud, dev, round=2, quant=quant, select=select, topq=0.05)
    upd = decode_update(enc.data)
    expected = dwc.HEADER.size + 4
    for rec in upd.records:
        total = int(torch.tensor(rec.shape).prod())
        pos = None
        if rec.sparsity != "dense":
            pos = len(dwc.encode_positions(rec.positions, total, rec.sparsity))
        expected += dwc.record_size(rec.name, len(rec.shape), quant, rec.n_values, 64, pos)
    assert len(enc.data) == expected
    if quant == "int4" and select == "tensor_budget":  # 4.25 bits per value plus record overhead
        values = sum(r.n_values for r in upd.records)
        overhead = expected - dwc.HEADER.size - 4 - sum(math.ceil(r.n_values / 2) + 2 * math.ceil(r.n_values / 64)
                                                          for r in upd.records)
        assert overhead == sum(12 + len(r.name) + 4 * len(r.shape) for r in upd.records)  # name_len..n_values
        assert values == sum(t.numel() for t in dev.values())


def test_budget_small_tensors_first_then_energy_and_never_over():
    dev = make_state(6)
    cloud = clone(dev)
    cloud["layers.1.self_attn.v_proj.lora_A.weight"] += 1.0  # the highest energy, the biggest tensor
    cloud["layers.0.self_attn.q_proj.lora_B.weight"] += 0.01
    cloud["layers.0.input_layernorm.weight"] += 0.001  # small: first, whatever its energy
    small = dwc.record_size("layers.0.input_layernorm.weight", 1, "int4", 48)
    lora_b = dwc.record_size("layers.0.self_attn.q_proj.lora_B.weight", 2, "int4", 2400)
    budget = dwc.HEADER.size + 4 + small + lora_b + 10  # no room for the 16,000-value tensor
    enc = encode_update(cloud, dev, round=3, budget=budget)
    assert enc.sent == ["layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.lora_B.weight"]
    assert len(enc.data) <= budget
    assert "layers.0.mlp.down_proj.bias" not in enc.sent  # a zero delta is never sent
    assert dwc.byte_budget(1e6, 0.05, 40_000) == 40_000 and dwc.byte_budget(1e6, 0.05) == 50_000


def test_identical_inputs_give_identical_bytes():
    dev, cloud = make_state(7), shifted(make_state(7), 8)
    a = encode_update(cloud, dev, round=1, select="element_topq", quant="nf4")
    b = encode_update(clone(cloud), clone(dev), round=1, select="element_topq", quant="nf4")
    assert a.data == b.data


def test_a_wrong_base_hash_is_refused_and_nothing_changes():
    dev, cloud = make_state(9), shifted(make_state(9), 10)
    enc = encode_update(cloud, dev, round=1)
    other = shifted(dev, 11, scale=1e-3)
    before = clone(other)
    with pytest.raises(ResyncNeeded, match="full resync"):
        apply_update(other, enc.data)
    assert all(torch.equal(other[n], before[n]) for n in before)


def test_a_corrupt_or_mismatched_update_is_refused_before_any_write():
    dev, cloud = make_state(12), shifted(make_state(12), 13)
    enc = encode_update(cloud, dev, round=1)
    device = clone(dev)
    flipped = bytearray(enc.data)
    flipped[200] ^= 0xFF
    with pytest.raises(CodecError, match="CRC"):
        apply_update(device, bytes(flipped))
    # valid CRC but a lying new-state hash
    body = bytearray(enc.data[:-4])
    body[44:76] = bytes(32)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(CodecError, match="announced hash"):
        apply_update(device, forged)
    assert all(torch.equal(device[n], dev[n]) for n in dev)


@pytest.mark.parametrize("quant", ["int4", "nf4", "int8"])
def test_repeated_rounds_with_the_mirror_converge(quant):
    dev = make_state(14)
    cloud = shifted(dev, 15, scale=0.5)
    mirror, device = clone(dev), clone(dev)
    errors = []
    for rnd in range(6):
        enc = encode_update(cloud, mirror, round=rnd)
        apply_update(device, enc.data)
        mirror = enc.mirror
        assert state_hash(device) == state_hash(mirror)
        errors.append(math.sqrt(sum(float((cloud[n] - device[n]).square().sum()) for n in cloud)))
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * errors[0]


def test_element_topq_sends_the_largest_entries_with_bitmap_or_varints():
    dev = make_state(16)
    cloud = shifted(dev, 17)
    for q, kind in ((0.05, "varint"), (0.25, "bitmap")):
        upd = decode_update(encode_update(cloud, dev, round=1, select="element_topq", topq=q).data)
        for rec in upd.records:
            delta = (cloud[rec.name] - dev[rec.name]).reshape(-1)
            k = max(1, int(q * delta.numel()))
            want = torch.sort(torch.sort(-delta.abs(), stable=True).indices[:k]).values
            assert rec.sparsity == kind and torch.equal(rec.positions, want)
        assert upd.flags == 3


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_fuzz_decoder_random_truncated_and_flipped_bytes(data, cut, flip):
    """Random bytes, and truncated or bit-flipped real updates (CRC recomputed so the parser is
    reached): a CodecError, or a valid update — never another exception, a hang or a write."""
    enc = encode_update(shifted(make_state(18), 19), make_state(18), round=1, select="element_topq")
    candidates = [data, enc.data[: cut % len(enc.data)]]
    body = bytearray(enc.data[:-4])
    body[flip % len(body)] ^= 1 << (flip % 8)
    candidates.append(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    candidates.append(b"VTDW" + data)
    for blob in candidates:
        try:
            decode_update(blob)
        except CodecError:
            pass
        device = make_state(18)
        before = clone(device)
        try:
            apply_update(device, blob)
        except (CodecError, ResyncNeeded):
            assert all(torch.equal(device[n], before[n]) for n in before)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), quant=st.sampled_from(dwc.QUANTS), select=st.sampled_from(dwc.SELECTS),
       budget=st.sampled_from([math.inf, 3000, 20_000]))
def test_property_apply_equals_the_encoders_mirror(seed, quant, select, budget):
    dev = make_state(seed % 7, dtype=[torch.float32, torch.bfloat16, torch.float16][seed % 3])
    cloud = shifted(dev, seed)
    enc = encode_update(cloud, dev, round=seed, quant=quant, select=select, budget=budget)
    assert len(enc.data) <= budget
    device = clone(dev)
    apply_update(device, enc.data)
    assert state_hash(device) == state_hash(enc.mirror)
    assert all(torch.equal(device[n], enc.mirror[n]) for n in dev)
