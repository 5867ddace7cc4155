"""Pure-tensor tests of LFTR (specs/lftr.md §3 and its conformance list §5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.methods import LFTR, SegmentContext, fca_budget
from tokensieve.methods.lftr import (
    lftr_counts,
    representative_mean,
    temporal_absorb,
    temporal_merge,
    temporal_scores,
    text_scores,
)


def repeat_video(M: int = 4, D: int = 8, seed: int = 0) -> torch.Tensor:
    """Six frames: A A A B A A, the repeats carrying a little noise so the means are informative."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, D, generator=g)
    b = torch.randn(M, D, generator=g)
    x = a + 0.01 * torch.randn(6, M, D, generator=g)
    x[3] = b
    return x


def full_context(T: int, M: int, D: int, seed: int = 0) -> SegmentContext:
    g = torch.Generator().manual_seed(seed + 99)
    return SegmentContext(text=torch.randn(3, D, generator=g), encoder_attention=torch.rand(T, M, generator=g))


# --- counts: spec §3.3 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rho_t,rho_s,k_t,k",
    [
        (1.0, 0.25, 6272, 1568),
        (0.25, 1.0, 1568, 1568),
        (0.5, 0.5, 3136, 1568),
        (0.25, 0.25, 1568, 392),
        (0.5, 0.25, 3136, 784),
    ],
)
def test_spec_budget_table_llava_ov(rho_t, rho_s, k_t, k):
    sel = LFTR(temporal_ratio=rho_t, spatial_ratio=rho_s)
    assert sel.counts(32, 196, 0.5) == (k_t, k)  # explicit ratios override retain
    x = torch.randn(32, 196, 8, generator=torch.Generator().manual_seed(1))
    out = sel.select(x, 0.5, full_context(32, 196, 8))
    assert out.keep.numel() == k and int(out.frame_counts.sum()) == k


def test_paper_setting_from_retain_one_sixteenth_and_remove_semantics():
    # the single-ratio entry point: rho_T = sqrt(1/16) = 25%, total round(N/16)
    assert LFTR().counts(32, 196, 1 / 16) == (1568, 392)
    # "remove" semantics: 25% / 25% removed keeps 75% x 75% = 56.25%
    assert LFTR(temporal_ratio=0.25, spatial_ratio=0.25, rate_semantics="remove").counts(32, 196, 1.0) == (4704, 3528)
    assert 3528 / 6272 == pytest.approx(0.5625)


def test_retain_driven_totals_are_the_library_count():
    for T, M, r in [(32, 196, 0.25), (8, 49, 0.15), (1, 729, 0.3), (3, 10, 0.9)]:
        target = tokensieve.methods.retained_count(T, T * M, r)
        for opts in [{}, {"temporal": "off"}, {"split": "temporal_only"}]:
            assert LFTR(**opts).counts(T, M, r)[1] == target
        # a fixed temporal ratio: the spatial stage removes the rest, if anything is left to remove
        k_t, k = LFTR(temporal_ratio=0.5).counts(T, M, r)
        assert k == min(k_t, target)
    # temporal alone cannot merge frame 0 (nor the last token of any other frame)
    assert LFTR(spatial="off").counts(4, 10, 0.1) == (13, 13)
    assert LFTR(spatial="off", min_per_frame=0).counts(4, 10, 0.1) == (10, 10)
    # a single frame: the temporal stage is void and the spatial stage takes the whole retain
    assert LFTR().counts(1, 100, 0.25) == (100, 25)


def test_ratios_are_read_as_float32():
    # float32(0.7) < 0.7: floor(0.7 * 10) in float32 bits is 6, as for engines sizing placeholders
    assert lftr_counts(1, 10, 1.0, temporal=False, spatial_ratio=0.7) == (10, 6)


# --- temporal stage: spec §3.4 -----------------------------------------------------------------------


def test_repeats_merge_and_the_odd_frame_stays():
    x = repeat_video()
    sel = LFTR(temporal="similarity", spatial="off", temporal_ratio=0.5, min_per_frame=0).select(x, 1.0)
    M = 4
    # frames 1, 2 repeat frame 0 and frame 5 repeats frame 4; frame 3 and the frame after it differ
    assert sel.frame_counts.tolist() == [4, 0, 0, 4, 4, 0]
    assert sel.keep.tolist() == list(range(0, M)) + list(range(3 * M, 5 * M))
    feats = sel.features.view(3, M, -1)
    assert torch.allclose(feats[0], x[0:3].mean(0), atol=1e-6)
    assert torch.equal(feats[1], x[3])
    assert torch.allclose(feats[2], x[4:6].mean(0), atol=1e-6)


def test_repeats_with_a_token_per_frame_floor():
    x = repeat_video()
    # 3 x (4 - 1) merges (M = 4 tokens per frame): each repeat frame keeps only its least redundant token
    sel = LFTR(spatial="off", temporal_ratio=1 - 9 / 24).select(x, 1.0)
    assert sel.frame_counts.tolist() == [4, 1, 1, 4, 4, 1]
    absorbed = temporal_absorb(temporal_scores(x), 9)
    merged = temporal_merge(x, absorbed)
    for t, m in torch.nonzero(merged.alive).tolist():  # each representative is the mean of its run
        run = [t]
        while run[-1] + 1 < 6 and bool(absorbed[run[-1] + 1, m]):
            run.append(run[-1] + 1)
        assert torch.allclose(merged.features[t, m], x[run, m].mean(0), atol=1e-6)
    assert torch.equal(sel.keep, torch.nonzero(merged.alive.reshape(-1), as_tuple=True)[0])


def test_differential_scores_are_magnitude_sensitive():
    x = torch.ones(2, 2, 4)
    x[1, 0] *= 3.0  # same direction, three times the norm
    assert temporal_scores(x, "similarity")[0].tolist() == pytest.approx([1.0, 1.0])
    assert temporal_scores(x, "differential")[0].tolist() == pytest.approx([-2.0 * 2 / 2, 0.0])
    sel = LFTR(temporal="differential", spatial="off", temporal_ratio=0.75).select(x, 1.0)
    assert sel.keep.tolist() == [0, 1, 2]  # (1, 1) merges; the scaled (1, 0) stays


def test_static_video_merges_into_frame_zero():
    x = torch.randn(1, 9, 6).expand(5, 9, 6).contiguous()
    sel = LFTR(spatial="off", temporal_ratio=0.2, min_per_frame=0).select(x, 1.0)
    assert sel.keep.tolist() == list(range(9))
    assert torch.allclose(sel.features, x[0], atol=1e-6)


def sequential_merge(
    x: torch.Tensor, absorbed: torch.Tensor, sizes: torch.Tensor
) -> dict[tuple[int, int], tuple[torch.Tensor, float]]:
    """Running average scanned frame by frame, exactly as the table of spec §3.4."""
    T, M, _ = x.shape
    out = {}
    for m in range(M):
        anchor = None
        for t in range(T):
            if t == 0 or not bool(absorbed[t, m]):
                anchor = (t, m)
                out[anchor] = (x[t, m].double().clone(), float(sizes[t, m]))
            else:
                mu, S = out[anchor]
                s = float(sizes[t, m])
                out[anchor] = ((S * mu + s * x[t, m].double()) / (S + s), S + s)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_merge_equals_sequential_and_conserves_size(seed):
    g = torch.Generator().manual_seed(seed)
    T, M, D = 7, 5, 6
    x = torch.randn(T, M, D, generator=g)
    sizes = torch.randint(1, 4, (T, M), generator=g).float()
    absorbed = torch.rand(T, M, generator=g) < 0.5
    absorbed[0] = False
    merged = temporal_merge(x, absorbed, sizes)
    ref = sequential_merge(x, absorbed, sizes)
    assert set(ref) == {(int(t), int(m)) for t, m in torch.nonzero(merged.alive).tolist()}
    for (t, m), (mu, S) in ref.items():
        assert torch.allclose(merged.features[t, m].double(), mu, atol=1e-5)
        assert float(merged.sizes[t, m]) == S
    assert float(merged.sizes[merged.alive].sum()) == float(sizes.sum())


def test_temporal_ties_go_to_the_earlier_frame_then_smaller_position():
    scores = torch.zeros(3, 4)
    absorbed = temporal_absorb(scores, 5, "global", min_per_frame=0)
    assert absorbed[1].tolist() == [True] * 4 and absorbed[2].tolist() == [True, False, False, False]
    absorbed = temporal_absorb(scores, 5, "global", min_per_frame=1)
    assert absorbed.sum(1).tolist() == [0, 3, 2, 0]
    absorbed = temporal_absorb(scores, 5, "per_frame", min_per_frame=1)
    assert absorbed.sum(1).tolist() == [0, 2, 2, 1]


# --- spatial stage: spec §3.5 ----------------------------------------------------------------------


def test_text_question_equal_to_a_token_keeps_it():
    x = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(2))
    ctx = SegmentContext(text=x[1, 5].unsqueeze(0))
    assert int(text_scores(x.reshape(-1, 12), ctx.text).argmax()) == 16 + 5
    sel = LFTR(temporal="off", spatial="text").select(x, 3 / 48, ctx)
    assert sel.frame_counts.tolist() == [1, 1, 1] and 16 + 5 in sel.keep.tolist()
    sel = LFTR(temporal="off", spatial="text", spatial_scope="global", spatial_ratio=1.5 / 48, min_per_frame=0)
    sel = sel.select(x, 1.0, ctx)
    assert sel.keep.tolist() == [16 + 5]
    # max aggregation: one of several question tokens equal to the visual token is enough
    q = torch.cat([torch.randn(4, 12, generator=torch.Generator().manual_seed(3)), x[2, 9:10]])
    assert float(text_scores(x[2, 9], q, "max")) == pytest.approx(1.0)


def test_text_score_is_cosine_to_the_mean_question_embedding():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    q = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # mean (1, 1)
    expected = torch.tensor([1 / math.sqrt(2), 1.0, -1 / math.sqrt(2)])
    assert torch.allclose(text_scores(f, q), expected, atol=1e-6)


def test_topic_keeps_the_highest_attention_tokens():
    T, M = 4, 9
    x = torch.randn(T, M, 8, generator=torch.Generator().manual_seed(4))
    attn = torch.rand(T, M, generator=torch.Generator().manual_seed(5))
    sel = LFTR(temporal="off", spatial="topic").select(x, 12 / 36, SegmentContext(encoder_attention=attn))
    assert sel.frame_counts.tolist() == [3, 3, 3, 3]
    expected = sorted(int(i) + t * M for t in range(T) for i in attn[t].topk(3).indices)
    assert sel.keep.tolist() == expected and sel.features is None


def test_topic_of_a_representative_is_its_members_mean_attention():
    x = torch.randn(3, 2, 4)
    absorbed = torch.tensor([[False, False], [True, False], [True, True]])
    merged = temporal_merge(x, absorbed)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    rm = representative_mean(a, merged)
    assert float(rm[0, 0]) == pytest.approx(3.0) and float(rm[0, 1]) == 2.0 and float(rm[1, 1]) == pytest.approx(5.0)


def test_spatial_merge_averages_dropped_tokens_into_the_most_similar_kept_one():
    e = torch.eye(4)
    x = torch.stack([e[0], e[0] + 0.1 * e[2], e[1], e[1] + 0.2 * e[3]]).unsqueeze(0)  # [1, 4, 4]
    ctx = SegmentContext(encoder_attention=torch.tensor([[4.0, 1.0, 3.0, 2.0]]))
    sel = LFTR(temporal="off", spatial="topic", spatial_op="merge").select(x, 0.5, ctx)
    assert sel.keep.tolist() == [0, 2]
    assert torch.allclose(sel.features, torch.stack([x[0, :2].mean(0), x[0, 2:].mean(0)]))


def test_fca_spatial_budget_matches_the_policy_when_temporal_is_off():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, generator=g) + 0.05 * torch.randn(6, 20, 16, generator=g)
    x[2] = 3.0 * torch.randn(20, 16, generator=g)  # the one unique frame
    sel = LFTR(temporal="off", budget="fca").select(x, 0.3, full_context(6, 20, 16))
    k, _ = fca_budget(x, 36 / 120, total=36)
    assert torch.equal(sel.frame_counts, k) and int(k.argmax()) == 2 and int(k[2]) > 6
    # with temporal merging the frame budgets are bounded by each frame's survivors
    sel = LFTR(budget="fca", temporal_ratio=0.5).select(x, 0.3, full_context(6, 20, 16))
    assert sel.keep.numel() == 36 and int(sel.frame_counts.argmax()) == 2


def test_identity_when_nothing_is_removed():
    x = torch.randn(4, 6, 5)
    sel = LFTR(temporal_ratio=1.0, spatial_ratio=1.0).select(x, 0.3)  # no signal needed either
    assert sel.keep.tolist() == list(range(24)) and sel.features is None
    assert LFTR().select(x, 1.0).keep.tolist() == list(range(24))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_score_in_fp32(dtype):
    x = torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(7)).to(dtype)
    ctx = full_context(6, 16, 8)
    a, b = LFTR().select(x, 0.2, ctx), LFTR().select(x.float(), 0.2, ctx)
    assert torch.equal(a.keep, b.keep) and a.features.dtype == dtype


# --- errors ----------------------------------------------------------------------------------------


def test_missing_signals_name_the_method_and_the_signal():
    x = torch.randn(2, 8, 4)
    with pytest.raises(tokensieve.InputError, match="lftr.*question text"):
        LFTR().select(x, 0.25)
    with pytest.raises(tokensieve.InputError, match="lftr.*question text"):
        LFTR().select(x, 0.25, SegmentContext(text=torch.zeros(0, 4)))
    with pytest.raises(tokensieve.InputError, match="lftr.*vision-encoder attention"):
        LFTR(spatial="topic").select(x, 0.25, SegmentContext(text=torch.randn(2, 4)))
    with pytest.raises(tokensieve.InputError, match=r"\[2, 8\]"):
        LFTR(spatial="topic").select(x, 0.25, SegmentContext(encoder_attention=torch.rand(8)))
    assert LFTR(spatial="off").select(x, 0.25).keep.numel() == 9  # no signal needed


@pytest.mark.parametrize(
    "opts,pattern",
    [
        ({"temporal": "diff"}, "lftr option temporal must be one of"),
        ({"spatial": "cls"}, "lftr option spatial must be one of"),
        ({"temporal_ratio": 0.0}, r"temporal_ratio must be a retention fraction in \(0, 1\]"),
        ({"spatial_ratio": 1.0, "rate_semantics": "remove"}, r"spatial_ratio must be a removal fraction in \[0, 1\)"),
        ({"budget": "proportional"}, "lftr option budget"),
        ({"min_per_frame": 2}, "min_per_frame must be 0 or 1"),
        ({"spatial_scope": "all"}, "spatial_scope"),
    ],
)
def test_bad_options(opts, pattern):
    with pytest.raises(tokensieve.InputError, match=pattern):
        LFTR(**opts)


def test_registry_entry():
    spec = tokensieve.methods.get("lftr")
    assert spec.stage == "pre-llm" and spec.needs_text and set(spec.budget_policies) == {"uniform", "fca"}
    assert {"temporal", "spatial", "temporal_ratio", "spatial_ratio", "budget"} <= set(spec.options)
    assert spec.create(spatial="topic").needs_encoder_attention


# --- properties ----------------------------------------------------------------------------------

ratios = st.one_of(st.none(), st.floats(min_value=0.01, max_value=1.0, allow_nan=False))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 7),
    M=st.integers(1, 24),
    r=st.floats(min_value=1e-3, max_value=1.0, allow_nan=False),
    seed=st.integers(0, 2**16),
    temporal=st.sampled_from(["similarity", "differential", "off"]),
    spatial=st.sampled_from(["text", "topic", "off"]),
    budget=st.sampled_from(["uniform", "fca"]),
    rho_t=ratios,
    rho_s=ratios,
    floor=st.sampled_from([0, 1]),
    tscope=st.sampled_from(["global", "per_frame"]),
    sscope=st.sampled_from(["per_frame", "global"]),
    op=st.sampled_from(["drop", "merge"]),
)
def test_exact_totals_and_well_formed_selection(
    T, M, r, seed, temporal, spatial, budget, rho_t, rho_s, floor, tscope, sscope, op
):
    D = 6
    x = torch.randn(T, M, D, generator=torch.Generator().manual_seed(seed))
    if seed % 3 == 0:
        x[T // 2 :] = x[0]  # exact repeats: many ties
    sel = LFTR(
        temporal=temporal, spatial=spatial, budget=budget, temporal_ratio=rho_t, spatial_ratio=rho_s,
        min_per_frame=floor, temporal_scope=tscope, spatial_scope=sscope, spatial_op=op,
    )
    ctx = full_context(T, M, D, seed)
    out = sel.select(x, r, ctx)
    N = T * M
    _, K = sel.counts(T, M, r)
    assert out.keep.numel() == K == int(out.frame_counts.sum())
    keep = out.keep
    assert keep.dtype == torch.int64 and bool((keep[1:] > keep[:-1]).all())
    assert int(keep[0]) >= 0 and int(keep[-1]) < N
    assert torch.equal(torch.bincount(keep // M, minlength=T), out.frame_counts)
    if floor == 1:
        assert bool((out.frame_counts >= 1).all())
    target = tokensieve.methods.retained_count(T, N, r)
    if rho_t is None and rho_s is None and spatial != "off":
        assert K == target
    if rho_t is None and spatial == "off" and temporal != "off" and T > 1:
        assert K == min(N, max(M + (T - 1) * floor, target))
    if out.features is not None:
        assert tuple(out.features.shape) == (K, D) and bool(torch.isfinite(out.features).all())
    again = sel.select(x.clone(), r, ctx)
    assert torch.equal(again.keep, keep)
    assert (again.features is None) == (out.features is None)
    if out.features is not None:
        assert torch.equal(again.features, out.features)
