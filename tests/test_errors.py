"""Bad input gets a clear error, raised before anything changes."""

from __future__ import annotations

import math

import pytest
import torch
from _builders import IMAGE, VIDEO, build, make_batch

import tokensieve


@pytest.fixture(scope="module")
def qwen():
    return build("qwen2-vl", "sdpa")


@pytest.fixture(scope="module")
def llava():
    return build("llava-onevision", "sdpa")


def assert_untouched(model):
    assert not tokensieve.is_compressed(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


@pytest.mark.parametrize("retain", [0, 0.0, -0.1, 1.5, math.nan, True, "0.5", None])
def test_retain_outside_unit_interval(qwen, retain):
    with pytest.raises(tokensieve.InputError, match=r"retain must be"):
        tokensieve.compress(qwen, "vidcom2", retain=retain)
    assert_untouched(qwen)


def test_unknown_method_names_the_available_ones(qwen):
    with pytest.raises(tokensieve.InputError, match=r"unknown method 'fastvv'; available: .*vidcom2"):
        tokensieve.compress(qwen, "fastvv")
    assert_untouched(qwen)


def test_unknown_option_and_bad_positions(qwen):
    with pytest.raises(tokensieve.InputError, match=r"does not accept option\(s\) temperature; accepted:"):
        tokensieve.compress(qwen, "vidcom2", temperature=2)
    with pytest.raises(tokensieve.InputError, match=r"positions must be one of"):
        tokensieve.compress(qwen, "vidcom2", positions="shuffle")
    assert_untouched(qwen)


def test_unsupported_model_class_names_the_supported_ones():
    with pytest.raises(tokensieve.InputError, match=r"no adapter for model class Linear; supported: .*Qwen2VL"):
        tokensieve.compress(torch.nn.Linear(2, 2))
    with pytest.raises(tokensieve.InputError, match="expects a loaded transformers model"):
        tokensieve.compress("Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.parametrize("arch,token", [("qwen2-vl", VIDEO), ("llava-onevision", VIDEO), ("qwen2-vl", IMAGE)])
def test_placeholder_feature_count_mismatch(qwen, llava, arch, token):
    model = qwen if arch == "qwen2-vl" else llava
    samples = [[("image", (4, 6) if arch == "qwen2-vl" else (32, 32)), ("video", None)]]
    kw = make_batch(model, arch, samples)
    ids = kw["input_ids"].clone()
    first = int((ids[0] == token).nonzero()[0])
    ids[0, first] = 5  # one placeholder fewer than the encoder's features
    kw["input_ids"] = ids
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"][0, first] = 0
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with pytest.raises(tokensieve.InputError, match=r"placeholder tokens .* but the vision encoder produced"):
            model.generate(**kw, max_new_tokens=2)
        with pytest.raises(tokensieve.InputError, match="the last compressed call on this model failed .*placeholder"):
            tokensieve.stats(model)
    assert_untouched(model)


def test_pixel_inputs_need_input_ids(qwen):
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)]])
    embeds = qwen.get_input_embeddings()(kw.pop("input_ids"))
    with tokensieve.compress(qwen, "vidcom2", retain=0.5):
        with pytest.raises(tokensieve.InputError, match="needs input_ids"):
            qwen(inputs_embeds=embeds, **kw)


def test_stats_on_an_uncompressed_model(qwen):
    with pytest.raises(tokensieve.InputError, match="not compressed"):
        tokensieve.stats(qwen)
