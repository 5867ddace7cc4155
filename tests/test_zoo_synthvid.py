"""The synthetic video QA generator: determinism, answers that match what is drawn, balance, splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.zoo import synthvid
from tokensieve.zoo.synthvid import (
    COLOURS,
    FAMILIES,
    FRAMES,
    HELDOUT_START,
    SHAPES,
    SIZE,
    heldout_seeds,
    make_example,
    train_seeds,
)

seeds = st.integers(min_value=0, max_value=HELDOUT_START + 10_000)


def _tracks(example: synthvid.Example) -> dict[str, list[synthvid.ObjectFrame | None]]:
    """Per object name, its drawn state in every frame (None: absent)."""
    names = {o.name for row in example.objects for o in row}
    out: dict[str, list[synthvid.ObjectFrame | None]] = {n: [None] * FRAMES for n in names}
    for t, row in enumerate(example.objects):
        for o in row:
            out[o.name][t] = o
    return out


def _pixels_show(example: synthvid.Example, t: int, obj: synthvid.ObjectFrame) -> bool:
    """Whether frame ``t`` holds ``obj``'s shape in its colour inside its box."""
    y, x, h, w = obj.box
    mask = synthvid._MASKS[obj.shape]
    region = example.frames[t, y : y + h, x : x + w].astype(np.int32)
    colour = np.asarray(COLOURS[obj.colour])
    inside = region[mask]
    # drawn with a brightness gain in [0.88, 1]: the hue matches the colour's direction
    ratio = inside.sum(axis=1, keepdims=True) / max(colour.sum(), 1)
    return bool(np.abs(inside - colour * ratio).max() <= 3 and 0.86 <= ratio.min() <= ratio.max() <= 1.01)


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_deterministic(seed: int) -> None:
    a, b = make_example(seed), make_example(seed)
    assert a.question == b.question and a.answer == b.answer and a.family == b.family
    assert np.array_equal(a.frames, b.frames)
    assert a.frames.shape == (FRAMES, SIZE, SIZE, 3) and a.frames.dtype == np.uint8
    assert a.answer in a.options


def test_seeds_differ() -> None:
    frames = [make_example(s).frames for s in range(0, 50, 5)]  # same family, different seeds
    assert len({f.tobytes() for f in frames}) == len(frames)


@pytest.mark.parametrize("seed", range(0, 200, 5))
def test_needle_is_drawn_in_exactly_its_frame(seed: int) -> None:
    ex = make_example(seed)
    assert ex.family == "needle"
    needle = _tracks(ex)["needle"]
    shown = [t for t, o in enumerate(needle) if o is not None]
    assert len(shown) == 1
    t = shown[0]
    assert needle[t].shape == ex.answer
    assert _pixels_show(ex, t, needle[t])
    # no other shape of the answer's kind anywhere in the clip; the others are in every frame
    for name, states in _tracks(ex).items():
        if name != "needle":
            assert all(o is not None and o.shape != ex.answer for o in states)
    assert ex.focus[t] == [needle[t].cell] and all(not f for i, f in enumerate(ex.focus) if i != t)


@pytest.mark.parametrize("seed", range(1, 300, 5))
def test_count_answer_is_number_of_appearances(seed: int) -> None:
    ex = make_example(seed)
    assert ex.family == "count"
    words = ex.question.split()
    colour, shape = words[5], words[6]
    present = [any(o.colour == colour and o.shape == shape for o in row) for row in ex.objects]
    runs = sum(1 for t in range(FRAMES) if present[t] and (t == 0 or not present[t - 1]))
    assert synthvid.NUMBERS[runs - 1] == ex.answer
    for t, row in enumerate(ex.objects):
        for o in row:
            if o.colour == colour and o.shape == shape:
                assert _pixels_show(ex, t, o)


@pytest.mark.parametrize("seed", range(2, 300, 5))
def test_order_answer_appears_first(seed: int) -> None:
    ex = make_example(seed)
    assert ex.family == "order"
    a, b = ex.options
    first = {s: min(t for t, row in enumerate(ex.objects) for o in row if o.shape == s) for s in (a, b)}
    assert first[a] != first[b]
    assert ex.answer == min(first, key=first.__getitem__)


@pytest.mark.parametrize("seed", range(3, 300, 5))
def test_position_answer_is_last_cell(seed: int) -> None:
    ex = make_example(seed)
    assert ex.family == "position"
    words = ex.question.split()
    colour, shape = words[3], words[4]
    last = [o for o in ex.objects[-1] if o.colour == colour and o.shape == shape]
    assert len(last) == 1
    assert last[0].cell in synthvid.REST_CELLS[ex.answer]


@pytest.mark.parametrize("seed", range(4, 300, 5))
def test_attribute_answer_is_unique(seed: int) -> None:
    ex = make_example(seed)
    assert ex.family == "attribute"
    key = ex.question.split()[4]
    for row in ex.objects:
        if ex.question.startswith("what colour"):
            matches = {o.colour for o in row if o.shape == key}
        else:
            matches = {o.shape for o in row if o.colour == key}
        assert matches == {ex.answer}


def test_answers_are_balanced_and_families_cycle() -> None:
    examples = [make_example(s) for s in heldout_seeds(360)]
    fams = Counter(e.family for e in examples)
    assert set(fams.values()) == {72}
    for family in FAMILIES:
        answers = Counter(e.answer for e in examples if e.family == family)
        assert max(answers.values()) - min(answers.values()) <= 1 if family == "attribute" else len(set(answers.values())) == 1
    assert set(Counter(e.answer for e in examples if e.family == "needle")) == set(SHAPES)


def test_splits_are_disjoint() -> None:
    held = heldout_seeds(1000, seed=0)
    assert min(held) >= HELDOUT_START
    assert max(train_seeds(0, 1000)) < HELDOUT_START
    assert set(heldout_seeds(1000, seed=1)).isdisjoint(held)
    with pytest.raises(ValueError):
        train_seeds(HELDOUT_START - 5, 10)


def test_answer_checking_is_exact() -> None:
    ex = make_example(0)
    assert synthvid.check_answer(ex, ex.answer)
    assert synthvid.check_answer(ex, f" {ex.answer.upper()}.")
    assert not synthvid.check_answer(ex, "")
    assert not synthvid.check_answer(ex, "x" + ex.answer)
    assert 0.2 < synthvid.chance_level([make_example(s) for s in range(50)]) < 0.35


def test_questions_use_known_words() -> None:
    vocab = set(synthvid.vocabulary())
    for s in range(100):
        ex = make_example(s)
        assert set(ex.question.split()) <= vocab
        assert ex.answer in vocab


# -- domains (distribution shifts for the cloud-device collaboration) ---------------------------


@settings(max_examples=8, deadline=None)
@given(seeds)
def test_a_shifted_clip_is_the_same_scene_in_other_light(seed: int) -> None:
    src = make_example(seed)
    assert np.array_equal(make_example(seed, domain="source").frames, src.frames)  # source is unchanged
    for domain in ("dusk", "fog"):
        a, b = make_example(seed, domain=domain), make_example(seed, domain=domain)
        assert np.array_equal(a.frames, b.frames) and a.domain == domain  # deterministic
        assert (a.question, a.answer, a.cuts) == (src.question, src.answer, src.cuts)
        assert a.objects == src.objects
        assert not np.array_equal(a.frames, src.frames)


def test_shifts_by_hand() -> None:
    """Dusk: channel gains plus noise; fog: a [1,2,1] blur towards a bright haze. Checked on the
    means, which the zero-mean noise leaves alone (up to clipping, which a mid-grey clip avoids)."""
    frames = np.full((2, 8, 8, 3), 100, np.uint8)
    frames[:, 4:, :, 0] = 200
    dusk = synthvid.shift_frames(frames, "dusk", 3).astype(np.float64)
    means = dusk.reshape(-1, 3).mean(0)
    expected = frames.reshape(-1, 3).mean(0) * np.array([0.75, 0.55, 0.45])
    assert np.allclose(means, expected, atol=1.0)
    fog = synthvid.shift_frames(frames, "fog", 3).astype(np.float64)
    assert np.allclose(fog[:, :, :, 1].mean(), 0.45 * 100 + 0.55 * 160, atol=1.0)
    # blur: the red step at row 4 is spread over rows 3 and 4 (rows 0-2 and 5-7 keep their level)
    red = fog[..., 0].mean(axis=(0, 2))
    assert abs(red[0] - (0.45 * 100 + 88)) < 2 and abs(red[7] - (0.45 * 200 + 88)) < 2
    assert abs(red[3] - (0.45 * 125 + 88)) < 2 and abs(red[4] - (0.45 * 175 + 88)) < 2
    assert synthvid.shift_frames(frames, "source", 3) is frames


def test_unknown_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="dusk"):
        make_example(1, domain="night")
    with pytest.raises(ValueError, match="dusk"):
        synthvid.shift_frames(np.zeros((1, 2, 2, 3), np.uint8), "night", 0)
