"""Adversarial input: every option value is refused at ``compress`` (model untouched) or works.

``compress`` promises that every argument is validated before the model is touched. A value
it accepts must then generate without error; a value it refuses must leave the model exactly
as it was (same logits).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _builders import build, make_batch

import tokensieve

#: values a hurried or adversarial user passes: wrong types, non-finite, huge, negative, empty
VALUES = [
    math.nan, math.inf, -math.inf, -1, 0, 1, 2, 3, 0.5, 0.25, 1e-300, 1e300, 2**70, -(2**70), 10**30,
    "abc", "", None, True, False, [1, 2], [], (0.5,), (2, 1), [0.5, 0.25], np.float32(0.25), np.int64(2),
    torch.tensor(0.5), torch.tensor([1, 2]), {"a": 1},
]
LAYERS = 16  # deep enough for every method's published layers (SparseVLM's 15)


@pytest.fixture(scope="module")
def setup():
    model = build("llava-onevision", "sdpa", layers=LAYERS)
    kw = make_batch(model, "llava-onevision", [[("video", None)], [("video", None)]])
    with torch.no_grad():
        base = model(**kw).logits
    return model, kw, base


def assert_untouched(model, kw, base):
    assert not tokensieve.is_compressed(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert "forward" not in model.model.language_model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base)


def _option_pairs():
    return [(spec.name, opt) for spec in tokensieve.methods.list() for opt in sorted(spec.options)]


@pytest.mark.parametrize("retain", [0.9, 0.3])
def test_every_option_value_is_refused_cleanly_or_works(setup, retain):
    """Every option of every registered method × every value of :data:`VALUES` (one at a time):
    ``compress`` refuses with :class:`InputError` and leaves the model untouched, or the
    compressed model generates. A clear :class:`InputError` while generating is allowed only for
    what depends on the input (e.g. a published schedule longer than this video)."""
    model, kw, base = setup
    outcomes = {"refused": 0, "ran": 0}
    for method, option in _option_pairs():
        for value in VALUES:
            try:
                handle = tokensieve.compress(model, method, retain=retain, **{option: value})
            except tokensieve.InputError:
                outcomes["refused"] += 1
                assert not tokensieve.is_compressed(model) and "forward" not in model.__dict__, (method, option)
                continue
            try:
                with torch.no_grad():
                    model.generate(**kw, max_new_tokens=2, do_sample=False)
                outcomes["ran"] += 1
            except tokensieve.InputError as exc:
                assert "longer than the sequence" in str(exc) or "has only" in str(exc), (method, option, value, exc)
            except Exception as exc:  # noqa: BLE001 - the point: nothing but InputError may escape
                raise AssertionError(f"{method} {option}={value!r}: {type(exc).__name__}: {exc}") from exc
            finally:
                handle.restore()
    assert_untouched(model, kw, base)
    assert outcomes["ran"] > 100 and outcomes["refused"] > 1000, outcomes


@pytest.mark.parametrize(
    ("method", "options", "pattern"),
    [
        ("vidcom2", {"tau": 1e-300}, r"vidcom2 option tau must be a finite number in \[1e-12, inf\)"),
        ("vidcom2", {"tau": math.nan}, "vidcom2 option tau"),
        ("random", {"seed": 2**70}, r"random option seed must be an integer in \[0, inf\) \(a 64-bit integer\)"),
        ("random", {"seed": -1}, "random option seed"),
        ("dycoke", {"dp": True, "dp_threshold": "abc"}, "dycoke option dp_threshold must be a finite number"),
        ("dycoke", {"dp": True, "dp_threshold": None}, "dycoke option dp_threshold must not be None"),
        ("dycoke", {"dp": True, "dp_threshold": math.nan}, "dycoke option dp_threshold must be a finite number"),
        ("pdrop", {"layers": "abc"}, "pdrop option layers must be a list of integers"),
        ("pdrop", {"layers": 5}, "pdrop option layers must be a list of integers"),
        ("pdrop", {"ratios": "abc"}, "pdrop option ratios must be a list of numbers"),
        ("pdrop", {"ratios": [0.5, 1.5]}, r"pdrop option ratios must be a finite number in \(0, 1\]"),
    ],
)
def test_the_reported_bad_values_are_refused_at_compress(setup, method, options, pattern):
    model, kw, base = setup
    with pytest.raises(tokensieve.InputError, match=pattern):
        tokensieve.compress(model, method, retain=0.5, **options)
    assert_untouched(model, kw, base)


@pytest.mark.parametrize("retain", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.int64(1), 0.25])
def test_any_real_scalar_is_a_retain(setup, retain):
    model, _, _ = setup
    with tokensieve.compress(model, "vidcom2", retain=retain) as handle:
        assert handle.retain == pytest.approx(float(retain)) and isinstance(handle.retain, float)


@pytest.mark.parametrize("retain", [torch.tensor([0.25, 0.5]), np.array([0.25]), "0.25", np.float32("nan")])
def test_non_scalar_retains_are_refused(setup, retain):
    model, kw, base = setup
    with pytest.raises(tokensieve.InputError, match="retain must be"):
        tokensieve.compress(model, "vidcom2", retain=retain)
    assert_untouched(model, kw, base)


def test_option_values_are_normalised(setup):
    model, _, _ = setup
    with tokensieve.compress(model, "pdrop", retain=0.5, layers=[4, 8, 12], ratios=[np.float32(0.5), 0.25, 0.125]) as h:
        assert h.state.inllm.layers == (4, 8, 12) and h.state.inllm.ratios == (0.5, 0.25, 0.125)
    with tokensieve.compress(model, "random", retain=0.5, seed=np.int64(3)) as h:
        assert h.state.selector.seed == 3 and type(h.state.selector.seed) is int


# --- statistics that are right or absent --------------------------------------------------------


def test_beams_are_not_counted_as_tokens(setup):
    model, kw, _ = setup
    with tokensieve.compress(model, "fastv", retain=0.5, layer=2, equivalent="keep"):
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        single = tokensieve.stats(model)
        one = (single.tokens_before, single.tokens_after, single.equivalent_tokens(1))
        model.generate(**kw, max_new_tokens=2, do_sample=False, num_beams=3)
        beams = tokensieve.stats(model)
        assert (beams.tokens_before, beams.tokens_after, beams.equivalent_tokens(1)) == one
        assert beams.tokens_after <= beams.tokens_before
        assert beams.as_dict()["samples"][1]["visual_per_layer_out"] == single.as_dict()["samples"][1]["visual_per_layer_out"]


def test_a_failed_call_leaves_no_statistics_of_an_older_one(setup):
    model, kw, _ = setup
    with tokensieve.compress(model, "vidcom2", retain=0.5):
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        assert tokensieve.stats(model).tokens_after > 0
        with pytest.raises(Exception):
            model.generate(**kw, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=3)
        with pytest.raises(tokensieve.InputError, match="the last compressed call on this model failed"):
            tokensieve.stats(model)
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        assert tokensieve.stats(model).tokens_after > 0


# --- threads and copies -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fastv", "vidcom2", "sparsevlm"])
def test_threads_sharing_one_compressed_model_get_their_own_answers(method):
    import threading

    model = build("qwen2-vl", "sdpa", layers=4)
    options = {"fastv": {"layer": 1, "equivalent": "keep"}, "vidcom2": {},
               "sparsevlm": {"pruning_layers": (1, 2), "equivalent": "output"}}[method]
    batches = [make_batch(model, "qwen2-vl", [[("video", None)], [("image", (4, 6))]], seed=s) for s in range(6)]
    with tokensieve.compress(model, method, retain=0.5, **options):
        alone = []
        for kw in batches:
            out = model.generate(**kw, max_new_tokens=3, do_sample=False)
            alone.append((out, tokensieve.stats(model).tokens_after))
        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(len(batches))

        def work(i):
            try:
                start.wait()
                for _ in range(2):
                    out = model.generate(**batches[i], max_new_tokens=3, do_sample=False)
                    results[i] = (out, tokensieve.stats(model).tokens_after)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i, (out, after) in enumerate(alone):
        assert torch.equal(results[i][0], out) and results[i][1] == after


@pytest.mark.parametrize("method", ["vidcom2", "fastv"])
def test_a_deep_copy_is_compressed_the_same_way_and_independent(setup, method):
    import copy

    model, kw, base = setup
    opts = {"layer": 2, "equivalent": "keep"} if method == "fastv" else {}
    with tokensieve.compress(model, method, retain=0.5, **opts):
        want = model.generate(**kw, max_new_tokens=3, do_sample=False)
        twin = copy.deepcopy(model)
    assert_untouched(model, kw, base)
    assert tokensieve.is_compressed(twin)
    with torch.no_grad():
        twin.model.language_model.norm.weight.mul_(1.0)  # the twin's own weights: not shared
    assert twin.model.language_model.norm.weight.data_ptr() != model.model.language_model.norm.weight.data_ptr()
    assert torch.equal(twin.generate(**kw, max_new_tokens=3, do_sample=False), want)
    assert tokensieve.stats(twin).tokens_after < tokensieve.stats(twin).tokens_before
    tokensieve.restore(twin)
    assert not tokensieve.is_compressed(twin) and "forward" not in twin.__dict__
    with torch.no_grad():
        assert torch.equal(twin(**kw).logits, base)


def test_pickling_a_compressed_models_state_is_refused_clearly(setup):
    """(transformers' own output-capturing hooks already make these models unpicklable; the
    compression state says what to do instead of pickling half a patch.)"""
    import pickle

    model, kw, base = setup
    with tokensieve.compress(model, "vidcom2", retain=0.5) as handle:
        with pytest.raises(tokensieve.InputError, match="cannot be pickled.*restore"):
            pickle.dumps(handle.state)
    assert_untouched(model, kw, base)


# --- generation arguments -----------------------------------------------------------------------


def test_max_length_shorter_than_the_prompt_is_an_error(setup):
    model, kw, _ = setup
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with pytest.raises(tokensieve.InputError, match=f"max_length={L - 5} leaves no room"):
            model.generate(**kw, max_length=L - 5, do_sample=False)


def test_a_non_empty_cache_is_refused_under_either_name(setup):
    from transformers import DynamicCache

    model, kw, _ = setup
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model.model.language_model(input_ids=kw["input_ids"][:, :3], use_cache=True,
                                   **{compat_cache_name(model): cache})
    with tokensieve.compress(model, "vidcom2", retain=0.5):
        for name in ("cache", "past_key_values"):
            with pytest.raises(tokensieve.InputError, match="non-empty KV cache"):
                model(**kw, **{name: cache})


def compat_cache_name(model):
    from tokensieve.runtime import compat

    return compat.mask_cache_name()


@pytest.mark.parametrize("name", ["output_hidden_states", "output_attentions"])
def test_per_layer_outputs_are_refused_by_in_llm_methods(setup, name):
    model, kw, _ = setup
    with tokensieve.compress(model, "fastv", retain=0.5, equivalent="keep"):
        with pytest.raises(tokensieve.InputError, match=f"{name}=True is not supported"):
            model.generate(**kw, max_new_tokens=2, **{name: True}, return_dict_in_generate=True)
        with pytest.raises(tokensieve.InputError, match=f"{name}=True is not supported"):
            model(**kw, **{name: True})
