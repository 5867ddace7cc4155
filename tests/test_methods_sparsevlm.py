"""Pure-tensor tests of SparseVLM (specs/sparsevlm.md §2–§4, §7–§9 and the conformance list §14)."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve import methods
from tokensieve.errors import InputError
from tokensieve.methods.sparsevlm import (
    SCHEDULES,
    SparseVLMOptions,
    check_schedule,
    dpc_knn,
    equivalent_tokens,
    head_count,
    mrope_axes,
    prefill_flops,
    rank_keep,
    rater_relevance,
    raters_from_relevance,
    ratio_schedule,
    recycle,
    recycle_counts,
    rope_gravity,
    schedule_for,
    select_heads,
    select_raters,
    significance,
    simulate_schedule,
    solve_ratio,
)

# --- §8 equivalent tokens on LLaVA-1.5 (576 visual tokens, 32 layers) ---------------------------


@pytest.mark.parametrize(
    "variant,target,recycled_on,e_out,e_in,recycled",
    [
        ("v1.5", 192, True, 192.03, 206.5, (9, 4, 3)),
        ("v1.5", 128, True, 128.62, 145.4, (9, 7, 3)),
        ("v1.5", 96, True, 96.94, 114.1, (11, 7, 1)),
        ("v1.5", 64, True, 64.81, 82.3, (16, 2, 1)),
        ("v2", 192, False, 192.44, 206.8, (0, 0, 0)),
        ("v2", 128, False, 128.00, 144.1, (0, 0, 0)),
        ("v2", 96, False, 96.81, 113.9, (0, 0, 0)),
        ("v2", 64, False, 64.44, 81.8, (0, 0, 0)),
    ],
)
def test_spec_equivalent_token_table(variant, target, recycled_on, e_out, e_in, recycled):
    sim = simulate_schedule(576, 32, schedule_for(variant, target), recycle=recycled_on)
    assert sim["e_out"] == pytest.approx(e_out, abs=0.006)
    assert sim["e_in"] == pytest.approx(e_in, abs=0.06)
    assert tuple(sim["recycled"][layer] for layer in (2, 6, 15)) == recycled
    assert sim["kept"] == schedule_for(variant, target)  # every stage fits under V - 1


def test_worked_check_v15_192_per_layer_counts():
    sim = simulate_schedule(576, 32, schedule_for("v1.5", 192))
    assert sim["v_out"] == [576] * 2 + [309] * 4 + [204] * 9 + [113] * 17
    assert sim["v_in"] == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert sum(sim["v_out"]) == 6145 and sum(sim["v_in"]) == 6608
    assert sim["e_out"] == 192.03125  # the reference log "equal token num until now: 192.03125"
    assert equivalent_tokens(sim["v_in"], sim["v_out"]) == (sim["e_out"], sim["e_in"])


def test_recycle_counts_rule():
    assert recycle_counts(276) == (83, 9)  # §4 check for 192
    assert recycle_counts(0) == (0, 0)
    assert recycle_counts(1) == (1, 1) and recycle_counts(2) == (1, 1)
    for n in range(1, 3000):
        n1 = (3 * n) // 10 + 1
        assert recycle_counts(n) == (min(n, n1), n1 // 10 + 1)


def test_schedules_table():
    assert SCHEDULES["v1.5"][192] == (300, 200, 110) and SCHEDULES["v2"][128] == (238, 108, 60)
    assert schedule_for("v2.0", 64) == {2: 66, 6: 34, 15: 20}
    assert schedule_for("v1.5", 96, layers=(1, 5, 9)) == {1: 238, 5: 48, 9: 26}
    with pytest.raises(InputError, match="accepted: 64, 96, 128, 192"):
        schedule_for("v1.5", 100)
    with pytest.raises(InputError, match="variant"):
        schedule_for("v3", 192)
    with pytest.raises(InputError, match="'v1.5' and 'v2' only"):
        schedule_for("v1.0", 192)


# --- §9 FLOPs -----------------------------------------------------------------------------------


def test_prefill_flops_llava15():
    d, m = 4096, 11008
    assert prefill_flops([694] * 32, d, m) / 1e12 == pytest.approx(4.62, abs=0.005)
    for target, tflops in ((192, 2.13), (128, 1.73)):
        sim = simulate_schedule(576, 32, schedule_for("v1.5", target))
        n = [118 + v for v in sim["v_in"]]  # the pruning layer runs on its full input
        assert prefill_flops(n, d, m) / 1e12 == pytest.approx(tflops, abs=0.005)


def test_prefill_flops_gqa_form():
    n, d, m, dkv = 100, 64, 256, 16
    assert prefill_flops([n], d, m, d_kv=d) == prefill_flops([n], d, m) == 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    assert prefill_flops([n, n], d, m, d_kv=dkv) == 2 * (n * d * (2 * d + 2 * dkv) + 2 * n * n * d + 3 * n * d * m)
    with pytest.raises(InputError):
        prefill_flops([n], 0, m)


# --- §2.1 raters --------------------------------------------------------------------------------


def test_rater_aligned_with_every_visual_token():
    g = torch.Generator().manual_seed(0)
    D = 16
    u = torch.zeros(D)
    u[0] = 1.0
    h_visual = 3.0 * u + 0.1 * torch.randn(20, D, generator=g)
    h_text = 0.1 * torch.randn(6, D, generator=g)
    h_text[4] = 3.0 * u  # the one text token every visual token points at
    assert select_raters(h_visual, h_text).tolist() == [4]


def test_raters_direct_transcription():
    g = torch.Generator().manual_seed(1)
    hv, ht = torch.randn(12, 8, generator=g), torch.randn(7, 8, generator=g)
    r = []
    for i in range(7):
        acc = 0.0
        for v in range(12):
            row = [float(hv[v] @ ht[j]) for j in range(7)]
            mx = max(row)
            acc += math.exp(row[i] - mx) / sum(math.exp(x - mx) for x in row)
        r.append(acc / 12)
    assert torch.allclose(rater_relevance(hv, ht), torch.tensor(r), atol=1e-6)
    mean = sum(r) / 7
    assert select_raters(hv, ht).tolist() == [i for i in range(7) if r[i] > mean]
    assert select_raters(hv, ht).dtype == torch.int64


def test_raters_strict_and_degenerate():
    # mean = 0.25 exactly: the two entries equal to the mean are not raters
    assert raters_from_relevance(torch.tensor([0.375, 0.25, 0.25, 0.125])).tolist() == [0]
    # nothing strictly above the mean: every text token rates
    assert raters_from_relevance(torch.full((5,), 0.2)).tolist() == [0, 1, 2, 3, 4]
    same = torch.ones(3, 4)
    assert select_raters(torch.randn(5, 4), same).tolist() == [0, 1, 2]
    assert select_raters(torch.randn(5, 4), torch.randn(1, 4)).tolist() == [0]
    with pytest.raises(InputError, match="text after the image"):
        select_raters(torch.randn(5, 4), torch.zeros(0, 4))
    with pytest.raises(InputError, match="hidden size"):
        select_raters(torch.randn(5, 4), torch.randn(2, 3))


# --- §2.2 / §7 significance ---------------------------------------------------------------------


def test_significance_hand_computation():
    g = torch.Generator().manual_seed(2)
    attn = torch.softmax(torch.randn(4, 3, 10, generator=g), dim=-1)
    cols = torch.tensor([2, 3, 4, 5, 6])
    s = significance(attn, cols)
    expected = torch.tensor(
        [sum(float(attn[h, r, c]) for h in range(4) for r in range(3)) / 12 for c in cols.tolist()]
    )
    assert s.dtype == torch.float32 and s.shape == (5,)
    assert torch.allclose(s, expected, atol=1e-7)
    assert torch.allclose(significance(attn[:, :, 2:7]), s)
    assert torch.allclose(significance(attn.double(), cols), s)  # fp32 maths whatever the input


def test_significance_priority_heads():
    attn = torch.full((4, 2, 6), 0.01)
    attn[1, :, 3] = 0.5
    attn[3, :, 4] = 0.4
    attn[2, :, 0] = 0.9  # mass outside the visual columns does not count
    cols = torch.tensor([2, 3, 4, 5])
    s = significance(attn, cols, heads=2)
    assert torch.allclose(s, attn[[1, 3]][:, :, cols].mean(dim=(0, 1)))
    assert select_heads(attn[:, :, cols], 2).tolist() == [1, 3]
    assert torch.allclose(significance(attn, cols, heads=0.5), s)  # half of 4 heads
    assert torch.allclose(significance(attn, cols, heads=100), significance(attn, cols))  # clipped to H
    assert torch.allclose(significance(attn, cols, heads=1.0), significance(attn, cols))
    # equal masses: the smaller head index wins
    flat = torch.full((3, 2, 4), 0.25)
    flat[2] = 0.1
    assert torch.allclose(significance(flat, heads=1), flat[0].mean(0))
    assert head_count(None, 28) == 28 and head_count(14, 28) == 14 and head_count(0.25, 28) == 7
    for bad in (0, -1, 1.5, 0.0, True, "14"):
        with pytest.raises(InputError):
            head_count(bad, 28)


def test_significance_gravity_correction_then_head_selection():
    attn = torch.zeros(2, 1, 2)
    attn[0, 0] = torch.tensor([0.6, 0.0])  # head 0 looks at the near token (large kernel)
    attn[1, 0] = torch.tensor([0.0, 0.5])  # head 1 looks at the far token (small kernel)
    gravity = torch.tensor([[6.0, 2.0]])
    assert torch.allclose(significance(attn, heads=1), attn[0, 0])  # raw: head 0 has more mass
    corrected = significance(attn, heads=1, gravity=gravity)  # corrected: 0.1 vs 0.25 → head 1
    assert torch.allclose(corrected, torch.tensor([0.0, 0.25]))
    # the floor: never divide by less than gravity_floor (the raw kernel can be <= 0)
    bad = torch.tensor([[-0.5, 0.2]])
    s = significance(attn, gravity=bad, gravity_floor=1.0)
    assert torch.isfinite(s).all() and torch.allclose(s, attn.mean(dim=(0, 1)))
    assert torch.allclose(significance(attn, gravity=bad, gravity_floor=0.5), attn.mean(dim=(0, 1)) / 0.5)
    with pytest.raises(InputError, match="gravity must be"):
        significance(attn, gravity=torch.ones(2, 2))
    with pytest.raises(InputError, match="gravity_floor"):
        significance(attn, gravity=gravity, gravity_floor=0.0)
    with pytest.raises(InputError, match="visual_cols"):
        significance(attn, torch.tensor([5]))
    with pytest.raises(InputError, match=r"\[H, R, Lk\]"):
        significance(attn[0])


# --- §7.1 RoPE gravity --------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _ones_rope_kernel(cos_r, sin_r, cos_c, sin_c, d):
    """All-ones q and k, rotated with the HF rotate_half layout, then q·kᵀ/√d (the reference build)."""
    q = torch.ones(cos_r.shape[0], d, dtype=torch.float64)
    k = torch.ones(cos_c.shape[0], d, dtype=torch.float64)
    q = q * cos_r + _rotate_half(q) * sin_r
    k = k * cos_c + _rotate_half(k) * sin_c
    return q @ k.T / math.sqrt(d)


def test_rope_gravity_spec_values():
    values = {0: 11.31, 10: 7.57, 100: 5.40, 300: 3.47, 600: 2.35}
    rows = torch.tensor([1000.0])
    cols = torch.tensor([1000.0 - dv for dv in values])
    got = rope_gravity(rows, cols, 128)
    assert got.shape == (1, 5) and got.dtype == torch.float32
    assert torch.allclose(got[0], torch.tensor(list(values.values())), atol=0.005)
    # depends on the difference only, symmetric, and goes negative on long contexts (the hazard)
    assert torch.allclose(rope_gravity(torch.tensor([5.0]), torch.tensor([15.0]), 128), got[:, 1:2])
    assert float(rope_gravity(torch.tensor([2629.0]), torch.tensor([0.0]), 128)) == pytest.approx(-0.82, abs=0.01)


def test_rope_gravity_equals_all_ones_rope_build():
    d = 16
    pos_r, pos_c = torch.tensor([40.0, 41.0, 47.0]), torch.arange(0.0, 30.0)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)

    def cs(p):
        f = torch.cat([p[:, None].double() * inv] * 2, dim=-1)
        return f.cos(), f.sin()

    ref = _ones_rope_kernel(*cs(pos_r), *cs(pos_c), d)
    assert torch.allclose(rope_gravity(pos_r, pos_c, d).double(), ref, atol=1e-5)
    # the model's own frequencies and amplitude
    got = rope_gravity(pos_r, pos_c, d, inv_freq=inv * 0.5, attention_scaling=1.2)
    f_r = torch.cat([pos_r[:, None].double() * inv * 0.5] * 2, -1)
    f_c = torch.cat([pos_c[:, None].double() * inv * 0.5] * 2, -1)
    ref2 = _ones_rope_kernel(1.2 * f_r.cos(), 1.2 * f_r.sin(), 1.2 * f_c.cos(), 1.2 * f_c.sin(), d)
    assert torch.allclose(got.double(), ref2, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gravity_mrope_sectionwise(interleaved):
    d, section = 24, [4, 4, 4]
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 50, (3, 4), generator=g).double()
    cols = torch.randint(0, 50, (3, 9), generator=g).double()
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    axis = mrope_axes(section, interleaved)

    def cs(p):  # cos/sin laid out like the M-RoPE rotary embedding: each frequency from its axis
        f = torch.stack([p[a] for a in axis.tolist()], dim=-1) * inv
        f = torch.cat([f, f], dim=-1)
        return f.cos(), f.sin()

    ref = _ones_rope_kernel(*cs(rows), *cs(cols), d)
    got = rope_gravity(rows, cols, d, mrope_section=section, mrope_interleaved=interleaved)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    # text rows (equal ids on every axis) can be passed 1-D
    same = rope_gravity(rows[0], cols, d, mrope_section=section, mrope_interleaved=interleaved)
    assert torch.allclose(same, rope_gravity(rows[0].expand(3, -1), cols, d, mrope_section=section, mrope_interleaved=interleaved))


def test_mrope_axes_layouts():
    assert mrope_axes([1, 2, 2]).tolist() == [0, 1, 1, 2, 2]
    assert mrope_axes([2, 2, 2], interleaved=True).tolist() == [0, 1, 2, 0, 1, 2]
    assert mrope_axes([3, 1, 1], interleaved=True).tolist() == [0, 1, 2, 0, 0]
    with pytest.raises(InputError, match="sum to"):
        rope_gravity(torch.zeros(3, 1), torch.zeros(3, 1), 24, mrope_section=[4, 4, 5])
    with pytest.raises(InputError, match="position ids"):
        rope_gravity(torch.zeros(3, 1), torch.zeros(1), 24)


# --- §3.2 rank budget ---------------------------------------------------------------------------


def test_rank_keep_rank_deficient():
    g = torch.Generator().manual_seed(4)
    P = torch.rand(6, 2, generator=g) @ torch.rand(2, 20, generator=g)  # rank 2, V = 20
    assert rank_keep(P) == 2  # paper, lam = 1: keep exactly the rank
    assert rank_keep(P, lam=0.5) == 20 - 9
    assert rank_keep(P, form="v1code", scale=3.0, bias=1.0) == 7
    assert rank_keep(P, form="v1code", scale=100.0) == 19  # clipped to V - 1
    assert rank_keep(P, form="v1code", scale=0.0) == 1  # clipped to 1
    assert rank_keep(P, lam=0.0) == 20  # nothing to delete: the layer is skipped
    assert rank_keep(P, lam=0.0, skip=False) == 19
    full = torch.rand(5, 4, generator=g)  # full column rank
    assert rank_keep(full) == 4 and rank_keep(full, form="v1code", scale=13.5) == 4
    assert rank_keep(full, skip=False) == 3
    with pytest.raises(InputError, match="rank form"):
        rank_keep(P, form="svd")


# --- §4 recycling -------------------------------------------------------------------------------


def _blobs(seed: int = 5):
    """90 pruned tokens: 28 significant ones in three far-apart blobs, 62 insignificant elsewhere."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    centres = torch.zeros(3, D)
    centres[0, 0], centres[1, 1], centres[2, 2] = 50.0, 50.0, 50.0
    sizes = (12, 9, 7)
    members = torch.tensor([b for b, n in enumerate(sizes) for _ in range(n)])
    hidden = torch.empty(90, D)
    scores = torch.empty(90)
    slots = torch.randperm(90, generator=g)
    sig, rest = slots[:28], slots[28:]
    hidden[sig] = centres[members] + 0.3 * torch.randn(28, D, generator=g)
    scores[sig] = 1.0 + torch.rand(28, generator=g)
    hidden[rest] = -50.0 + torch.randn(62, D, generator=g)
    scores[rest] = torch.rand(62, generator=g) * 0.5
    return hidden, scores, sig, members


def test_recycle_three_blobs():
    hidden, scores, sig, members = _blobs()
    assert recycle_counts(90) == (28, 3)
    merged, centre = recycle(hidden, scores)
    assert merged.shape == (3, 8) and centre.dtype == torch.int64
    blob_of = {int(i): int(b) for i, b in zip(sig, members)}
    found = [blob_of[int(c)] for c in centre]  # every centre is a significant token ...
    assert sorted(found) == [0, 1, 2]  # ... one per blob
    for row, b in zip(merged, found):
        assert torch.allclose(row, hidden[sig[members == b]].mean(0), atol=1e-5)
    merged_sum, centre_sum = recycle(hidden, scores, merge="sum")
    assert torch.equal(centre_sum, centre)
    for row, b in zip(merged_sum, found):
        assert torch.allclose(row, hidden[sig[members == b]].sum(0), atol=1e-4)
    again, centre_again = recycle(hidden, scores)
    assert torch.equal(again, merged) and torch.equal(centre_again, centre)  # deterministic
    seeded = recycle(hidden, scores, seed=7)
    assert torch.equal(seeded[1], recycle(hidden, scores, seed=7)[1])
    assert sorted(blob_of[int(c)] for c in seeded[1]) == [0, 1, 2]
    assert recycle(hidden.double(), scores)[0].dtype == torch.float64


def test_recycle_ties_resolve_by_position():
    hidden = torch.ones(40, 4)  # identical tokens: every density, delta and gamma ties
    scores = torch.zeros(40)
    merged, centre = recycle(hidden, scores)
    n1, c = recycle_counts(40)
    assert (n1, c) == (13, 2)
    assert centre.tolist() == [0, 1]  # candidates are the first 13 by index; centres the first two
    assert torch.allclose(merged, torch.ones(2, 4))


def test_dpc_knn_cluster_order_and_empty_input():
    # worked by hand with k = c = 3: densities .983/.983/.983 | .805/.761 | .547 (0 ties 2, so the
    # smaller index counts as denser); gamma = delta*rho: 1.97 (point 1, delta = max D = 2),
    # .644 (point 3, delta .8), .49 (point 5, delta .9), the rest <= .1
    x = torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1], [2.0]])
    centres, assign = dpc_knn(x, 3)
    assert centres.tolist() == [1, 3, 5]  # cluster ids follow descending gamma
    assert assign.tolist() == [0, 0, 0, 1, 1, 2]
    merged, centre = recycle(torch.zeros(0, 5), torch.zeros(0))
    assert merged.shape == (0, 5) and centre.shape == (0,)
    with pytest.raises(InputError, match="scores"):
        recycle(torch.zeros(3, 5), torch.zeros(2))
    with pytest.raises(InputError, match="merge"):
        recycle(torch.zeros(3, 5), torch.zeros(3), merge="max")
    with pytest.raises(InputError, match="tau"):
        recycle_counts(5, tau=0.0)


# --- §3.3 ratio budget --------------------------------------------------------------------------


def test_ratio_worked_example_qwen2_28_layers():
    V0 = 6272  # LLaVA-OV, 32 frames x 196
    alpha, sched = solve_ratio(0.25, V0, 28, recycle=False)
    assert alpha == pytest.approx(0.650, abs=0.002)
    assert list(sched) == [2, 6, 15]
    for keep, frac in zip(sched.values(), (0.339, 0.226, 0.124)):
        assert keep / V0 == pytest.approx(frac, abs=0.002)
    assert simulate_schedule(V0, 28, sched, recycle=False)["e_out"] == pytest.approx(0.25 * V0, abs=0.5)
    assert ratio_schedule(0.25, V0, 28, recycle=False) == sched


@pytest.mark.parametrize("recycle_on", [True, False])
@pytest.mark.parametrize("V0,L", [(576, 32), (576, 28), (6272, 28), (729, 24), (100, 16)])
def test_ratio_schedule_hits_target(recycle_on, V0, L):
    for rho in (0.2, 0.25, 1 / 3, 0.5, 0.75):
        sched = ratio_schedule(rho, V0, L, recycle=recycle_on)
        sim = simulate_schedule(V0, L, sched, recycle=recycle_on)
        keeps = list(sched.values())
        assert keeps == sorted(keeps, reverse=True) and keeps[-1] >= 1
        for layer, k in sched.items():
            assert k == sim["kept"][layer] and k <= sim["v_in"][layer] - 1
        assert sim["e_out"] == pytest.approx(rho * V0, abs=2.0)


def test_ratio_schedule_edges():
    assert ratio_schedule(1.0, 576, 32) == {}
    # below what one token per stage gives: alpha = 0; without recycling one token is left
    # after layer 2 and the later stages cannot prune
    assert ratio_schedule(0.01, 576, 32, recycle=False) == {2: 1}
    assert ratio_schedule(0.01, 576, 32) == {2: 1, 6: 1, 15: 1}
    sched = ratio_schedule(0.25, 576, 32, equivalent="input")
    assert simulate_schedule(576, 32, sched)["e_in"] == pytest.approx(144, abs=2.0)
    four = ratio_schedule(0.25, 576, 32, layers=(2, 6, 15, 19), shape=(0.5, 0.35, 0.2, 0.1))
    assert list(four) == [2, 6, 15, 19]
    with pytest.raises(InputError, match="shape"):
        ratio_schedule(0.25, 576, 32, layers=(2, 6, 15, 19))
    with pytest.raises(InputError, match="past the language model's depth"):
        ratio_schedule(0.25, 576, 12)
    with pytest.raises(InputError, match="retain"):
        ratio_schedule(0.0, 576, 32)


# --- schedule errors ----------------------------------------------------------------------------


def test_check_schedule_errors():
    assert check_schedule({15: 110, 2: 300, 6: 200}, 576, 32) == {2: 300, 6: 200, 15: 110}
    assert check_schedule({2: 300, 6: 300}, 576, 32) == {2: 300, 6: 300}  # equal is allowed
    with pytest.raises(InputError, match=r"past the language model's depth \(16 layers, indices 0\.\.15\)"):
        check_schedule({2: 300, 16: 110}, 576, 16)
    with pytest.raises(InputError, match="non-negative integers"):
        check_schedule({-1: 5}, 576, 32)
    with pytest.raises(InputError, match="must not increase"):
        check_schedule({2: 100, 6: 200}, 576, 32)
    with pytest.raises(InputError, match="schedule longer than the sequence"):
        check_schedule(schedule_for("v1.5", 192), 256, 32)
    with pytest.raises(InputError, match="int >= 1"):
        check_schedule({2: 0}, 576, 32)
    with pytest.raises(InputError, match="int >= 1"):
        check_schedule({2: 1.5}, 576, 32)
    with pytest.raises(InputError):
        simulate_schedule(576, 15, schedule_for("v1.5", 192))


def test_simulate_small_and_no_recycling_floor():
    sim = simulate_schedule(3, 4, {0: 2, 1: 1, 2: 1}, recycle=False)
    assert sim["v_out"] == [2, 1, 1, 1] and sim["kept"] == {0: 2, 1: 1}  # V = 1 cannot prune
    sim = simulate_schedule(10, 3, {1: 10})
    assert sim["kept"] == {1: 9} and sim["v_out"] == [10, 10, 10]  # 9 kept + 1 recycled


# --- options ------------------------------------------------------------------------------------


def test_options_variant_defaults_and_plan():
    v15 = SparseVLMOptions()
    assert (v15.recycle, v15.variant_positions, v15.gravity_correction, v15.priority_heads) == (True, "compact", False, None)
    assert v15.plan(576, 32) == {2: 300, 6: 200, 15: 110}
    v2 = SparseVLMOptions(variant="v2.0", target=128)
    assert (v2.recycle, v2.variant_positions, v2.gravity_correction, v2.priority_heads) == (False, "preserve", True, 14)
    assert v2.plan(576, 32) == {2: 238, 6: 108, 15: 60}
    v10 = SparseVLMOptions(variant="v1.0", target=128)
    assert v10.budget == "rank" and v10.pruning_layers == (2, 6, 15, 19) and (v10.scale, v10.bias) == (9.0, 6.0)
    assert v10.plan(576, 32) is None
    ratio = SparseVLMOptions(budget="ratio")
    assert ratio.plan(6272, 28, retain=0.25) == ratio_schedule(0.25, 6272, 28)
    with pytest.raises(InputError, match="positions"):  # one name, one meaning: compress(positions=...)
        methods.get("sparsevlm").create(positions="original")
    with pytest.raises(InputError, match="schedule longer than the sequence"):
        v15.plan(200, 32)
    with pytest.raises(InputError, match="past the language model's depth"):
        v15.plan(576, 12)
    for bad in ({"variant": "v3"}, {"budget": "fixed"}, {"target": 100}, {"priority_heads": 0}, {"recycle_merge": "max"}):
        with pytest.raises(InputError):
            SparseVLMOptions(**bad)


def test_ratio_budget_below_the_reachable_minimum_is_an_error() -> None:
    """With E_in accounting the layers up to the first pruning layer see every visual token: on
    16 layers with pruning layers (1, 3, 8) even one token per stage leaves E_in ≈ 2/16 of V0,
    so retain 0.1 is refused (not run as a schedule of single tokens); 0.15 runs, and E_out reaches 0.1."""
    from tokensieve.errors import InputError
    from tokensieve.methods.sparsevlm import SparseVLM, simulate_schedule

    method = SparseVLM(pruning_layers=(1, 3, 8))
    with pytest.raises(InputError, match=r"retain=0.1 is not above the minimum .*16 layers"):
        method.plan(256, 16, 0.1)
    points = method.plan(256, 16, 0.15)
    sim = simulate_schedule(256, 16, {p.layer: p.keep for p in points})
    assert abs(sim["e_in"] / 256 - 0.15) < 0.02
    output = SparseVLM(pruning_layers=(1, 3, 8), equivalent="output")
    points = output.plan(256, 16, 0.1)
    sim = simulate_schedule(256, 16, {p.layer: p.keep for p in points})
    assert abs(sim["e_out"] / 256 - 0.1) < 0.02
