"""FlashVID, FastVID and HoliTom on plain tensors: the worked examples of ``specs/sota.md`` §5,
exact totals and determinism (hypothesis), and the shared helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.errors import InputError
from tokensieve.methods import SegmentContext, retained_count
from tokensieve.methods.cluster import dpc_knn, segment_lengths, topk_det
from tokensieve.methods.fastvid import FastVID, fastvid_plan, place_context
from tokensieve.methods.flashvid import FlashVID, adts, layer_averaged_ratio, tree_merge
from tokensieve.methods.holitom import HoliTom, static_windows


def unit_vectors(*angles_and_axes):
    return torch.stack(list(angles_and_axes)).float()


# --- shared helpers ------------------------------------------------------------------------------

def test_topk_det_breaks_ties_by_index():
    assert topk_det(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 3).tolist() == [1, 2, 4]
    assert topk_det(torch.tensor([0.5]), 4).tolist() == [0]


def test_flashvid_segments_worked_example():
    s = torch.tensor([0.95, 0.5, 0.96, 0.92])
    assert segment_lengths(s, 0.9, min_segments=4).tolist() == [1, 1, 2, 1]
    assert segment_lengths(s, 0.9, min_segments=1).tolist() == [2, 3]
    assert segment_lengths(s, 0.9, min_segments=99).tolist() == [1, 1, 1, 1, 1]  # at most T segments
    assert segment_lengths(torch.zeros(0), 0.9, min_segments=8).tolist() == [1]


def test_fastvid_segments_worked_example():
    s = torch.tensor([0.99, 0.5, 0.99, 0.95, 0.2])
    assert segment_lengths(s, 0.9, extra_cuts=2).tolist() == [2, 3, 1]
    assert segment_lengths(s, 0.9, extra_cuts=3).tolist() == [2, 2, 1, 1]
    assert segment_lengths(s[:1], 0.9, extra_cuts=7).tolist() == [1, 1]  # c - 1 > T - 1: every transition


def test_dpc_picks_the_two_cluster_cores_not_the_outlier():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.0, 0.0]) + 0.01 * torch.randn(4, 2, generator=g)
    b = torch.tensor([5.0, 5.0]) + 0.01 * torch.randn(4, 2, generator=g)
    x = torch.cat([a, b, torch.tensor([[40.0, -40.0]])])
    centres, assign = dpc_knn(x, 2, 4)
    assert centres[0] < 4 <= centres[1] < 8
    assert assign[:4].tolist() == [0] * 4 and assign[4:8].tolist() == [1] * 4
    assert int(assign[8]) in (0, 1)


def test_dpc_is_deterministic_with_identical_rows():
    x = torch.ones(6, 3)
    centres, assign = dpc_knn(x, 2, 3)
    assert centres.tolist() == [0, 1]  # equal densities: the smaller index is denser; ties to it
    assert assign.tolist() == [0, 1, 0, 0, 0, 0]
    pairs = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]])  # two twins: all densities tie
    centres, assign = dpc_knn(pairs, 2, 2)
    assert centres.tolist() == [0, 2] and assign.tolist() == [0, 0, 1, 1]  # each twin's first is its peak


# --- FlashVID ------------------------------------------------------------------------------------

def test_adts_v1_prefers_diversity_over_a_near_duplicate():
    c = 0.999
    x = torch.tensor([[1.0, 0.0, 0.0], [c, 0.0, math.sqrt(1 - c * c)], [0.0, 1.0, 0.0]])
    assert adts(x, torch.ones(3), 2).tolist() == [0, 2]
    assert adts(x, torch.ones(3), 3).tolist() == [0, 1, 2]  # never a token twice
    assert adts(x, torch.tensor([0.0, 1.0, 0.0]), 2).tolist() == [0, 1]  # zero weight everywhere else: first index


def test_tree_merge_links_across_positions():
    e = torch.eye(4)
    c = 0.95
    s = math.sqrt(1 - c * c)
    u, v, w = e[0], e[1], e[2]
    u1, u2, w1 = c * u + s * e[3], c * (c * u + s * e[3]) + s * u, c * w + s * e[3]
    u2 = u2 / u2.norm()
    x = torch.stack([torch.stack([u, v]), torch.stack([w, u1]), torch.stack([u2, w1])])
    assert torch.nn.functional.cosine_similarity(u1, u2, dim=0) > 0.8
    roots, feats = tree_merge(x, torch.zeros(3, 2, dtype=torch.bool), 0.8, budget=3)
    assert roots.flatten().nonzero(as_tuple=True)[0].tolist() == [0, 1, 2]
    torch.testing.assert_close(feats[0, 0], (u + u1 + u2) / 3)
    torch.testing.assert_close(feats[0, 1], v)
    torch.testing.assert_close(feats[1, 0], (w + w1) / 2)


def test_tree_merge_keeps_enough_roots_by_dropping_the_weakest_links():
    x = torch.ones(3, 2, 4) + 1e-3 * torch.arange(24).float().view(3, 2, 4)  # everything links
    roots, _ = tree_merge(x, torch.zeros(3, 2, dtype=torch.bool), 0.8, budget=4)
    assert int(roots.sum()) == 4
    picked = torch.zeros(3, 2, dtype=torch.bool)
    picked[:, 0] = True  # ADTS picks neither link nor are linked to
    roots, _ = tree_merge(x, picked, 0.8, budget=1)
    assert roots[:, 0].sum() == 0 and int(roots.sum()) == 1


@pytest.mark.parametrize(("e", "K", "rho", "L"), [(1.25, 20, 0.3, 28), (1.25, 28, 0.1, 36)])
def test_paper_budget_identity(e, K, rho, L):
    assert layer_averaged_ratio(e, K, rho, L) == pytest.approx(1.0)


def test_received_attention_comes_from_the_tower_when_given():
    from tokensieve.methods.flashvid import attention_weights
    from tokensieve.methods.signals import received_attention

    x = torch.randn(2, 5, 4)
    tower = torch.rand(2, 5)
    assert torch.equal(attention_weights("received", x, SegmentContext(encoder_received=tower), "m"), tower)
    assert torch.equal(attention_weights("received", x, None, "m"), received_attention(x))
    assert torch.equal(attention_weights("features", x, SegmentContext(encoder_received=tower), "m"),
                       received_attention(x))
    torch.testing.assert_close(received_attention(x).sum(-1), torch.ones(2))


def test_flashvid_identity_at_full_retain():
    x = torch.randn(5, 9, 8, generator=torch.Generator().manual_seed(3))
    sel = FlashVID().select(x, 1.0)
    assert torch.equal(sel.keep, torch.arange(45))
    assert torch.equal(sel.features, x.reshape(45, 8))


def test_flashvid_merges_a_static_video_into_its_first_frame():
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0)).expand(6, 16, 8).contiguous()
    sel = FlashVID(min_segments=1).select(x, 0.25)
    assert sel.keep.numel() == 24
    # frame 0 holds the trees; later frames keep only their ADTS picks
    assert int(sel.frame_counts[0]) > int(sel.frame_counts[1:].max())


def test_flashvid_paper_preset_has_an_in_llm_stage_and_expands_the_pre_llm_count():
    x = torch.randn(4, 20, 8, generator=torch.Generator().manual_seed(1))
    assert FlashVID().llm_stage() is None
    stage = FlashVID(preset="paper").llm_stage()
    assert (stage.layer, stage.ratio) == (20, 0.3)
    assert [(p.layer, p.keep) for p in stage.plan(10, 28, 0.25)] == [(19, 3)]
    qwen3 = FlashVID(preset="paper", llm_layer=28, llm_ratio=0.1).llm_stage()
    assert [(p.layer, p.keep) for p in qwen3.plan(31, 36, 0.25)] == [(27, 4)]  # ceil(3.1)
    assert FlashVID(preset="paper").select(x, 0.2).keep.numel() == retained_count(4, 80, 0.25)
    assert FlashVID(preset="paper", depth="scaled").for_depth(14).llm_layer == 10


def test_flashvid_options_are_checked():
    spec = tokensieve.methods.get("flashvid")
    with pytest.raises(InputError, match="adts"):
        spec.create(adts="v3")
    with pytest.raises(InputError, match="preset"):
        spec.create(preset="ref")
    with pytest.raises(InputError, match="alpha"):
        spec.create(alpha=1.5)
    with pytest.raises(InputError, match="encoder attention"):
        spec.create(attention="encoder").select(torch.randn(2, 4, 3), 0.5)
    assert spec.signals(spec.create(attention="encoder")) == (False, True)
    assert spec.signals(spec.create()) == (False, True)  # the tower's received attention where there is one
    assert spec.signals(spec.create(attention="features")) == (False, False)


# --- FastVID -------------------------------------------------------------------------------------

def test_fastvid_anchors_and_context_split():
    sal, ctx, C = fastvid_plan(torch.tensor([4, 4, 4, 3, 3]), 0.4, 4)  # R = 18: C = 7, S = 11
    assert C == 7 and ctx.tolist() == [3, 0, 0, 0, 4]
    assert sal.tolist() == [3, 2, 2, 2, 2]
    assert int(sal.sum() + ctx.sum()) == 18


def test_fastvid_overflow_from_a_full_anchor_keeps_the_total():
    sal, ctx, _ = fastvid_plan(torch.full((4,), 98), 0.5, 4)  # r = .5, M = 196, L = 4: C = 196 on one anchor
    assert ctx.tolist() == [0, 0, 0, 196] and int(sal[3]) == 49
    sal2, ctx2 = place_context(sal, ctx, 196)
    assert ctx2.tolist() == [0, 0, 0, 147] and int((sal2 + ctx2).sum()) == 392
    assert bool((sal2 + ctx2 <= 196).all())
    x = torch.randn(4, 196, 8, generator=torch.Generator().manual_seed(0)) + torch.arange(4.0)[:, None, None] * 5
    sel = FastVID(tau=-1.0, segments=1).select(x, 0.5, SegmentContext(encoder_attention=torch.rand(4, 196)))
    assert sel.keep.numel() == 392


def test_fastvid_context_merge_weights():
    e = torch.eye(4)
    u, v, c = e[1] + 0.1 * e[0], e[1] - 0.1 * e[0], e[1]
    seg = torch.stack([torch.stack([e[3], u, v]), torch.stack([e[2], c, e[0]])])  # [2, 3, 4]
    kept = torch.tensor([[True, False, False], [True, True, False]])
    salient = torch.tensor([[True, False, False], [True, False, False]])
    method = FastVID()
    merged = method._merge(seg, kept, salient, 1, torch.tensor([1]), {1: torch.tensor([1])})
    # the unkept e[0] also joins the only context token: .6c + .4·mean(u, v, e0)
    torch.testing.assert_close(merged[0], 0.6 * c + 0.4 * (u + v + e[0]) / 3)
    lonely = method._merge(seg, torch.ones(2, 3, dtype=torch.bool), salient, 1, torch.tensor([1]), {})
    torch.testing.assert_close(lonely[0], c)  # no sources: unchanged


def test_fastvid_two_sources_give_point_two_each():
    c, u, w = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.2]), torch.tensor([1.0, -0.2])
    seg = torch.stack([c, u, w])[None]  # one frame, c kept as context, u and w dropped
    kept = torch.tensor([[True, False, False]])
    out = FastVID()._merge(seg, kept, torch.zeros(1, 3, dtype=torch.bool), 0, torch.tensor([0]), {})
    torch.testing.assert_close(out[0], 0.6 * c + 0.2 * u + 0.2 * w)


def test_fastvid_signals():
    spec = tokensieve.methods.get("fastvid")
    assert spec.signals(spec.create()) == (False, True)
    assert spec.signals(spec.create(attention="features")) == (False, False)
    with pytest.raises(InputError, match="encoder attention"):
        spec.create(attention="encoder").select(torch.randn(2, 4, 3), 0.5)


# --- HoliTom -------------------------------------------------------------------------------------

def holitom_video():
    """T = 4, M = 2: position 0 never changes; position 1 equal in frames 0-1, then changes twice."""
    e = torch.eye(4)
    return torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[0], e[1]]),
                        torch.stack([e[0], e[2]]), torch.stack([e[0], e[3]])]) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]


def test_holitom_windows_ties_go_to_the_shorter_window():
    sim = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    windows, saved = static_windows(sim, 0.8)
    assert windows == [(0, 1), (2, 3)] and saved == 3
    assert static_windows(sim, 0.8, max_window=2)[0] == [(0, 1), (2, 3)]
    assert static_windows(torch.zeros(3, 2), 0.8) == ([], 0)


def test_holitom_worked_example_demotes_and_merges():
    x = holitom_video()
    sel = HoliTom().select(x, 0.75)
    assert sel.keep.tolist() == [0, 1, 2, 4, 5, 7]
    feats = dict(zip(sel.keep.tolist(), sel.features))
    torch.testing.assert_close(feats[1], x[0:2, 1].mean(0))
    torch.testing.assert_close(feats[4], x[2:4, 0].mean(0))
    for i in (0, 2, 5, 7):
        torch.testing.assert_close(feats[i], x.reshape(8, 4)[i])


def test_holitom_restores_static_duplicates_when_the_budget_allows():
    x = holitom_video()
    sel = HoliTom().select(x, 7 / 8)  # one more than the groups hold: equal window minima, so t = 1 first
    assert sel.keep.tolist() == [0, 1, 2, 3, 4, 5, 7]
    feats = dict(zip(sel.keep.tolist(), sel.features))
    torch.testing.assert_close(feats[3], x[1, 1])
    torch.testing.assert_close(feats[1], x[0, 1])  # the static mean lost its restored frame
    torch.testing.assert_close(feats[4], x[2:4, 0].mean(0))
    full = HoliTom().select(x, 1.0)
    assert torch.equal(full.keep, torch.arange(8)) and torch.equal(full.features, x.reshape(8, 4))


def test_holitom_inner_merge_closed_form():
    from tokensieve.methods.inllm import MergePrune

    h, x1, x2 = torch.tensor([[4.0, 0.0]]), torch.tensor([1.0, 0.1]), torch.tensor([2.0, -0.1])
    out = MergePrune().merge_dropped(h, torch.stack([x1, x2]))
    torch.testing.assert_close(out[0], h[0] / 4 + x1 / 4 + x2 / 2)
    mean = MergePrune(op="mean").merge_dropped(h, torch.stack([x1, x2]))
    torch.testing.assert_close(mean[0], (h[0] + x1 + x2) / 3)
    kept = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = MergePrune().merge_dropped(kept, torch.tensor([[0.0, 2.0], [3.0, 0.1], [0.1, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5 + 1.5, 0.05], [0.05, 0.25 + 0.5 + 2.0]]))
    assert [p.keep for p in MergePrune().plan(5, 28, 1.0)] == [2]  # round(2.5) half-to-even, as the reference
    stage = HoliTom(inner=True).llm_stage()
    assert (stage.layer, stage.ratio) == (18, 0.5) and HoliTom().llm_stage() is None


def test_holitom_clusters_a_large_static_pool():
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(12, 6, generator=g)
    x = torch.stack([frame + 0.01 * torch.randn(12, 6, generator=g) for _ in range(5)])
    sel = HoliTom().select(x, 0.1)  # K = 6 for 60 tokens: 5 frames, 1 static pool
    assert sel.keep.numel() == 6 and bool((sel.frame_counts >= 1).all())


@pytest.mark.parametrize("method", [FlashVID(), FlashVID(adts="v1", budget="fca"), FastVID(), FastVID(merge="onevision"),
                                    HoliTom(), HoliTom(tau=0.0)])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 9), (8, 4)])
def test_full_retain_is_the_identity(method, shape):
    T, M = shape
    x = torch.randn(T, M, 6, generator=torch.Generator().manual_seed(T * 10 + M))
    x[T // 2:] = x[0]  # repeats: trees, static windows and merges all have something to do
    ctx = SegmentContext(encoder_attention=torch.rand(T, M), encoder_received=torch.rand(T, M))
    sel = method.select(x, 1.0, ctx)
    assert torch.equal(sel.keep, torch.arange(T * M))
    assert sel.features is None or torch.equal(sel.features, x.reshape(T * M, 6))


def test_identical_tokens_resolve_to_the_lowest_index():
    x = torch.ones(3, 6, 4)
    for method in (FlashVID(), FastVID(), HoliTom()):
        sel = method.select(x, 1 / 6, SegmentContext(encoder_attention=torch.ones(3, 6), encoder_received=torch.ones(3, 6)))
        assert (sel.keep % 6).tolist() == [0, 0, 0], type(method).__name__


# --- every new method: exact totals, determinism --------------------------------------------------

def _selectors(variant: int, budget: str):
    return {
        "flashvid": FlashVID(adts=("v2", "v1")[variant % 2], budget=budget, min_segments=(8, 4, 1, 2)[variant],
                             attention=("received", "encoder")[variant // 2 % 2]),
        "fastvid": FastVID(budget=budget, merge=("video", "onevision")[variant % 2],
                           sources=("dropped", "reference")[variant // 2 % 2], segments=(8, 1, 3, 20)[variant]),
        "holitom": HoliTom(tau=(0.8, 0.65, 0.0, 0.95)[variant], max_window=(1024, 2, 3, 1024)[variant],
                           attention=("received", "encoder")[variant % 2]),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 9),
    M=st.integers(1, 24),
    r=st.floats(min_value=1e-3, max_value=1.0, allow_nan=False),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["flashvid", "fastvid", "holitom"]),
    budget=st.sampled_from(["uniform", "fca"]),
    variant=st.integers(0, 3),
)
def test_exact_totals_and_determinism(T, M, r, seed, method, budget, variant):
    D = 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, M, D, generator=g)
    if seed % 3 == 0:
        x[T // 2:] = x[0]  # exact repeats: many ties
    if seed % 5 == 0:
        x = x + 3.0  # everything similar: trees link widely
    ctx = SegmentContext(encoder_attention=torch.rand(T, M, generator=g),
                         encoder_received=torch.rand(T, M, generator=g) if seed % 2 else None)
    selector = _selectors(variant, budget)[method]
    N = T * M
    sel = selector.select(x, r, ctx)
    keep = sel.keep
    assert keep.numel() == retained_count(T, N, r) == int(sel.frame_counts.sum())
    assert keep.dtype == torch.int64 and bool((keep[1:] > keep[:-1]).all())
    assert int(keep[0]) >= 0 and int(keep[-1]) < N
    assert torch.equal(torch.bincount(keep // M, minlength=T), sel.frame_counts)
    assert bool((sel.frame_counts >= 1).all())
    assert tuple(sel.features.shape) == (keep.numel(), D) and bool(torch.isfinite(sel.features).all())
    again = selector.select(x.clone(), r, ctx)
    assert torch.equal(again.keep, keep) and torch.equal(again.features, sel.features)
    if r == 1.0:
        assert torch.equal(keep, torch.arange(N))
        if getattr(selector, "sources", "dropped") == "dropped":
            assert torch.equal(sel.features, x.reshape(N, D))
