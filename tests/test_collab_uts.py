"""UTS (specs/cdcca.md §2) and the uplink payload format."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensieve.collab.uplink import Uplink, UplinkError, decode_uplink, encode_uplink
from tokensieve.errors import InputError
from tokensieve.methods.uts import (
    UTS,
    kept_count,
    method_keep,
    sample_confidence,
    select_tokens,
    token_uncertainty,
    uncertain_samples,
)


def test_sample_confidence_by_hand():
    z = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [5.0, 0.0, 5.0]]])
    T = 0.5
    p = torch.softmax(z / T, -1)
    top = p.max(-1).values
    prod = sample_confidence(list(z.unbind(1)), temperature=T)
    torch.testing.assert_close(prod, top.prod(1))
    torch.testing.assert_close(sample_confidence(z, score="geo_mean", temperature=T), top.prod(1).sqrt())
    ent = -(p * p.log()).sum(-1).mean(1)
    torch.testing.assert_close(sample_confidence(z, score="mean_entropy", temperature=T), ent)
    valid = torch.tensor([[True, False], [True, True]])  # sample 0 ended after its first token
    torch.testing.assert_close(sample_confidence(z, temperature=T, valid=valid)[0], top[0, 0])
    assert uncertain_samples(torch.tensor([0.2, 0.7])).tolist() == [True, False]
    assert uncertain_samples(torch.tensor([0.2, 0.7]), score="mean_entropy", threshold=0.5).tolist() == [False, True]


def test_mc_dropout_is_seeded_and_close_to_the_analytic_mean():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 32, 64, generator=g) * torch.linspace(0.2, 2.0, 32).view(1, 32, 1)
    a = token_uncertainty(f, seed=5)
    assert torch.equal(a, token_uncertainty(f, seed=5))
    assert not torch.equal(a, token_uncertainty(f, seed=6))
    analytic = token_uncertainty(f, estimator="analytic")
    torch.testing.assert_close(analytic, f.square().mean(-1))  # p = 0.5: E[u] = mean_c F²
    mean = torch.stack([token_uncertainty(f, samples=10, seed=s) for s in range(60)]).mean(0)
    rel = ((mean - analytic).abs() / analytic).mean()
    assert rel < 0.05, rel
    torch.testing.assert_close(token_uncertainty(f, estimator="analytic", p=0.2), f.square().mean(-1) * 0.25)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), N=st.integers(1, 40), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 999),
       direction=st.sampled_from(["keep_low", "keep_high"]), scope=st.sampled_from(["batch", "per_sample"]),
       ties=st.booleans())
def test_token_counts_are_exact_and_ties_go_by_slot(B, N, ratio, seed, direction, scope, ties):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 3, (B, N), generator=g).float() if ties else torch.rand(B, N, generator=g)
    keep = select_tokens(u, mask_ratio=ratio, direction=direction, scope=scope)
    if scope == "batch":
        assert int(keep.sum()) == math.floor((1 - ratio) * B * N + 1e-12)
        groups = [(u.reshape(-1), keep.reshape(-1))]
    else:
        assert keep.sum(1).tolist() == [kept_count(N, ratio)] * B
        groups = list(zip(u, keep))
    for vals, kept in groups:
        key = vals if direction == "keep_low" else -vals
        ranked = sorted(range(vals.numel()), key=lambda i: (float(key[i]), i))
        assert kept.nonzero(as_tuple=True)[0].tolist() == sorted(ranked[: int(kept.sum())])


def test_uts_defaults_follow_the_reference_code():
    u = UTS()
    assert (u.sample_score, u.threshold, u.temperature, u.estimator, u.p, u.samples, u.mask_ratio, u.direction,
            u.scope) == ("prob_product", 0.5, 0.1, "mc_dropout", 0.5, 10, 0.25, "keep_low", "batch")
    f = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1))
    assert int(u.tokens_to_keep(f).sum()) == 48  # ⌊0.75 · 64⌋
    with pytest.raises(InputError, match="direction"):
        UTS(direction="up")


def test_a_token_compression_method_can_choose_the_uplinked_tokens():
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(2))
    keep = method_keep(x, "vidcom2", 0.25)
    assert keep.shape == (64,) and int(keep.sum()) == 16
    with pytest.raises(InputError, match="in-LLM|inside the language model"):
        method_keep(x, "fastv", 0.25)
    with pytest.raises(InputError, match="question or encoder attention"):
        method_keep(x, "lftr", 0.25)


@pytest.mark.parametrize("payload", ["sparse", "dense_zeroed"])
def test_uplink_round_trip_and_refusals(payload):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 8, 4, generator=g)
    keep = torch.rand(2, 8, generator=g) > 0.4
    up = Uplink("dev-1", 3, ["a", "b"], tokens, keep, answers=["red", "two"], confidences=[0.2, 0.4])
    blob, manifest = encode_uplink(up, payload)
    back = decode_uplink(blob, json.dumps(manifest))
    assert torch.equal(back.keep, keep)
    assert torch.equal(back.tokens, tokens * keep.unsqueeze(-1))
    assert back.sample_ids == ["a", "b"] and back.answers == ["red", "two"] and back.round == 3
    if payload == "sparse":  # only the kept tokens travel
        assert len(blob) < len(encode_uplink(up, "dense_zeroed")[0])
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(UplinkError, match="SHA-256"):
        decode_uplink(bytes(bad), manifest)
    lying = dict(manifest, kept_per_sample=[1, 1])
    with pytest.raises(UplinkError, match="kept-token counts"):
        decode_uplink(blob, lying)


@pytest.mark.parametrize("payload", ["sparse", "dense_zeroed"])
def test_int8_uplink_tokens_are_within_half_a_step_of_each_value(payload):
    """int8: per token q = round(127·x / max|x|) and the fp16 scale max|x| / 127 (by hand), half
    the token bytes of fp16; a payload whose int8 tokens lost their scales is refused."""
    from safetensors.torch import load, save

    g = torch.Generator().manual_seed(4)
    tokens = (torch.randn(3, 16, 128, generator=g) * torch.rand(3, 16, 1, generator=g) * 5).half()
    tokens[0, 0] = 0  # an all-zero token: scale 0, values 0
    keep = torch.rand(3, 16, generator=g) > 0.5
    keep[0, 0] = True
    up = Uplink("dev-1", 1, ["a", "b", "c"], tokens, keep)
    blob, manifest = encode_uplink(up, payload, "int8")
    back = decode_uplink(blob, manifest)
    x = tokens.float() * keep.unsqueeze(-1)
    scale = (x.abs().amax(-1) / 127).half().float()
    expected = torch.where(scale[..., None] > 0, (x / scale[..., None]).round().clamp(-127, 127), 0) * scale[..., None]
    torch.testing.assert_close(back.tokens, expected, rtol=0, atol=1e-6)
    assert bool(((back.tokens - x).abs() <= scale[..., None] / 2 + 1e-3).all())
    assert torch.equal(back.tokens[0, 0], torch.zeros(128))
    fp16 = len(encode_uplink(up, payload)[0])
    assert len(blob) < 0.6 * fp16
    stripped = {k: v for k, v in load(blob).items() if k != "scale"}
    bare = save(stripped)
    lying = dict(manifest, tensors={k: v for k, v in manifest["tensors"].items() if k != "scale"}, bytes=len(bare),
                 sha256=hashlib.sha256(bare).hexdigest())
    with pytest.raises(UplinkError, match="need a 'scale'"):
        decode_uplink(bare, lying)
    tensors = load(blob)
    tensors["scale"][0] = float("inf")
    bad = save(tensors)
    with pytest.raises(UplinkError, match="finite"):
        decode_uplink(bad, dict(manifest, bytes=len(bad), sha256=hashlib.sha256(bad).hexdigest()))
    with pytest.raises(InputError, match="dtype"):
        encode_uplink(up, payload, "int4")


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=300), manifest=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_fuzz_uplink_decoder(blob, manifest):
    try:
        decode_uplink(blob, manifest)
    except UplinkError:
        pass


def test_the_manifest_grows_with_samples_not_with_tokens():
    """A thousand uplinked clips of 1,024 tokens: the manifest stays far below the service's
    1 MiB limit (it lists per-sample metadata, never token slots)."""
    n, tokens = 1000, 1024
    up = Uplink("dev-1", 1, [str(10**9 + i) for i in range(n)], torch.zeros(n, tokens, 2),
                torch.rand(n, tokens) > 0.75, answers=["three"] * n, confidences=[0.123456] * n,
                extra={"questions": ["how many times did the purple triangle appear ?"] * n})
    _, manifest = encode_uplink(up, "sparse")
    size = len(json.dumps(manifest, separators=(",", ":")))
    assert size < 200 * n < (1 << 20)
