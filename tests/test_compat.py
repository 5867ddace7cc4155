"""The transformers range: stated once, tested at both ends, and refused loudly outside it.

A transformers release or a decoder layer whose arguments the runtime does not know must
end in a clear error at ``compress`` (or, for what only a call reveals, before any output),
never in tokens computed from the wrong KV cache.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import transformers
from _builders import build, make_batch

import tokensieve
from tokensieve.runtime import compat
from tokensieve.runtime.inllm import _ConfigView

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def llava():
    return build("llava-onevision", "sdpa", layers=4)


def assert_untouched(model):
    assert not tokensieve.is_compressed(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert "forward" not in model.model.language_model.__dict__


def test_installed_release_is_in_the_supported_range():
    compat.check_version()  # CI runs the suite at both ends of the range; each must be known here
    lo, hi = compat.SUPPORTED_LOWEST, compat.SUPPORTED_HIGHEST
    assert lo <= compat.parse_version(transformers.__version__) <= hi


def test_the_package_declares_the_range_the_runtime_knows():
    spec = re.search(r'"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    lo = re.search(r">=\s*([\d.]+)", spec).group(1)
    hi = re.search(r"<\s*([\d.]+)", spec).group(1)
    assert compat.parse_version(lo) == compat.SUPPORTED_LOWEST
    assert compat.parse_version(hi) == (compat.SUPPORTED_HIGHEST[0], compat.SUPPORTED_HIGHEST[1] + 1)
    readme = (ROOT / "README.md").read_text()
    assert compat.supported_range() in readme


@pytest.mark.parametrize("version", ["5.18.0", "5.18.3", "5.23.0", "5.24.0", "5.24.9"])
def test_versions_inside_the_range_pass(version):
    compat.check_version(version)


@pytest.mark.parametrize("version", ["4.57.6", "5.0.0", "5.17.0", "5.25.0", "5.25.0.dev0", "6.0.0", "banana"])
def test_versions_outside_the_range_are_refused_with_the_range(version):
    with pytest.raises(compat.UnsupportedTransformers, match=re.escape(compat.supported_range())
                       if version != "banana" else "cannot read"):
        compat.check_version(version)


@pytest.mark.parametrize("method", ["vidcom2", "fastv"])
def test_compress_refuses_an_unknown_release_before_touching_the_model(llava, monkeypatch, method):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.31.0")
    with pytest.raises(tokensieve.InputError, match=r"transformers 5\.31\.0 is not supported.*5\.18\.x to 5\.24\.x"):
        tokensieve.compress(llava, method, retain=0.5, **({"layer": 1} if method == "fastv" else {}))
    assert_untouched(llava)


def test_compress_refuses_a_decoder_layer_with_an_unknown_cache_argument(llava):
    """A layer whose forward takes its KV cache under a new name (as 5.24 renamed
    ``past_key_values`` to ``cache``) is refused at compress, naming the layer."""
    layer = llava.model.language_model.layers[2]
    original = layer.forward

    def forward(hidden_states, attention_mask=None, position_ids=None, kv_state=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                        position_embeddings=position_embeddings, **kwargs)

    layer.forward = forward
    try:
        with pytest.raises(compat.UnsupportedTransformers, match=r"decoder layer 2 .* takes its KV cache as 'none'"):
            tokensieve.compress(llava, "fastv", retain=0.5, layer=1)
        assert_untouched(llava)
        tokensieve.compress(llava, "vidcom2", retain=0.5).restore()  # pre-LLM methods do not call the layers
    finally:
        del layer.forward


def test_compress_refuses_a_decoder_layer_that_requires_a_new_argument(llava):
    layer = llava.model.language_model.layers[0]

    def new(hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
            position_embeddings=None, *, layer_budget, **kwargs):
        raise AssertionError("never called")

    def old(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
            position_embeddings=None, *, layer_budget, **kwargs):
        raise AssertionError("never called")

    layer.forward = new if compat.mask_cache_name() == "cache" else old
    try:
        with pytest.raises(compat.UnsupportedTransformers, match=r"requires argument\(s\) 'layer_budget'"):
            tokensieve.compress(llava, "pdrop", retain=0.6)
        assert_untouched(llava)
    finally:
        del layer.forward


def test_attention_that_bypasses_the_registry_fails_loudly_not_silently(llava):
    """If a release stops routing attention through the registry, the row capture sees nothing:
    the runtime must raise instead of pruning on empty scores."""

    def bypass(attn):
        original = attn.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            view = attn.config
            attn.config = object.__getattribute__(view, "_base") if isinstance(view, _ConfigView) else view
            try:
                return original(*args, **kwargs)
            finally:
                attn.config = view

        return forward

    layers = llava.model.language_model.layers
    for layer in layers:
        layer.self_attn.forward = bypass(layer.self_attn)
    kw = make_batch(llava, "llava-onevision", [[("video", None)]])
    try:
        with tokensieve.compress(llava, "fastv", retain=0.5, layer=1):
            with pytest.raises(compat.UnsupportedTransformers, match="did not route its attention"):
                llava.generate(**kw, max_new_tokens=2, do_sample=False)
    finally:
        for layer in layers:
            del layer.self_attn.forward


def test_cache_spellings():
    cache = object()
    for name in compat.CACHE_NAMES:
        kw = {name: cache, "x": 1}
        assert compat.cache_of(kw) is cache
        assert compat.pop_cache(kw) is cache and kw == {"x": 1}
    with pytest.raises(tokensieve.InputError, match="two different KV caches"):
        compat.pop_cache({"cache": object(), "past_key_values": object()})
    out = compat.model_output(torch.zeros(1, 1, 2), cache)
    assert out[compat.output_cache_name()] is cache
