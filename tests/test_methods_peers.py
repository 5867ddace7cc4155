"""Pure-tensor tests of VisionZip and DyCoke stage 1 (specs/baselines.md §3 and §4.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.methods import DyCoke, SegmentContext, VisionZip, fca_budget, retained_count
from tokensieve.methods.dycoke import dycoke_count, ttm_plan
from tokensieve.methods.visionzip import contextual_merge, visionzip_split


def attention(T: int, M: int, seed: int = 0) -> SegmentContext:
    return SegmentContext(encoder_attention=torch.rand(T, M, generator=torch.Generator().manual_seed(seed + 7)))


# --- VisionZip ---------------------------------------------------------------------------------


def test_budget_split_follows_54_to_10():
    assert visionzip_split(64) == (54, 10)
    assert visionzip_split(128) == (108, 20)
    assert visionzip_split(192) == (162, 30)
    assert visionzip_split(1) == (0, 1)


def test_dominant_tokens_are_the_top_attention_ones_and_keep_their_features():
    M, D = 100, 16
    x = torch.randn(1, M, D, generator=torch.Generator().manual_seed(1))
    ctx = attention(1, M)
    sel = VisionZip().select(x, 0.64, ctx)  # 64 = 54 dominant + 10 contextual
    assert sel.keep.numel() == 64
    top = ctx.encoder_attention[0].topk(54).indices
    kept = sel.keep.tolist()
    assert set(top.tolist()) <= set(kept)
    for m in top.tolist():
        assert torch.equal(sel.features[kept.index(m)], x[0, m])


def clustered_frame() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten tokens: six dominant ones (by attention), then two clusters of two among the rest."""
    e = torch.eye(8)
    rows = [e[2], e[3], e[4], e[5], e[6], e[7], e[0], e[0] + 0.1 * e[2], e[1], e[1] + 0.1 * e[3]]
    x = torch.stack(rows).unsqueeze(0)
    attn = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.1, 0.2, 0.3, 0.4]])
    return x, attn


def test_contextual_tokens_merge_their_group():
    x, attn = clustered_frame()
    ctx = SegmentContext(encoder_attention=attn)
    # k = 8: 6 dominant (tokens 0..5), 2 contextual from the rest [6, 7, 8, 9] at stride 2 -> targets 6, 8
    sel = VisionZip().select(x, 0.8, ctx)
    assert sel.keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert torch.equal(sel.features[:6], x[0, :6])
    # reference rule: target + mean of its assignees
    assert torch.allclose(sel.features[6], x[0, 6] + x[0, 7])
    assert torch.allclose(sel.features[7], x[0, 8] + x[0, 9])
    means = VisionZip(contextual_op="mean").select(x, 0.8, ctx)
    assert torch.allclose(means.features[6], x[0, 6:8].mean(0))
    assert torch.allclose(means.features[7], x[0, 8:10].mean(0))


def test_contextual_merge_stride_and_lonely_targets():
    rest = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    targets, feats = contextual_merge(rest, 3)
    assert targets.tolist() == [0, 2, 4]  # step = floor(7 / 3) = 2
    targets, feats = contextual_merge(rest, 7)
    assert targets.tolist() == list(range(7)) and torch.equal(feats, rest)  # no assignees: unchanged
    one, f = contextual_merge(rest, 1, "mean")
    assert one.tolist() == [0] and torch.allclose(f[0], rest.mean(0), atol=1e-6)


def test_visionzip_identity_at_full_retain_and_per_frame_budgets():
    x = torch.randn(3, 12, 8)
    sel = VisionZip().select(x, 1.0, attention(3, 12))
    assert sel.keep.tolist() == list(range(36)) and torch.equal(sel.features, x.reshape(36, 8))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, generator=g) + 0.05 * torch.randn(6, 20, 16, generator=g)
    x[4] = 3.0 * torch.randn(20, 16, generator=g)
    sel = VisionZip(budget="fca").select(x, 0.25, attention(6, 20))
    assert torch.equal(sel.frame_counts, fca_budget(x, 0.25)[0])


def test_visionzip_needs_attention_unless_the_norm_proxy_is_used():
    x = torch.randn(2, 10, 4)
    with pytest.raises(tokensieve.InputError, match="visionzip.*vision-encoder attention"):
        VisionZip().select(x, 0.5)
    with pytest.raises(tokensieve.InputError, match=r"visionzip.*\[2, 10\]"):
        VisionZip().select(x, 0.5, SegmentContext(encoder_attention=torch.rand(20)))
    sel = VisionZip(dominant_score="norm").select(x, 0.5)
    assert sel.keep.numel() == 10
    with pytest.raises(tokensieve.InputError, match="visionzip option contextual_op"):
        VisionZip(contextual_op="sum")


# --- DyCoke TTM ---------------------------------------------------------------------------------


def test_ttm_plan_groups_of_four():
    # pairs (0,1), (2,3), ...; quads prune frame i+2 against frame i while i < T - 4
    assert ttm_plan(8).tolist() == [-1, 0, 0, 2, -1, 4, -1, 6]
    assert ttm_plan(8, "process").tolist() == [-1, 0, 0, 2, -1, 4, 4, 6]
    assert ttm_plan(7).tolist() == [-1, 0, 0, 2, -1, 4, -1]  # odd T: the last frame is emitted whole
    assert ttm_plan(1).tolist() == [-1]


def test_spec_worked_retention_llava_ov():
    # 9 whole frames (0, 4, ..., 28 and 30) + 23 pruned frames x 58 = 3098 of 6272 = 49.4%
    plan = ttm_plan(32)
    assert [t for t in range(32) if plan[t] < 0] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert dycoke_count(32, 196, 0.25, dycoke_k=0.7) == 3098
    assert round(3098 / 6272, 3) == 0.494
    x = torch.randn(32, 196, 4, generator=torch.Generator().manual_seed(4))
    sel = DyCoke(dycoke_k=0.7).select(x, 0.25)
    assert sel.keep.numel() == 3098
    assert sel.frame_counts.tolist() == [196 if plan[t] < 0 else 58 for t in range(32)]


def test_anchor_frame_whole_and_pruned_frame_keeps_what_changed():
    g = torch.Generator().manual_seed(5)
    T, M, D = 4, 6, 8
    base = torch.randn(M, D, generator=g)
    x = base.expand(T, M, D).clone() + 0.001 * torch.randn(T, M, D, generator=g)
    x[1, 2] = torch.randn(D, generator=g)
    x[1, 4] = torch.randn(D, generator=g)
    x[3, 0] = torch.randn(D, generator=g)
    x[3, 5] = torch.randn(D, generator=g)
    sel = DyCoke(dycoke_k=0.6).select(x, 1.0)  # q = floor(0.4 * 6) = 2
    assert sel.frame_counts.tolist() == [6, 2, 6, 2]
    assert sel.keep.tolist() == list(range(6)) + [6 + 2, 6 + 4] + list(range(12, 18)) + [18 + 0, 18 + 5]
    assert sel.features is None
    # quads: frame 2 of 8 is pruned against frame 0
    y = torch.cat([x, x])
    y[2, 3] = torch.randn(D, generator=g)
    sel = DyCoke(dycoke_k=0.8).select(y, 1.0)  # q = 1
    assert sel.frame_counts.tolist() == [6, 1, 1, 1, 6, 1, 6, 1]
    assert 12 + 3 in sel.keep.tolist()


def test_reference_pair_source_uses_the_previous_pair():
    g = torch.Generator().manual_seed(6)
    M, D = 5, 8
    x = torch.randn(1, M, D, generator=g).expand(4, M, D).clone() + 0.001 * torch.randn(4, M, D, generator=g)
    x[1, 1] = torch.randn(D, generator=g)  # pair (0, 1) changes at position 1
    x[3, 3] = torch.randn(D, generator=g)  # pair (2, 3) changes at position 3
    own = DyCoke(dycoke_k=0.8).select(x, 1.0).keep.tolist()
    ref = DyCoke(dycoke_k=0.8, ttm_pair_source="previous").select(x, 1.0).keep.tolist()
    assert own == list(range(5)) + [5 + 1] + list(range(10, 15)) + [15 + 3]
    assert ref == list(range(5)) + [5 + 3] + list(range(10, 15)) + [15 + 1]  # the first pair uses the last one's


def test_average_into_anchor_returns_group_means():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 4, generator=g)
    x[1, 0] = x[0, 0] + 0.01  # similar: dropped into frame 0, position 0
    x[1, 2] = x[0, 2] + 0.02
    sel = DyCoke(dycoke_k=0.5, ttm_op="average_into_anchor").select(x, 1.0)  # q = 1
    assert sel.keep.tolist() == [0, 1, 2, 4, 6, 7, 8]
    f = sel.features
    assert torch.allclose(f[0], (x[0, 0] + x[1, 0]) / 2) and torch.equal(f[1], x[0, 1])
    assert torch.allclose(f[2], (x[0, 2] + x[1, 2]) / 2) and torch.equal(f[3], x[1, 1])
    assert torch.equal(f[4:], x[2])
    # chains: frame 3 drops into frame 2, which drops into frame 0 (T = 8, quads)
    y = torch.randn(1, 2, 4).expand(8, 2, 4).contiguous()
    sel = DyCoke(dycoke_k=0.5, ttm_op="average_into_anchor").select(y, 1.0)
    assert torch.allclose(sel.features, y.reshape(16, 4)[sel.keep], atol=1e-6)


def test_retain_driven_counts_and_the_floor():
    T, M = 9, 20
    for r in (0.5, 0.7, 1.0):
        assert dycoke_count(T, M, r) == retained_count(T, T * M, r)
    # anchors whole + one token per pruned frame is the least DyCoke can keep
    plan = ttm_plan(T)
    W = int((plan < 0).sum())
    assert dycoke_count(T, M, 0.05) == W * M + (T - W)
    assert DyCoke().select(torch.randn(T, M, 4), 0.05).keep.numel() == W * M + (T - W)
    assert dycoke_count(1, 50, 0.1) == 50  # a single frame is left whole


def test_fca_biases_only_the_pruned_frames():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, generator=g) + 0.05 * torch.randn(8, 20, 8, generator=g)
    x[5] = 3.0 * torch.randn(20, 8, generator=g)  # the one unique frame
    uni = DyCoke().select(x, 0.5)
    fca = DyCoke(budget="fca").select(x, 0.5)
    plan = ttm_plan(8)
    whole = plan < 0
    assert bool((fca.frame_counts[whole] == 20).all())
    assert int(fca.frame_counts.sum()) == int(uni.frame_counts.sum()) == 80
    assert int(fca.frame_counts[5]) > int(uni.frame_counts[5])


@pytest.mark.parametrize(
    "opts,pattern",
    [
        ({"dycoke_k": 1.0}, r"dycoke_k must be a merging ratio in \[0, 1\)"),
        ({"ttm_op": "merge"}, "dycoke option ttm_op"),
        ({"ttm_last_quad": "skip"}, "dycoke option ttm_last_quad"),
        ({"budget": "global"}, "dycoke option budget"),
    ],
)
def test_dycoke_bad_options(opts, pattern):
    with pytest.raises(tokensieve.InputError, match=pattern):
        DyCoke(**opts)


def test_registry_entries():
    vz = tokensieve.methods.get("visionzip")
    assert vz.needs_encoder_attention and set(vz.budget_policies) == {"uniform", "fca"}
    dc = tokensieve.methods.get("dycoke")
    assert not dc.needs_encoder_attention and not dc.needs_text and "dycoke_k" in dc.options
    assert isinstance(dc.create(ttm_op="average_into_anchor"), DyCoke)


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 10),
    M=st.integers(1, 30),
    r=st.floats(min_value=1e-3, max_value=1.0, allow_nan=False),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["visionzip", "dycoke"]),
    budget=st.sampled_from(["uniform", "fca"]),
    variant=st.integers(0, 3),
)
def test_exact_totals_and_well_formed_selection(T, M, r, seed, method, budget, variant):
    D = 6
    x = torch.randn(T, M, D, generator=torch.Generator().manual_seed(seed))
    if seed % 3 == 0:
        x[T // 2 :] = x[0]  # exact repeats: many ties
    ctx = attention(T, M, seed)
    N = T * M
    if method == "visionzip":
        selector = VisionZip(budget=budget, contextual_op=("reference", "mean")[variant % 2])
        expected = retained_count(T, N, r)
    else:
        k = (None, 0.7, 0.3, None)[variant]
        selector = DyCoke(
            budget=budget, dycoke_k=k, ttm_op=("drop", "average_into_anchor")[variant % 2],
            ttm_last_quad=("reference", "process")[variant // 2 % 2],
        )
        expected = selector.count(T, M, r)
        if k is None:
            assert expected >= min(N, retained_count(T, N, r))
    sel = selector.select(x, r, ctx)
    keep = sel.keep
    assert keep.numel() == expected == int(sel.frame_counts.sum())
    assert keep.dtype == torch.int64 and bool((keep[1:] > keep[:-1]).all())
    assert int(keep[0]) >= 0 and int(keep[-1]) < N
    assert torch.equal(torch.bincount(keep // M, minlength=T), sel.frame_counts)
    assert bool((sel.frame_counts >= 1).all())
    if sel.features is not None:
        assert tuple(sel.features.shape) == (expected, D) and bool(torch.isfinite(sel.features).all())
    again = selector.select(x.clone(), r, ctx)
    assert torch.equal(again.keep, keep)
    if sel.features is not None:
        assert torch.equal(again.features, sel.features)


# M, K pairs where float32 and the official code's Python float disagree on floor((1 - K) * M)
_K_GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
_M_GRID = [1, 4, 9, 49, 64, 100, 144, 196, 200, 256, 300, 400, 576, 729]


def test_dycoke_count_rule_uses_the_official_python_float():
    """q = max(1, int((1 - K)·M)) with K a Python float, as the official TTM computes it. Pinned cases
    where a float32 K keeps one token fewer (e.g. M = 300, K = 0.3: 210, float32 gives 209)."""
    assert dycoke_count(2, 300, 1.0, dycoke_k=0.3) == 300 + 210
    assert dycoke_count(2, 100, 1.0, dycoke_k=0.3) == 100 + 70
    assert dycoke_count(2, 200, 1.0, dycoke_k=0.3) == 200 + 140
    assert dycoke_count(2, 400, 1.0, dycoke_k=0.3) == 400 + 280
    differ = 0
    for M in _M_GRID:
        for K in _K_GRID:
            q = max(1, int((1.0 - K) * M))  # the official rule, written out
            assert dycoke_count(2, M, 1.0, dycoke_k=K) == M + min(q, M), (M, K)
            f32 = math.floor((1.0 - float(np.float32(K))) * M)
            differ += max(1, f32) != q
    assert differ > 0  # the grid does contain cases the float32 reading got wrong


def test_ttm_keep_order_similarity_emits_least_similar_first():
    """The official code emits a pruned frame's kept tokens in top-k (ascending similarity)
    order; the selected set is the same as in raster order."""
    g = torch.Generator().manual_seed(9)
    M, D = 6, 8
    x = torch.randn(1, M, D, generator=g).expand(2, M, D).clone()
    x[1] += 0.05 * torch.randn(M, D, generator=g)
    x[1, 4] = torch.randn(D, generator=g)  # least similar
    x[1, 1] = x[0, 1] + 0.3 * torch.randn(D, generator=g)  # second least similar
    raster = DyCoke(dycoke_k=0.5).select(x, 1.0)
    ordered = DyCoke(dycoke_k=0.5, ttm_keep_order="similarity").select(x, 1.0)
    assert torch.equal(raster.keep, ordered.keep) and raster.order is None
    sim = torch.nn.functional.cosine_similarity(x[1], x[0], dim=-1)
    expected = M + torch.argsort(sim)[:3]  # q = 3 least similar, least first
    emitted = ordered.keep[ordered.order]
    assert emitted[:M].tolist() == list(range(M))  # the anchor frame stays in raster order
    assert emitted[M:].tolist() == expected.tolist()
    assert emitted[M:].tolist() != sorted(emitted[M:].tolist())


def test_dycoke_renamed_and_refused_option_values():
    for bad in ({"ttm_pair_source": "reference"}, {"ttm_keep_order": "reference"}):
        with pytest.raises(tokensieve.InputError, match="must be one of"):
            DyCoke(**bad)
