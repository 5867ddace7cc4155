"""The encoder stage (``specs/encoder.md`` E0): frames chosen from pixels before the vision tower.

Pure parts: the count is a function of the grid and the options alone and always holds the
budget; the ``dp`` choice is the minimiser of its cost (brute force over every choice); ``topk``
and ``uniform`` do what they say. Runtime parts, on tiny random models of every family that has
the stage: the tower really runs on fewer frames (its inputs counted), nothing changes when every
frame is encoded, and the pruned call equals a by-hand reference that never skips anything —
the *unpatched* model run on the whole video, its language model fed the kept positions — which
holds only because skipping a whole frame (a Qwen temporal patch) is exact for the others.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _builders import (
    MROPE_ARCHS,
    build,
    capture_lm_inputs,
    full_positions_1d,
    gather_by_hand,
    gather_deepstack,
    make_batch,
    reference_greedy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve
from tokensieve.errors import InputError
from tokensieve.methods.budget import retained_count
from tokensieve.methods.encoder import (
    EncoderStage,
    KeyFrames,
    budget_within,
    choose_frames,
    encoder_stage,
    frame_distances,
)

N_NEW = 4
STAGE_ARCHS = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "internvl")


# --- counts: pure in (T, M, retain, options) -------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 40), M=st.integers(1, 300), retain=st.floats(0.001, 1.0),
       frames=st.one_of(st.none(), st.floats(0.001, 1.0)))
def test_frames_to_encode_hold_the_budget_and_nothing_more(T, M, retain, frames):
    stage = EncoderStage(frames=frames)
    k = retained_count(T, T * M, retain)
    try:
        kt = stage.frames_for(T, M, retain)
    except InputError as exc:  # only when the asked fraction of frames cannot hold the budget
        assert frames is not None and max(1, min(T, int(frames * T + 0.5))) * M < k, exc
        return
    assert 1 <= kt <= T
    assert kt * M >= k  # a pre-LLM method can keep its round(r·N) among them
    if frames is None:  # the fewest frames that hold it
        assert (kt - 1) * M < k
    else:
        assert kt == max(1, min(T, int(frames * T + 0.5)))
    want, inner = budget_within(T, M, retain, kt)
    assert want == k and retained_count(kt, kt * M, inner) == k  # the inner ratio gives exactly K


def test_budget_within_names_the_shortfall():
    with pytest.raises(InputError, match="raise encoder_frames"):
        budget_within(16, 10, 0.5, 4)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, True, "half"])
def test_encoder_frames_out_of_range_is_refused(bad):
    with pytest.raises(InputError, match="encoder_frames must be a number in \\(0, 1\\]"):
        EncoderStage(frames=bad)


def test_unknown_policy_is_refused():
    with pytest.raises(InputError, match="encoder_policy must be one of"):
        EncoderStage(policy="best")
    with pytest.raises(InputError, match="keyframes option policy"):
        KeyFrames(policy="best")


def test_encoder_options_split_from_method_options():
    stage, rest = encoder_stage({"encoder_frames": 0.5, "budget": "fca"})
    assert stage == EncoderStage(frames=0.5, policy="dp") and rest == {"budget": "fca"}
    assert encoder_stage({"budget": "fca"}) == (None, {"budget": "fca"})
    assert encoder_stage({"encoder_policy": "topk"})[0] == EncoderStage(frames=None, policy="topk")


# --- which frames ------------------------------------------------------------------------------------


def _cost(dist: torch.Tensor, kept: tuple[int, ...]) -> float:
    """The definition: every frame shown as the last kept frame at or before it."""
    total, last = 0.0, 0
    for t in range(dist.shape[0]):
        if t in kept:
            last = t
        total += float(dist[t, last])
    return total


@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 8), data=st.data())
def test_dp_choice_is_the_brute_force_minimum(T, data):
    k = data.draw(st.integers(1, T))
    values = data.draw(st.lists(st.integers(0, 6), min_size=T * 3, max_size=T * 3))
    sig = torch.tensor(values, dtype=torch.float64).reshape(T, 3)
    got = choose_frames(sig, k, "dp")
    dist = frame_distances(sig)
    best = min(_cost(dist, (0, *rest)) for rest in itertools.combinations(range(1, T), k - 1))
    assert got.tolist() == sorted(set(got.tolist())) and got.numel() == k and int(got[0]) == 0
    assert _cost(dist, tuple(got.tolist())) == pytest.approx(best, abs=1e-12)


def test_dp_keeps_one_frame_per_scene_and_ties_go_early():
    scenes = torch.tensor([0.0] * 4 + [5.0] * 3 + [9.0] * 5)[:, None].expand(-1, 6)
    assert choose_frames(scenes, 3, "dp").tolist() == [0, 4, 7]
    assert choose_frames(scenes, 3, "topk").tolist() == [0, 4, 7]
    still = torch.zeros(6, 4)
    assert choose_frames(still, 3, "dp").tolist() == [0, 1, 2]
    assert choose_frames(still, 3, "topk").tolist() == [0, 1, 2]


def test_topk_ranks_changes_and_misses_drift_that_dp_sees():
    drift = torch.arange(10, dtype=torch.float64)[:, None] * torch.ones(1, 4)  # a steady slow change
    drift[5:] += 0.5  # one slightly larger step at frame 5
    assert choose_frames(drift, 2, "topk").tolist() == [0, 5]
    assert choose_frames(drift, 2, "dp").tolist() == [0, 5]  # the middle of the drift, here the step
    jumps = torch.tensor([0, 0, 0, 0, 0, 0, 3, 3.1, 3.2, 3.3])[:, None].expand(-1, 2)
    assert choose_frames(jumps, 2, "topk").tolist() == [0, 6]


def test_uniform_reads_no_pixels_and_starts_at_frame_zero():
    assert choose_frames(None, 4, "uniform", num_frames=16).tolist() == [0, 4, 8, 12]
    assert choose_frames(None, 1, "uniform", num_frames=5).tolist() == [0]
    with pytest.raises(InputError, match="reads pixels"):
        choose_frames(None, 2, "dp", num_frames=4)
    with pytest.raises(InputError, match="keep between 1 and T"):
        choose_frames(torch.zeros(3, 2), 4, "dp")


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 6), M=st.integers(1, 30), retain=st.floats(0.01, 1.0))
def test_keyframes_keeps_exactly_the_budget_of_its_frames(T, M, retain):
    sel = KeyFrames().select(torch.randn(T, M, 4), retain)
    k = retained_count(T, T * M, retain)
    assert sel.keep.numel() == k == int(sel.frame_counts.sum())
    assert bool((sel.keep[1:] > sel.keep[:-1]).all()) and int(sel.frame_counts.min()) >= 1


# --- the runtime on tiny models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build(arch)
        return cache[arch]

    return get


def _batch(model, arch, batch, frames=8):
    image = ("image", (40, 60)) if arch == "llava-onevision" else ("image", (4, 6))  # InternVL: 3 tiles
    samples = [[image, ("video", None)]] if batch == 1 else [[("video", None)], [image, ("video", None)], [("video", None)]]
    return make_batch(model, arch, samples, frames=frames)


def _tower_inputs(model, arch):
    """Hook counting what the vision tower is given: frames (SigLIP) or patch rows (Qwen ViTs)."""
    seen: list[int] = []
    if arch in ("llava-onevision", "internvl"):
        module = model.model.vision_tower
        hook = module.register_forward_pre_hook(lambda _m, args, kw: seen.append(int((args or (kw["pixel_values"],))[0].shape[0])),
                                                with_kwargs=True)
    else:
        module = model.model.visual.patch_embed
        hook = module.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    return seen, hook


@pytest.mark.parametrize("arch", STAGE_ARCHS)
def test_encoder_runs_on_the_kept_frames_only(models, arch):
    model = models(arch)
    kw = _batch(model, arch, 3)
    seen, hook = _tower_inputs(model, arch)
    try:
        with tokensieve.compress(model, "vidcom2", retain=0.25, encoder_frames=0.5):
            with torch.no_grad():
                model(**kw)
            st_ = tokensieve.stats(model)
    finally:
        hook.remove()
    videos = [s for row in st_.segments for s in row if s.modality == "video"]
    assert len(videos) == 3
    for s in videos:
        T = s.grid[0]
        assert len(s.frames_encoded) == EncoderStage(frames=0.5).frames_for(T, s.grid[1] * s.grid[2], 0.25) == T // 2
        assert s.tokens_after == round(0.25 * s.tokens_before)  # the method's budget of the whole video
        assert all(c == 0 for t, c in enumerate(s.frame_counts) if t not in s.frames_encoded)
    if arch == "llava-onevision":  # images go first (their own call), then the videos' kept frames
        assert seen[-1] == sum(len(s.frames_encoded) for s in videos)
    elif arch == "internvl":  # one call: the image's 3 tiles and the videos' kept frames, one tile each
        assert seen[-1] == 3 + sum(len(s.frames_encoded) for s in videos)
    else:
        rows_per_frame = 8 * 8
        assert seen[-1] == sum(len(s.frames_encoded) for s in videos) * rows_per_frame


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl", "qwen3-vl"])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_frame_encoded_changes_nothing(models, arch, batch):
    model = models(arch)
    kw = _batch(model, arch, batch)
    with torch.no_grad():
        base = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with tokensieve.compress(model, "vidcom2", retain=1.0, encoder_frames=1.0):
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    assert torch.equal(out.sequences, base.sequences)
    for got, want in zip(out.logits, base.logits):
        assert torch.equal(got, want)
    # and at retain < 1 the stage with every frame is the method alone
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with torch.no_grad():
            alone = model(**kw).logits
        keep_alone = tokensieve.stats(model).keep
    with tokensieve.compress(model, "vidcom2", retain=0.25, encoder_frames=1.0):
        with torch.no_grad():
            staged = model(**kw).logits
        keep_staged = tokensieve.stats(model).keep
    assert all(torch.equal(a, b) for a, b in zip(keep_alone, keep_staged))
    assert torch.equal(alone, staged)


CONFIGS = {
    "keyframes": ("keyframes", {}),
    "keyframes-topk": ("keyframes", {"policy": "topk"}),
    "vidcom2-half": ("vidcom2", {"encoder_frames": 0.5}),
    "uniform-uniform": ("uniform", {"encoder_frames": 0.75, "encoder_policy": "uniform"}),
}


# the other frame policies take the same runtime path: batch 1 is enough for them
REFERENCE_CASES = [(arch, batch, config) for arch in STAGE_ARCHS for batch in (1, 3) for config in CONFIGS
                   if batch == 1 or config in ("keyframes", "vidcom2-half")]


@pytest.mark.parametrize("arch,batch,config", REFERENCE_CASES)
def test_skipping_frames_matches_the_unpatched_model_on_the_kept_tokens(models, arch, batch, config):
    """The reference runs the unpatched model on the whole video — no frame skipped — and feeds
    its language model the kept positions by hand with their original position ids."""
    name, options = CONFIGS[config]
    model = models(arch)
    mrope = arch in MROPE_ARCHS
    kw = _batch(model, arch, batch)
    seen = capture_lm_inputs(model, kw)
    full_pos = seen["position_ids"] if mrope else full_positions_1d(kw["attention_mask"])
    with tokensieve.compress(model, name, retain=0.25, **options) as handle:
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        st_ = tokensieve.stats(model)
    for row in st_.segments:
        for s in row:
            assert s.tokens_after == max(s.grid[0], round(0.25 * s.tokens_before))
            if s.modality == "video":
                assert s.frames_encoded is not None and len(s.frames_encoded) < s.grid[0]
                assert s.frames_encoded[0] == 0
    emb, mask, pos = gather_by_hand(seen["inputs_embeds"], full_pos, kw["attention_mask"], st_.keep, handle.positions, mrope)
    extras = gather_deepstack(seen, st_.keep, mask.shape[1])
    ref_tokens, _, ref_steps = reference_greedy(model, emb, mask, pos, N_NEW, mrope, extras)
    L = kw["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, L:], ref_tokens)
    for got, want in zip(out.logits, ref_steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_counts_do_not_depend_on_the_pixels(models):
    model = models("llava-onevision")
    kw = _batch(model, "llava-onevision", 3)
    counts = []
    for pixels in (kw["pixel_values_videos"], torch.zeros_like(kw["pixel_values_videos"]),
                   kw["pixel_values_videos"].flip(1)):
        with tokensieve.compress(model, "vidcom2", retain=0.3, encoder_frames=0.6):
            with torch.no_grad():
                model(**{**kw, "pixel_values_videos": pixels})
            st_ = tokensieve.stats(model)
        counts.append([(len(s.frames_encoded or []), s.tokens_after) for row in st_.segments for s in row])
    assert counts[0] == counts[1] == counts[2]


def test_in_llm_method_receives_the_encoded_frames(models):
    model = models("llava-onevision")
    kw = _batch(model, "llava-onevision", 1)
    with tokensieve.compress(model, "fastv", retain=0.5, layer=1, equivalent="keep", encoder_frames=0.5):
        with torch.no_grad():
            model.generate(**kw, max_new_tokens=2, do_sample=False)
        st_ = tokensieve.stats(model)
    video = [s for s in st_.segments[0] if s.modality == "video"][0]
    assert len(video.frames_encoded) == video.grid[0] // 2
    assert video.tokens_after == video.tokens_before // 2  # every encoded token enters the language model


def test_refusals_leave_the_model_unpatched(models):
    model = models("llava-onevision")
    cases = [
        (("fastv",), {"retain": 0.5, "layer": 1, "encoder_policy": "dp"}, "give encoder_frames"),
        (("vidcom2",), {"retain": 0.5, "encoder_frames": 0.25}, "must be at least retain"),
        (("vidcom2",), {"retain": 0.5, "encoder_frames": 1.5}, "encoder_frames must be a number"),
        (("vidcom2",), {"retain": 0.5, "encoder_policy": "fastest"}, "encoder_policy must be one of"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            tokensieve.compress(model, *args, **kwargs)
        assert not tokensieve.is_compressed(model)


def test_bench_method_strings_take_the_encoder_options():
    from tokensieve.bench.quality import split_method

    assert split_method("vidcom2:encoder_frames=0.5:budget=uniform") == ("vidcom2", {"encoder_frames": 0.5, "budget": "uniform"})
    with pytest.raises(InputError, match="encoder_frames must be"):
        split_method("vidcom2:encoder_frames=2")
