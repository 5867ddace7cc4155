"""The video-feature cache (``encoder_cache_mb``): a second question about the same video skips the
vision tower and gets the same answer; other videos miss; the bound holds; restore removes it."""

from __future__ import annotations

import pytest
import torch
from _builders import build, make_batch

import tokensieve
from tokensieve.errors import InputError


def _tower_calls(model, arch):
    calls: list[int] = []
    module = model.model.vision_tower if arch == "llava-onevision" else model.model.visual
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl", "qwen3-vl"])
def test_the_same_video_is_encoded_once(arch):
    model = build(arch)
    first = make_batch(model, arch, [[("video", None)]], frames=4, seed=1)
    other = make_batch(model, arch, [[("video", None)]], frames=4, seed=2)
    # a second question about the first video: same pixels, other text
    again = dict(first, input_ids=first["input_ids"].clone())
    again["input_ids"][0, -3:] = torch.tensor([5, 6, 7])
    with torch.no_grad():
        want = [model(**kw).logits for kw in (first, again, other)]
    calls, hook = _tower_calls(model, arch)
    try:
        with tokensieve.compress(model, "vidcom2", retain=1.0, encoder_cache_mb=64):
            with torch.no_grad():
                got = [model(**kw).logits for kw in (first, again, other, first)]
            summary = tokensieve.stats(model).encoder_cache
    finally:
        hook.remove()
    assert len(calls) == 2  # the first video once, the other once
    assert summary["hits"] == 2 and summary["misses"] == 2 and summary["entries"] == 2
    for g, w in zip(got, want + [want[0]]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], got[3])
    assert "get_video_features" not in model.model.__dict__


def test_the_bound_evicts_the_least_recently_used():
    model = build("llava-onevision")
    videos = [make_batch(model, "llava-onevision", [[("video", None)]], frames=4, seed=s) for s in (1, 2, 3)]
    one = 4 * 16 * model.config.text_config.hidden_size * 4 + model.config.text_config.hidden_size * 4  # bytes of one video
    with tokensieve.compress(model, "vidcom2", retain=0.5, encoder_cache_mb=1.5 * one / 2**20):
        with torch.no_grad():
            for kw in (videos[0], videos[1], videos[0], videos[2], videos[0]):
                model(**kw)
        summary = tokensieve.stats(model).encoder_cache
    assert summary["entries"] == 1 and summary["mb"] <= summary["limit_mb"]
    assert (summary["hits"], summary["misses"]) == (0, 5)  # one entry fits: every change of video misses


def test_the_cache_holds_the_encoded_frames_of_a_stage():
    model = build("llava-onevision")
    kw = make_batch(model, "llava-onevision", [[("video", None)]], frames=8)
    with tokensieve.compress(model, "keyframes", retain=0.25, encoder_cache_mb=16):
        with torch.no_grad():
            a = model(**kw).logits
            b = model(**kw).logits
        st = tokensieve.stats(model)
    assert torch.equal(a, b) and st.encoder_cache["hits"] == 1


def test_cache_refusals():
    model = build("llava-onevision")
    with pytest.raises(InputError, match="reads the vision tower's attention"):
        tokensieve.compress(model, "visionzip", retain=0.5, encoder_cache_mb=16)
    for bad in (0, -1, "big", True):
        with pytest.raises(InputError, match="encoder_cache_mb must be a positive number"):
            tokensieve.compress(model, "vidcom2", retain=0.5, encoder_cache_mb=bad)
    assert not tokensieve.is_compressed(model) and "get_video_features" not in model.model.__dict__
