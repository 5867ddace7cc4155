"""Token merging inside the vision tower (``specs/encoder.md`` E1, mode M1).

The reference never merges: it keeps every original token and, after each merging step, writes
the size-weighted mean of a group into all of its members. Attention over such duplicated
tokens is, by definition, ToMe's proportional attention (a token of size ``s`` counts ``s``
times), so running the *unpatched* block sub-modules on the full grid, with the matching worked
out again from the paper's definition in plain loops, must give the patched tower's unmerged
output.
"""

from __future__ import annotations

import pytest
import torch
from _builders import build, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.errors import InputError
from tokensieve.methods.tome import MergeSpec, MergeState, bipartite_merge, merge_schedule, unmerge

N_NEW = 4


@settings(max_examples=300, deadline=None)
@given(n0=st.integers(1, 800), keep_frac=st.floats(0.0, 1.0), layers=st.integers(1, 30),
       policy=st.sampled_from(["even", "early"]))
def test_schedule_merges_exactly_down_to_the_count(n0, keep_frac, layers, policy):
    keep = max(1, min(n0, round(keep_frac * n0)))
    try:
        rs = merge_schedule(n0, keep, layers, policy)
    except InputError:  # only when halving in every block cannot get there
        assert n0 > keep * 2**layers
        return
    assert len(rs) == layers and sum(rs) == n0 - keep
    n = n0
    for r in rs:
        assert 0 <= r <= n // 2
        n -= r


def test_schedule_is_even_with_the_remainder_first():
    assert merge_schedule(729, 182, 26) == [22] * 1 + [21] * 25
    assert merge_schedule(10, 2, 3) == [3, 3, 2]
    assert merge_schedule(729, 182, 26, "early") == [364, 182, 1] + [0] * 23  # halve until the count
    with pytest.raises(InputError, match="cannot merge"):
        merge_schedule(64, 16, 1)
    assert merge_schedule(14, 2, 4) == [3, 3, 4, 2]  # the even 3, 3, 3, 3 would leave 5 for the last block
    with pytest.raises(InputError, match="cannot merge"):
        merge_schedule(17, 2, 3)


@settings(max_examples=100, deadline=None)
@given(B=st.integers(1, 3), n=st.integers(2, 40), data=st.data())
def test_merge_conserves_size_and_mass_and_unmerges_to_groups(B, n, data):
    r = data.draw(st.integers(0, n // 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    x = torch.randn(B, n, 5, generator=g, dtype=torch.float64)
    metric = torch.randn(B, n, 3, generator=g)
    state = MergeState.start(B, n)
    state.sizes = torch.randint(1, 4, (B, n), generator=g).float()  # as after earlier merges
    y, new = bipartite_merge(x, metric, state, r)
    assert y.shape == (B, n - r, 5) and new.sizes.shape == (B, n - r)
    assert torch.equal(new.sizes.sum(1), state.sizes.sum(1))
    torch.testing.assert_close((y * new.sizes[..., None].double()).sum(1),
                               (x * state.sizes[..., None].double()).sum(1))
    if r == 0:
        assert y is x
    back = unmerge(y, new)
    assert back.shape == (B, n, 5)
    for b in range(B):  # every original token sits in exactly one group, whose vector it takes
        groups = new.group[b]
        assert int(groups.max()) == n - r - 1 and torch.unique(groups).numel() == n - r
        for j in range(n - r):
            members = (groups == j).nonzero().flatten()
            assert float(new.sizes[b, j]) == float(state.sizes[b, members].sum())


def test_identical_tokens_merge_into_the_first_partner_deterministically():
    x = torch.ones(1, 6, 2)
    y, st_ = bipartite_merge(x, torch.ones(1, 6, 2), MergeState.start(1, 6), 2)
    # A = places 0, 2, 4; all equally similar to B = 1, 3, 5: the first two A (0, 2) merge into 1
    assert st_.group.tolist() == [[0, 0, 0, 1, 2, 3]] and st_.sizes.tolist() == [[3.0, 1.0, 1.0, 1.0]]
    assert torch.equal(y, torch.ones(1, 4, 2))


def test_log_size_bias_equals_attending_to_copies():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
    sizes = torch.tensor([1.0, 3.0, 2.0, 1.0])
    biased = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sizes.log()[None, None, None])
    rep = torch.tensor([0, 1, 1, 1, 2, 2, 3])
    copies = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep])
    torch.testing.assert_close(biased, copies)


# --- the tower -----------------------------------------------------------------------------------


def _encoder(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder


@torch.no_grad()
def _reference_tower(encoder, x: torch.Tensor, spec: MergeSpec, last: int) -> torch.Tensor:
    """The merged tower by duplication, from the definition, with the unpatched sub-modules."""
    blocks = list(encoder.layers)
    B, n0, D = x.shape
    heads = blocks[0].self_attn.num_heads
    # per item: groups as (representative original index, member indices), in current order
    groups = [[(i, [i]) for i in range(n0)] for _ in range(B)]
    rs = spec.schedule(n0, last + 1)
    for li in range(last + 1):
        blk = blocks[li]
        h = blk.layer_norm1(x)
        attn, _ = blk.self_attn(hidden_states=h, attention_mask=None)
        x = x + attn
        if li >= spec.start and rs[li - spec.start]:
            r = rs[li - spec.start]
            keys = blk.self_attn.k_proj(h).view(B, n0, heads, -1).mean(2)
            for b in range(B):
                cur = sorted(groups[b])
                A, Bs = cur[0::2], cur[1::2]
                unit = [torch.nn.functional.normalize(keys[b, rep].float(), dim=0) for rep, _ in cur]
                best = []
                for ai in range(len(A)):
                    sims = [float(unit[2 * ai] @ unit[2 * bi + 1]) for bi in range(len(Bs))]
                    top = max(sims)
                    best.append((-top, ai, sims.index(top)))  # most similar first; ties: smaller a, then b
                merged = sorted(best)[:r]
                absorb = {bi: [] for bi in range(len(Bs))}
                for _, ai, bi in merged:
                    absorb[bi].append(ai)
                gone = {ai for _, ai, _ in merged}
                new = [A[ai] for ai in range(len(A)) if ai not in gone]
                for bi, (rep, members) in enumerate(Bs):
                    members = members + [m for ai in absorb[bi] for m in A[ai][1]]
                    new.append((rep, sorted(members)))
                groups[b] = new
                for _, members in new:  # duplicates: every member holds the group's mean
                    x[b, members] = x[b, members].mean(0)
        x = x + blk.mlp(blk.layer_norm2(x))
    return x


@pytest.mark.parametrize("keep,start,schedule", [(0.5, 0, "even"), (0.3, 0, "even"), (0.6, 1, "even"),
                                                 (0.3, 0, "early")])
def test_merged_tower_equals_duplication_through_the_unpatched_blocks(keep, start, schedule):
    model = _deep_tower_llava()
    encoder = _encoder(model)
    layout = tokensieve.models.get_adapter(model).tower_layout(model)
    if layout.last < start:
        pytest.skip("tiny tower too shallow")
    x = torch.randn(3, layout.tokens, encoder.layers[0].layer_norm1.normalized_shape[0],
                    generator=torch.Generator().manual_seed(3))
    spec = MergeSpec(keep=keep, start=start, schedule_policy=schedule)
    want = _reference_tower(encoder, x.clone(), spec, layout.last)
    from tokensieve.runtime.tower import TowerMerge

    merge = TowerMerge(layout, spec)
    try:
        with torch.no_grad():
            got = x
            for blk in list(encoder.layers)[: layout.last + 1]:
                got = blk(got, None)
    finally:
        merge.remove()
    assert merge.merged_counts[-1] == spec.tokens_left(layout.tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # unpatched again: the blocks are the original ones
    with torch.no_grad():
        plain = x
        for blk in list(encoder.layers)[: layout.last + 1]:
            plain = blk(plain, None)
    assert not torch.allclose(plain, got)


@pytest.fixture(scope="module")
def llava():
    return build("llava-onevision", layers=2)


def _deep_tower_llava():
    """A LLaVA-OneVision whose tiny tower has 3 blocks, so merging has room."""
    from transformers import LlavaOnevisionForConditionalGeneration

    base = build("llava-onevision")
    cfg = base.config
    cfg.vision_config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config = base.generation_config
    return model


def test_merge_everything_kept_is_bit_identical_and_counts_follow_the_schedule():
    model = _deep_tower_llava()
    kw = make_batch(model, "llava-onevision", [[("video", None)], [("image", (40, 60)), ("video", None)]], frames=4)
    with torch.no_grad():
        base = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)
    with tokensieve.compress(model, "vidcom2", retain=1.0, encoder_merge=1.0):
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    assert torch.equal(out.sequences, base.sequences)
    for got, want in zip(out.logits, base.logits):
        assert torch.equal(got, want)
    layout = tokensieve.models.get_adapter(model).tower_layout(model)
    spec = MergeSpec(keep=0.25)
    with tokensieve.compress(model, "vidcom2", retain=0.25, encoder_merge=0.25):
        with torch.no_grad():
            merged = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                                    output_logits=True)
        st_ = tokensieve.stats(model)
    n, expected = layout.tokens, []
    for r in spec.schedule(layout.tokens, layout.last + 1):
        n -= r
        expected.append(n)
    assert st_.encoder_tokens == expected and expected[-1] == round(0.25 * layout.tokens)
    for row in st_.segments:  # the language-model side is unchanged: the method's exact budget
        for s in row:
            assert s.tokens_after == max(s.grid[0], round(0.25 * s.tokens_before))
    assert not torch.equal(merged.logits[0], base.logits[0])
    # restore brings back the exact tower
    with torch.no_grad():
        again = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    for got, want in zip(again.logits, base.logits):
        assert torch.equal(got, want)
    assert all("forward" not in blk.__dict__ for blk in _encoder(model).layers)


def test_merging_composes_with_the_frame_stage(llava):
    kw = make_batch(llava, "llava-onevision", [[("video", None)], [("video", None)]], frames=8)
    with tokensieve.compress(llava, "keyframes", retain=0.25, encoder_merge=0.5):
        with torch.no_grad():
            llava(**kw)
        st_ = tokensieve.stats(llava)
    assert st_.encoder_tokens[-1] == 32
    for row in st_.segments:
        assert row[0].tokens_after == 32 and len(row[0].frames_encoded) == 2


def test_merge_refusals_leave_the_model_unpatched(llava):
    qwen = build("qwen2-vl")
    cases = [
        (llava, {"encoder_merge": 0.0}, "encoder_merge must be a number"),
        (llava, {"encoder_merge": 1.5}, "encoder_merge must be a number"),
        (llava, {"encoder_merge": 0.1}, "cannot merge"),
        (llava, {"encoder_merge": 0.5, "encoder_merge_start": 5}, "past the block"),
        (llava, {"encoder_merge_start": 0}, "needs encoder_merge"),
        (llava, {"encoder_merge": 0.5, "encoder_merge_schedule": "late"}, "encoder_merge_schedule must be one of"),
        (qwen, {"encoder_merge": 0.5}, "LLaVA-OneVision's SigLIP tower only"),
    ]
    for model, options, message in cases:
        with pytest.raises(InputError, match=message):
            tokensieve.compress(model, "vidcom2", retain=0.5, **options)
        assert not tokensieve.is_compressed(model)
    assert all("forward" not in blk.__dict__ for blk in _encoder(llava).layers)
    tower_cfg = llava.model.vision_tower.config
    saved = tower_cfg._attn_implementation
    tower_cfg._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(InputError, match="eager or sdpa"):
            tokensieve.compress(llava, "vidcom2", retain=0.5, encoder_merge=0.5)
    finally:
        tower_cfg._attn_implementation = saved
    assert not tokensieve.is_compressed(llava)


def test_a_deep_copy_merges_on_its_own_tower():
    import copy

    model = _deep_tower_llava()
    kw = make_batch(model, "llava-onevision", [[("video", None)]], frames=4)
    with tokensieve.compress(model, "vidcom2", retain=0.25, encoder_merge=0.5, encoder_merge_schedule="early"):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            want = model(**kw).logits
            got = twin(**kw).logits
        assert tokensieve.stats(twin).encoder_tokens == tokensieve.stats(model).encoder_tokens
    torch.testing.assert_close(got, want)
    tokensieve.restore(twin)
    assert all("forward" not in blk.__dict__ for blk in _encoder(twin).layers)
