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
