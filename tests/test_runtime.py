"""Runtime invariants of DESIGN.md (1–6) on tiny random models of every adapter.

The by-hand reference: capture what the *unpatched* model feeds its language model, gather
the kept positions (from ``tokensieve.stats``) independently of the runtime, and decode with
the unpatched language model step by step.
"""

from __future__ import annotations

import pytest
import torch
from _builders import (
    ARCHS,
    IMAGE,
    INTERNVL_TILE,
    MROPE_ARCHS,
    VIDEO,
    apply_replaced,
    build,
    capture_lm_inputs,
    full_positions_1d,
    gather_by_hand,
    gather_deepstack,
    make_batch,
    reference_greedy,
)

import tokensieve
from tokensieve.methods import VidCom2

N_NEW = 5


def samples_for(arch: str, batch: int):
    image = ("image", (40, 60)) if arch == "llava-onevision" else ("image", (4, 6))
    image2 = ("image", (32, 32)) if arch == "llava-onevision" else ("image", (6, 4))
    if batch == 1:
        return [[image, ("video", None)]]
    return [[("video", None)], [image, ("video", None)], [("video", None), image2]]


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(arch: str, attn: str):
        if (arch, attn) not in cache:
            cache[(arch, attn)] = build(arch, attn)
        return cache[(arch, attn)]

    return get


def greedy(model, kw, **extra):
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, **extra)


@pytest.mark.parametrize("method", ["vidcom2", "lftr", "visionzip", "dycoke", "random", "uniform", "flashvid", "fastvid", "holitom"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_retain_one_is_token_identical(models, arch, attn, batch, method):
    model = models(arch, attn)
    kw = make_batch(model, arch, samples_for(arch, batch))
    base = greedy(model, kw, return_dict_in_generate=True, output_logits=True)
    with tokensieve.compress(model, method, retain=1.0):
        out = greedy(model, kw, return_dict_in_generate=True, output_logits=True)
        st = tokensieve.stats(model)
    assert st.tokens_after == st.tokens_before
    assert torch.equal(out.sequences, base.sequences)
    for got, want in zip(out.logits, base.logits):  # bit-identical, not just the same argmax
        assert torch.equal(got, want)
    assert not tokensieve.is_compressed(model)


METHODS = {
    "vidcom2": ("vidcom2", {}),
    "random": ("random", {}),
    "uniform-fca": ("uniform", {"budget": "fca"}),
    "lftr-sim-text": ("lftr", {}),
    "lftr-diff-topic-fca": ("lftr", {"temporal": "differential", "spatial": "topic", "budget": "fca"}),
    "lftr-merge": ("lftr", {"spatial_op": "merge"}),
    "visionzip": ("visionzip", {}),
    "dycoke": ("dycoke", {"ttm_op": "average_into_anchor"}),
    "flashvid": ("flashvid", {}),
    "flashvid-qwen-fca-encoder": ("flashvid", {"adts": "v1", "min_segments": 4, "budget": "fca", "attention": "encoder"}),
    "fastvid": ("fastvid", {}),
    "fastvid-ov-reference-fca-encoder": ("fastvid", {"merge": "onevision", "sources": "reference", "budget": "fca",
                                                     "attention": "encoder"}),
    "holitom": ("holitom", {"tau": 0.0}),  # random tiny features are rarely static: a low tau makes windows
}


# pre-LLM selections reach the language model through one runtime path, which vidcom2, lftr,
# visionzip and dycoke (merged features) exercise on both kernels: one kernel is enough for the rest
ONE_KERNEL = ("random", "uniform-fca", "flashvid", "flashvid-qwen-fca-encoder", "fastvid",
              "fastvid-ov-reference-fca-encoder", "holitom")
CASES = [(arch, attn, batch, method) for arch in ARCHS for attn in ("eager", "sdpa") for batch in (1, 3)
         for method in METHODS if not (method in ONE_KERNEL and attn == "eager")]


@pytest.mark.parametrize("arch,attn,batch,method", CASES)
def test_pruned_matches_reference(models, arch, attn, batch, method):
    name, options = METHODS[method]
    model = models(arch, attn)
    mrope = arch in MROPE_ARCHS
    kw = make_batch(model, arch, samples_for(arch, batch))
    seen = capture_lm_inputs(model, kw)
    full_embeds = seen["inputs_embeds"]
    full_pos = seen["position_ids"] if mrope else full_positions_1d(kw["attention_mask"])
    with tokensieve.compress(model, name, retain=0.25, **options) as handle:
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        st = tokensieve.stats(model)
        with torch.no_grad():
            logits = model(**kw).logits
    positions = handle.positions
    assert positions == tokensieve.methods.get(name).positions_for("mrope" if mrope else "1d")
    assert st.tokens_after < st.tokens_before
    if name != "dycoke":  # DyCoke keeps every 4th frame whole: its own count (see its docs)
        for row in st.segments:
            for seg in row:
                assert seg.tokens_after == max(seg.grid[0], round(0.25 * seg.tokens_before))
    if name in ("lftr", "dycoke") or options.get("spatial_op") == "merge":
        assert any(st.replaced[b] for b in range(len(st.replaced))), "merging methods replace features"
    ids = kw["input_ids"]
    for b in range(ids.shape[0]):  # every non-visual token survives (only content tokens compete)
        visual = (ids[b] == VIDEO) | (ids[b] == IMAGE)
        text = (kw["attention_mask"][b].bool() & ~visual).nonzero(as_tuple=True)[0]
        assert bool(torch.isin(text, st.keep[b]).all()), f"sample {b} lost a text token"
    emb, mask, pos = gather_by_hand(full_embeds, full_pos, kw["attention_mask"], st.keep, positions, mrope)
    emb = apply_replaced(emb, st, st.keep)
    extras = gather_deepstack(seen, st.keep, mask.shape[1])
    ref_tokens, ref_prefill, ref_steps = reference_greedy(model, emb, mask, pos, N_NEW, mrope, extras)
    L = kw["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :L], kw["input_ids"])
    assert torch.equal(out.sequences[:, L:], ref_tokens)
    valid = mask.bool()
    assert logits.shape[:2] == mask.shape
    torch.testing.assert_close(logits[valid], ref_prefill[valid], rtol=1e-4, atol=1e-5)
    for got, want in zip(out.logits, ref_steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("arch", ARCHS)
def test_position_modes_match_reference(models, arch, positions):
    model = models(arch, "sdpa")
    mrope = arch in MROPE_ARCHS
    kw = make_batch(model, arch, samples_for(arch, 3))
    seen = capture_lm_inputs(model, kw)
    full_pos = seen["position_ids"] if mrope else full_positions_1d(kw["attention_mask"])
    with tokensieve.compress(model, "vidcom2", retain=0.25, positions=positions):
        gen = greedy(model, kw, return_dict_in_generate=True, output_logits=True)
        out = gen.sequences
        st = tokensieve.stats(model)
    emb, mask, pos = gather_by_hand(seen["inputs_embeds"], full_pos, kw["attention_mask"], st.keep, positions, mrope)
    extras = gather_deepstack(seen, st.keep, mask.shape[1])
    ref_tokens, ref_prefill, ref_steps = reference_greedy(model, emb, mask, pos, N_NEW, mrope, extras)
    assert torch.equal(out[:, kw["input_ids"].shape[1]:], ref_tokens)
    for got, want in zip(gen.logits, ref_steps):  # decode positions continue the prefill's exactly
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with tokensieve.compress(model, "vidcom2", retain=0.25, positions=positions), torch.no_grad():
        logits = model(**kw).logits  # a 1e-3 shift of every position id moves these beyond the tolerance
    torch.testing.assert_close(logits, ref_prefill, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_selection_is_the_methods_choice_on_the_models_features(models, arch):
    """The adapter hands the method exactly the video's [T, M, D] features, frame-major."""
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))
    seen = capture_lm_inputs(model, kw)
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        greedy(model, kw)
        st = tokensieve.stats(model)
    ids = kw["input_ids"]
    for b in range(ids.shape[0]):
        if arch == "internvl":  # frames are one-tile runs of the context token, "Frame k:" before each
            ctx = (ids[b] == IMAGE).nonzero(as_tuple=True)[0]
            starts = [i for i in range(len(ctx)) if i == 0 or int(ctx[i]) != int(ctx[i - 1]) + 1]
            runs = [ctx[a:z] for a, z in zip(starts, starts[1:] + [len(ctx)])]
            video_pos = torch.cat([r for r in runs if r.numel() == INTERNVL_TILE])
        else:
            video_pos = (ids[b] == VIDEO).nonzero(as_tuple=True)[0]
        seg = next(s for s in st.segments[b] if s.modality == "video")
        T, H, W = seg.grid
        content = video_pos[: T * H * W]  # LLaVA's trailing newline is structural
        x = seen["inputs_embeds"][b, content].view(T, H * W, -1)
        expected = content[VidCom2().select(x, 0.25).keep]
        kept_video = st.keep[b][torch.isin(st.keep[b], content)]
        assert torch.equal(kept_video, expected)
        if arch == "llava-onevision":  # the newline after the video is always kept
            assert int(video_pos[-1]) in set(st.keep[b].tolist())


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_decode_positions_continue_like_the_unpruned_model(models, arch):
    """Invariant 4: the first decode steps use the positions the unpruned model uses."""
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))

    def decode_positions():
        seen = []

        def hook(_m, args, kwargs):
            if kwargs["inputs_embeds"].shape[1] == 1:
                seen.append(kwargs["position_ids"][-3:].clone())

        h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            greedy(model, kw)
        finally:
            h.remove()
        return seen

    base = decode_positions()
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        pruned = decode_positions()
        deltas = model.model.rope_deltas
        st = tokensieve.stats(model)
    assert len(base) == len(pruned) == N_NEW - 1
    for a, b in zip(base, pruned):
        assert torch.equal(a, b)
    # rope_deltas are in pruned coordinates: pruned length + delta == unpruned next position
    n_after = torch.tensor(st.seq_after)[:, None]
    assert torch.equal((n_after + deltas)[:, 0], base[0][0, :, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_brings_back_exact_behaviour(models, arch):
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))
    with torch.no_grad():
        base_logits = model(**kw).logits
    base_tokens = greedy(model, kw)
    handle = tokensieve.compress(model, "vidcom2", retain=0.25)
    assert "forward" in model.__dict__ and "generate" in model.__dict__
    with torch.no_grad():
        assert model(**kw).logits.shape[1] < base_logits.shape[1]
    tokensieve.restore(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not tokensieve.is_compressed(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base_logits)
    assert torch.equal(greedy(model, kw), base_tokens)
    handle.restore()  # restoring twice is harmless
    tokensieve.restore(model)


def test_restore_keeps_an_earlier_instance_wrapper(models):
    model = build("qwen2-vl", "sdpa")
    original = model.forward
    calls = []

    def user_forward(*a, **k):
        calls.append(1)
        return original(*a, **k)

    model.forward = user_forward
    tokensieve.compress(model, "uniform", retain=0.5)
    tokensieve.restore(model)
    assert model.forward is user_forward


def test_patching_twice_is_an_error_and_changes_nothing(models):
    model = models("qwen2-vl", "sdpa")
    with tokensieve.compress(model, "vidcom2", retain=0.25) as h:
        fwd = model.__dict__["forward"]
        with pytest.raises(tokensieve.InputError, match="already compressed"):
            tokensieve.compress(model, "random", retain=0.5)
        assert model.__dict__["forward"] is fwd
        assert h.method == "vidcom2"


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl"])
def test_beam_search_and_multiple_returns_at_full_retain(models, arch):
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))
    base = greedy(model, kw, num_beams=2, num_return_sequences=2)
    with tokensieve.compress(model, "vidcom2", retain=1.0):
        out = greedy(model, kw, num_beams=2, num_return_sequences=2)
    assert torch.equal(out, base)


def test_text_only_calls_pass_through(models):
    model = models("llava-onevision", "sdpa")
    ids = torch.randint(2, 100, (2, 7))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with torch.no_grad():
            out = model(input_ids=ids).logits
        with pytest.raises(tokensieve.InputError, match="no compressed forward"):
            tokensieve.stats(model)
    assert torch.equal(base, out)


def test_labels_are_gathered_with_the_tokens(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 3))
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with torch.no_grad():
            out = model(**kw, labels=labels)
        st = tokensieve.stats(model)
    # by hand: each sample's labels at its kept positions, left-padded with -100, shifted by one
    B, Lp = st.attention_mask.shape
    want = torch.full((B, Lp), -100, dtype=torch.long)
    for b in range(B):
        kept = labels[b, st.keep[b]]
        want[b, Lp - kept.numel():] = kept
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), want[:, 1:].reshape(-1),
                                             ignore_index=-100)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_max_length_counts_the_callers_prompt(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 1))
    L = kw["input_ids"].shape[1]
    base = model.generate(**kw, max_length=L + 3, do_sample=False)
    with tokensieve.compress(model, "vidcom2", retain=0.5):
        out = model.generate(**kw, max_length=L + 3, do_sample=False)
    assert out.shape == base.shape == (1, L + 3)


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2.5-vl"])
def test_right_padding_gives_the_same_logits_as_left_padding(models, arch):
    model = models(arch, "sdpa")
    samples = samples_for(arch, 3)
    left = make_batch(model, arch, samples, padding_side="left")
    right = make_batch(model, arch, samples, padding_side="right")
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with torch.no_grad():
            out_l = model(**left).logits
            m_l = tokensieve.stats(model)
            out_r = model(**right).logits
            m_r = tokensieve.stats(model)
    assert m_l.seq_after == m_r.seq_after
    for b, n in enumerate(m_l.seq_after):
        torch.testing.assert_close(out_l[b, -n:], out_r[b, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl"])
def test_a_methods_emission_order_reaches_the_language_model(models, arch, positions):
    """DyCoke's ``ttm_keep_order="similarity"``: each pruned frame's kept tokens enter the LLM least
    similar first (the official order). The expected sequence is built here from the method run
    on the captured features, then decoded with the unpatched language model by hand."""
    from tokensieve.methods import DyCoke

    model = models(arch, "sdpa")
    mrope = arch != "llava-onevision"
    kw = make_batch(model, arch, [[("video", None)], [("video", None)]])
    seen = capture_lm_inputs(model, kw)
    full_pos = seen["position_ids"] if mrope else full_positions_1d(kw["attention_mask"])
    opts = {"dycoke_k": 0.5, "ttm_keep_order": "similarity"}
    with tokensieve.compress(model, "dycoke", retain=1.0, positions=positions, **opts):
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    emitted = []
    for b in range(ids.shape[0]):
        video = (ids[b] == VIDEO).nonzero(as_tuple=True)[0]
        T = 2 if mrope else 4  # token frames (Qwen merges 2 raw frames)
        M = (video.numel() - (0 if mrope else 1)) // T  # LLaVA's trailing newline is structural
        content = video[: T * M]
        sel = DyCoke(**opts).select(seen["inputs_embeds"][b, content].view(T, M, -1), 1.0)
        assert sel.order is not None
        others = mask[b].bool().clone()
        others[content] = False
        seq = torch.cat([others.nonzero(as_tuple=True)[0], content[sel.keep]]).sort().values
        slots = torch.isin(seq, content)
        seq[slots] = content[sel.keep[sel.order]]
        emitted.append(seq)
    emb, m, pos = gather_by_hand(seen["inputs_embeds"], full_pos, mask, emitted, positions, mrope)
    ref_tokens, _, steps = reference_greedy(model, emb, m, pos, N_NEW, mrope)
    assert torch.equal(out.sequences[:, ids.shape[1]:], ref_tokens)
    for got, want in zip(out.logits, steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
