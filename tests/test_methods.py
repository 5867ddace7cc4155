"""Pure-tensor tests of the methods and budget policies (specs/vidcom2.md §4, §7, §11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.methods import (
    RandomSelect,
    UniformSelect,
    VidCom2,
    apportion,
    evenly_spaced,
    fca_budget,
    frame_scores,
    retained_count,
)


def dominant_video(T: int, M: int, D: int = 64, odd: int = 5, seed: int = 0) -> torch.Tensor:
    """Frames that all show nearly the same tokens, except frame ``odd`` which is unlike the rest."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    x = common + 0.05 * torch.randn(T, M, D, generator=g)
    x[odd] = 3.0 * torch.randn(M, D, generator=g)
    return x


# --- worked examples of specs/vidcom2.md §4 -------------------------------------------------


def test_reference_rounding_llava_ov_r025():
    x = dominant_video(32, 196, odd=5)
    sel = VidCom2(exact=False).select(x, 0.25)
    k = sel.frame_counts.tolist()
    assert k[5] == 96 and all(v == 47 for i, v in enumerate(k) if i != 5)
    assert sel.keep.numel() == 96 + 31 * 47 == 1553


def test_reference_rounding_llava_ov_r015():
    k = VidCom2(exact=False).select(dominant_video(32, 196), 0.15).frame_counts.tolist()
    assert k[5] == 58 and all(v == 28 for i, v in enumerate(k) if i != 5)
    assert sum(k) == 926


def test_reference_rounding_llava_video_r025():
    k = VidCom2(exact=False).select(dominant_video(64, 169, odd=7), 0.25).frame_counts.tolist()
    assert k[7] == 84 and all(v == 42 for i, v in enumerate(k) if i != 7)
    assert sum(k) == 2730


def test_exact_mode_llava_ov_r025():
    k = VidCom2().select(dominant_video(32, 196, odd=5), 0.25).frame_counts.tolist()
    assert sum(k) == 1568
    assert k[5] == 97
    others = [v for i, v in enumerate(k) if i != 5]
    # ties in the fractional part go to the more unique frame, then to the earlier frames
    assert others == [48] * 14 + [47] * 17


def test_exact_mode_r015_floor_rule_matches_spec_and_round_rule_adds_one():
    x = dominant_video(32, 196, odd=5)
    k = VidCom2(count_rule="floor").select(x, 0.15).frame_counts.tolist()
    others = [v for i, v in enumerate(k) if i != 5]
    assert sum(k) == 940 and k[5] == 58 and others == [29] * 14 + [28] * 17
    k = VidCom2().select(x, 0.15).frame_counts.tolist()
    assert sum(k) == 941 == round(0.15 * 6272)


def test_exact_mode_llava_video_r025():
    k = VidCom2().select(dominant_video(64, 169, odd=7), 0.25).frame_counts.tolist()
    others = sorted((v for i, v in enumerate(k) if i != 7), reverse=True)
    assert sum(k) == 2704 and k[7] == 84 and others == [42] * 37 + [41] * 26


# --- golden equivalence with an independent transcription of §3 ----------------------------


def transcription(x: np.ndarray, r: float) -> tuple[list[int], list[int]]:
    """Straight-line numpy transcription of specs/vidcom2.md §3 (reference rounding)."""
    T, M, D = x.shape
    flat = x.reshape(T * M, D).astype(np.float32)
    var = flat.var(axis=0)
    S = np.argsort(var, kind="stable")[: D // 2]
    sub = flat[:, S]
    z = sub / np.maximum(np.linalg.norm(sub, axis=1, keepdims=True), 1e-12)
    z = z.reshape(T, M, -1)
    g_v = z.reshape(T * M, -1).mean(0)
    g_f = z.mean(1, keepdims=True)

    def k_sum(c):
        d2 = ((z - c) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))

    s_vid, s_frm = k_sum(g_v), k_sum(g_f)
    u = -s_vid.mean(1)
    e = np.exp((u - u.max()) / 0.01)
    p = e / e.sum()
    r_t = np.minimum(1.0, r * (1 + p - 1.0 / T))
    k = np.maximum(1, np.round(r_t.astype(np.float64) * M)).astype(int)
    keep: list[int] = []
    for t in range(T):
        order = np.argsort(s_vid[t] + s_frm[t], kind="stable")[: k[t]]
        keep += sorted(int(i) + t * M for i in order)
    return keep, k.tolist()


@pytest.mark.parametrize("T,M,D", [(1, 49, 8), (2, 1, 8), (7, 49, 32), (32, 196, 64), (4, 49, 3584)])
@pytest.mark.parametrize("r", [0.1, 0.25, 0.7])
def test_reference_mode_matches_transcription(T, M, D, r):
    x = torch.randn(T, M, D, generator=torch.Generator().manual_seed(T * 1000 + M + D))
    keep, k = transcription(x.numpy(), r)
    sel = VidCom2(exact=False).select(x, r)
    assert sel.frame_counts.tolist() == k
    assert sel.keep.tolist() == keep


def test_invariant_to_global_positive_scale_and_unscored_channel_shift():
    x = torch.randn(6, 49, 32, generator=torch.Generator().manual_seed(3))
    base = VidCom2().select(x, 0.3).keep
    assert torch.equal(VidCom2().select(4.0 * x, 0.3).keep, base)
    worst = int(x.reshape(-1, 32).var(0, unbiased=False).argmax())  # highest variance: never scored
    shifted = x.clone()
    shifted[..., worst] += 0.5
    assert torch.equal(VidCom2().select(shifted, 0.3).keep, base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_score_in_fp32(dtype):
    x = torch.randn(8, 49, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    a, b = VidCom2().select(x, 0.25), VidCom2().select(x.float(), 0.25)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.frame_counts, b.frame_counts)


def test_fca_gives_the_most_unique_frame_the_most_tokens():
    x = dominant_video(12, 49, odd=9)
    k, w = fca_budget(x, 0.25)
    assert int(k.argmax()) == 9 and float(w.sum()) == pytest.approx(1.0)
    assert int(frame_scores(x).uniqueness.argmax()) == 9


def test_frame_ratio_range():
    x = torch.randn(10, 49, 16, generator=torch.Generator().manual_seed(5))
    T, M, r = 10, 49, 0.3
    k = VidCom2(exact=False).select(x, r).frame_counts.double()
    assert bool(((k >= np.floor(r * (1 - 1 / T) * M)) & (k <= np.ceil(r * (2 - 1 / T) * M))).all())


# --- exact totals: property tests -------------------------------------------------------------

ratios = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False, exclude_min=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 12), M=st.integers(1, 60), r=ratios, seed=st.integers(0, 2**16),
       method=st.sampled_from(["vidcom2", "vidcom2-uniform", "random", "random-fca", "uniform", "uniform-fca"]))
def test_exact_totals_and_well_formed_selection(T, M, r, seed, method):
    x = torch.randn(T, M, 8, generator=torch.Generator().manual_seed(seed))
    selector = {
        "vidcom2": VidCom2(),
        "vidcom2-uniform": VidCom2(budget="uniform"),
        "random": RandomSelect(seed=seed),
        "random-fca": RandomSelect(budget="fca"),
        "uniform": UniformSelect(),
        "uniform-fca": UniformSelect(budget="fca"),
    }[method]
    sel = selector.select(x, r)
    N = T * M
    expected = max(T, min(N, int(np.floor(r * N + 0.5))))
    assert sel.keep.numel() == expected == retained_count(T, N, r)
    assert int(sel.frame_counts.sum()) == expected
    assert bool((sel.frame_counts >= 1).all()) and bool((sel.frame_counts <= M).all())
    keep = sel.keep
    assert bool((keep[1:] > keep[:-1]).all()) and int(keep[0]) >= 0 and int(keep[-1]) < N
    per_frame = torch.bincount(keep // M, minlength=T)
    assert torch.equal(per_frame, sel.frame_counts)
    again = selector.select(x.clone(), r)
    assert torch.equal(again.keep, keep)


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 128), M=st.integers(1, 1024), r=ratios, seed=st.integers(0, 2**16))
def test_apportion_bounds_and_closeness(T, M, r, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(T, generator=g) * 5, 0)
    quotas = torch.clamp(r * (1 + p - 1 / T), max=1.0).double() * M
    K = retained_count(T, T * M, r)
    k = apportion(quotas, K, torch.full((T,), M), priority=p)
    assert int(k.sum()) == K
    assert bool((k >= 1).all()) and bool((k <= M).all())
    if not bool((r * (1 + p - 1 / T) >= 1).any()) and float(quotas.min()) >= 1:
        ref = torch.clamp(torch.round(quotas), min=1)
        assert bool(((k.double() - ref).abs() <= 1).all())


def test_apportion_edge_cases():
    assert apportion(torch.tensor([3.0]), 2, torch.tensor([5])).tolist() == [2]
    assert VidCom2().select(torch.randn(3, 7, 4), 1.0).keep.tolist() == list(range(21))
    assert retained_count(4, 8, 0.01) == 4  # at least one token per frame
    assert retained_count(2, 10, 0.25) == 3  # 2.5 rounds up
    assert retained_count(1, 10, 0.7) == 7
    assert retained_count(1, 10, 0.7, rule="floor") == 6  # float32(0.7) < 0.7: why "round" is the default


def test_evenly_spaced_and_uniform_method():
    assert evenly_spaced(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert evenly_spaced(4, 4).tolist() == [0, 1, 2, 3]
    sel = UniformSelect().select(torch.zeros(2, 16, 4), 0.25)
    assert sel.keep.tolist() == [2, 6, 10, 14, 18, 22, 26, 30]


def test_random_is_seeded_and_streams_differ_per_segment():
    from tokensieve.methods import SegmentContext

    x = torch.randn(4, 30, 8)
    a = RandomSelect(seed=1).select(x, 0.3)
    assert torch.equal(a.keep, RandomSelect(seed=1).select(x, 0.3).keep)
    assert not torch.equal(a.keep, RandomSelect(seed=2).select(x, 0.3).keep)
    other = RandomSelect(seed=1).select(x, 0.3, SegmentContext(ordinal=1))
    assert not torch.equal(a.keep, other.keep)


def test_registry():
    names = [m.name for m in tokensieve.methods.list()]
    assert {"vidcom2", "random", "uniform"} <= set(names)
    spec = tokensieve.methods.get("vidcom2")
    assert spec.stage == "pre-llm" and "fca" in spec.budget_policies and "exact" in spec.options
    with pytest.raises(tokensieve.InputError, match="unknown method 'nope'.*vidcom2"):
        tokensieve.methods.get("nope")
    with pytest.raises(tokensieve.InputError, match="does not accept option"):
        spec.create(bogus=1)
    with pytest.raises(tokensieve.InputError, match="budget"):
        tokensieve.methods.get("random").create(budget="weird")


def test_fca_favours_the_unique_frame_whatever_its_index():
    """FCA gives a frame that differs from the rest of the video more tokens: the distinct frame
    gets strictly the most, wherever it sits (a budget tied to frame order would not follow it)."""
    from tokensieve.methods import fca_budget

    g = torch.Generator().manual_seed(11)
    T, M, D = 5, 12, 16
    for unique in range(T):
        x = torch.randn(1, M, D, generator=g).expand(T, M, D).clone() + 0.05 * torch.randn(T, M, D, generator=g)
        x[unique] = torch.randn(M, D, generator=g) * 3.0
        k, weights = fca_budget(x, 0.4)
        assert int(k.sum()) == round(0.4 * T * M)
        others = [t for t in range(T) if t != unique]
        assert all(int(k[unique]) > int(k[t]) for t in others), (unique, k.tolist())
        assert all(float(weights[unique]) > float(weights[t]) for t in others)
