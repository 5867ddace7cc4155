"""Seeded synthetic video question answering: short clips of coloured shapes on textured scenes.

Every example is a pure function of one integer seed: a 16-frame, 64×64 RGB clip and a
question with a one-word answer. The frame is laid out as a 4×4 grid of 16-pixel cells and
every shape (12 pixels, jittered by up to a pixel around the cell's centre) sits in one cell,
so one shape covers one visual token of a LLaVA-OneVision model with 8-pixel patches and 2×2
pooling.

Question families (``FAMILIES``), each answered by one word:

* ``needle`` — *what shape appeared only briefly?* One shape is drawn in exactly one frame;
  1–3 other shapes, of other kinds, are in every frame.
* ``count`` — *how many times did the red circle appear?* The target shows up 1–4 times, two
  consecutive frames each time, at a new cell each time, among distractors that either stay
  throughout or come and go the same way.
* ``order`` — *which appeared first, the circle or the square?* Two shapes appear one after
  the other (disjoint in time); distractors stay throughout.
* ``position`` — *where was the blue cross at the end?* The target wanders and comes to rest
  on the middle of one edge (``top``, ``bottom``, ``left``, ``right``) for the last frames.
* ``attribute`` — *what colour is the triangle?* / *what shape is the green one?* among
  distractors that differ in the asked-for attribute.

Scenes have textured, low-saturation backgrounds and 0–2 scene cuts (the texture changes).
Answers are balanced exactly: the family is ``seed % 5`` and the answer cycles through the
family's options with ``seed // 5``, so any run of ``5·k·lcm`` consecutive seeds holds every
answer equally often.

Splits are seed ranges: training draws seeds below :data:`HELDOUT_START`; the held-out split
(:func:`heldout_seeds`) starts there, so training never sees a held-out clip.

Domains (:data:`DOMAINS`): ``"source"`` is the world the embedded model was trained on. The
others are distribution shifts of the same scenes and questions, for the cloud–device
collaboration (``tokensieve collab``): ``"dusk"`` (dim, warm light with sensor noise) and
``"fog"`` (washed-out contrast and blur). A shift is applied after rendering with its own random
stream, so a source clip is bit-identical to what it was before domains existed, and the clip of
``(seed, domain)`` shows the same shapes, motion and answer as ``(seed, "source")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ANSWERS",
    "COLOURS",
    "DOMAINS",
    "FAMILIES",
    "FRAMES",
    "GRID",
    "HELDOUT_START",
    "NUMBERS",
    "PLACES",
    "SHAPES",
    "SIZE",
    "Example",
    "ObjectFrame",
    "answer_options",
    "chance_level",
    "check_answer",
    "heldout_seeds",
    "make_example",
    "normalise_answer",
    "shift_frames",
    "train_seeds",
    "vocabulary",
]

FRAMES = 16
SIZE = 64
GRID = 4
CELL = SIZE // GRID
OBJECT = 12

FAMILIES: tuple[str, ...] = ("needle", "count", "order", "position", "attribute")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "purple": (170, 50, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
PLACES: tuple[str, ...] = ("top", "bottom", "left", "right")

#: Where a ``position`` target may come to rest: the two middle cells of each edge.
REST_CELLS: dict[str, tuple[tuple[int, int], ...]] = {
    "top": ((0, 1), (0, 2)),
    "bottom": ((3, 1), (3, 2)),
    "left": ((1, 0), (2, 0)),
    "right": ((1, 3), (2, 3)),
}

#: Every word an answer can be.
ANSWERS: tuple[str, ...] = tuple(SHAPES) + tuple(COLOURS) + NUMBERS + PLACES

#: The domains a clip can be drawn in: the training world and its shifts (see the module docstring).
DOMAINS: tuple[str, ...] = ("source", "dusk", "fog")

#: First seed of the held-out split; training uses seeds below it.
HELDOUT_START = 1_000_000_000
_HELDOUT_STRIDE = 1_000_000

_QUESTION_WORDS = (
    "what which where how many times did does was is the a one shape colour appeared appear "
    "appears only briefly first at end or , ? object"
)


def vocabulary() -> list[str]:
    """Every word a question or an answer can contain (the word-level tokenizer's vocabulary)."""
    words: list[str] = []
    for word in _QUESTION_WORDS.split() + list(ANSWERS):
        if word not in words:
            words.append(word)
    return words


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectFrame:
    """One shape drawn in one frame: its identity, cell ``(row, col)`` and pixel box ``(y, x, h, w)``."""

    name: str
    colour: str
    shape: str
    cell: tuple[int, int]
    box: tuple[int, int, int, int]


@dataclass
class Example:
    """One question about one clip.

    Attributes:
        seed: the seed that made it (the example is a pure function of it).
        family: one of :data:`FAMILIES`.
        question: the question text (lower-case words, spaced punctuation-free ending with ``?``).
        answer: the one-word answer.
        frames: uint8 ``[T, H, W, 3]`` RGB clip, ``T = 16``, ``H = W = 64``.
        objects: per frame, the shapes drawn in it.
        cuts: frame indices where a new scene (background) starts, excluding 0.
        focus: per frame, the cells that hold the object(s) the question is about.
        domain: one of :data:`DOMAINS` (``"source"`` unless shifted).
    """

    seed: int
    family: str
    question: str
    answer: str
    frames: np.ndarray = field(repr=False)
    objects: list[list[ObjectFrame]] = field(repr=False)
    cuts: list[int]
    focus: list[list[tuple[int, int]]] = field(repr=False)
    domain: str = "source"

    @property
    def options(self) -> tuple[str, ...]:
        """The answers a video-blind guesser could choose among for this question."""
        return answer_options(self.family, self.question)


def answer_options(family: str, question: str) -> tuple[str, ...]:
    """The possible answers of a question (its family's options, or the two shapes an ``order`` question names)."""
    if family == "needle":
        return SHAPES
    if family == "count":
        return NUMBERS
    if family == "position":
        return PLACES
    if family == "order":
        return tuple(w for w in question.replace(",", " ").replace("?", " ").split() if w in SHAPES)
    if family == "attribute":
        return tuple(COLOURS) if question.startswith("what colour") else SHAPES
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def chance_level(examples: list[Example]) -> float:
    """Expected accuracy of a uniform guess among each question's options."""
    if not examples:
        return 0.0
    return float(np.mean([1.0 / len(e.options) for e in examples]))


def normalise_answer(text: str) -> str:
    """The first word of a generated answer, lower-cased, without punctuation."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def check_answer(example: Example, generated: str) -> bool:
    """Exact check: the first word of ``generated`` equals the answer."""
    return normalise_answer(generated) == example.answer


def train_seeds(start: int, count: int) -> range:
    """Seeds ``start .. start+count-1`` of the training range (all below :data:`HELDOUT_START`)."""
    if start < 0 or start + count > HELDOUT_START:
        raise ValueError(f"training seeds must lie in [0, {HELDOUT_START}), got [{start}, {start + count})")
    return range(start, start + count)


def heldout_seeds(n: int, seed: int = 0) -> range:
    """``n`` seeds of held-out set number ``seed`` (disjoint from training and from other sets for n ≤ 10⁶)."""
    if n < 0 or n > _HELDOUT_STRIDE:
        raise ValueError(f"a held-out set has 0..{_HELDOUT_STRIDE} questions, got {n}")
    if seed < 0:
        raise ValueError(f"held-out set seed must be >= 0, got {seed}")
    start = HELDOUT_START + seed * _HELDOUT_STRIDE
    return range(start, start + n)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _masks() -> dict[str, np.ndarray]:
    """Boolean ``[12, 12]`` masks of the shapes."""
    n = OBJECT
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    c = n / 2
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= (n / 2 - 0.3) ** 2
    # The square fills its box: its area (144 px) then differs clearly from the disc's (~102 px),
    # which a 2-layer vision tower with 8-pixel patches otherwise learns to tell apart slowly.
    square = np.ones((n, n), bool)
    # Upward triangle: apex at the top centre, base along the bottom row.
    triangle = (yy >= 0.5) & (np.abs(xx - c) <= (yy / n) * (n / 2))
    arm = n / 6
    cross = (np.abs(yy - c) <= arm) | (np.abs(xx - c) <= arm)
    return {"circle": circle, "square": square, "triangle": triangle, "cross": cross}


_MASKS = _masks()


def _background(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation textured scene, float32 ``[64, 64, 3]`` in 0..255."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    grey = rng.uniform(70, 150)
    tint = rng.uniform(-18, 18, size=3)
    base = grey + tint
    texture = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(2):
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(0.08, 0.5)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(6, 16)
        texture += amp * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    kind = rng.integers(3)
    if kind == 1:  # checker
        period = int(rng.integers(4, 12))
        texture += rng.uniform(5, 12) * (((yy // period) + (xx // period)) % 2 * 2 - 1)
    elif kind == 2:  # blotches
        coarse = rng.normal(0, 10, size=(8, 8)).astype(np.float32)
        texture += np.kron(coarse, np.ones((8, 8), np.float32))
    noise = rng.normal(0, 4, size=(SIZE, SIZE, 1)).astype(np.float32)
    return base[None, None, :] + texture[:, :, None] + noise


#: How far (pixels) a shape is jittered around the centre of its cell, each frame.
JITTER = 1


def _box(cell: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    centre = (CELL - OBJECT) // 2
    y = cell[0] * CELL + centre + int(rng.integers(-JITTER, JITTER + 1))
    x = cell[1] * CELL + centre + int(rng.integers(-JITTER, JITTER + 1))
    return (y, x, OBJECT, OBJECT)


def _render(
    rng: np.random.Generator, tracks: list[dict[str, Any]], cuts: list[int]
) -> tuple[np.ndarray, list[list[ObjectFrame]]]:
    """Draw ``tracks`` (each: name, colour, shape, ``cells`` = per-frame cell or None) over scenes."""
    scenes = [_background(rng) for _ in range(len(cuts) + 1)]
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    objects: list[list[ObjectFrame]] = []
    scene = 0
    for t in range(FRAMES):
        if scene < len(cuts) and t >= cuts[scene]:
            scene += 1
        img = scenes[scene].copy()
        drawn: list[ObjectFrame] = []
        for track in tracks:
            cell = track["cells"][t]
            if cell is None:
                continue
            box = _box(cell, rng)
            y, x, h, w = box
            mask = _MASKS[track["shape"]]
            colour = np.asarray(COLOURS[track["colour"]], np.float32) * track["gain"]
            region = img[y : y + h, x : x + w]
            region[mask] = colour
            drawn.append(ObjectFrame(track["name"], track["colour"], track["shape"], cell, box))
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
        objects.append(drawn)
    return frames, objects


# ---------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------

_CELLS = [(r, c) for r in range(GRID) for c in range(GRID)]


def _neighbours(cell: tuple[int, int]) -> list[tuple[int, int]]:
    r, c = cell
    out = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return [(a, b) for a, b in out if 0 <= a < GRID and 0 <= b < GRID]


class _Board:
    """Cell occupancy per frame, so that no two shapes share a cell in one frame."""

    def __init__(self) -> None:
        self.used: list[set[tuple[int, int]]] = [set() for _ in range(FRAMES)]

    def free(self, t: int, cell: tuple[int, int]) -> bool:
        return cell not in self.used[t]

    def take(self, cells: list[tuple[int, int] | None]) -> None:
        for t, cell in enumerate(cells):
            if cell is not None:
                self.used[t].add(cell)

    def free_cells(self, t: int) -> list[tuple[int, int]]:
        return [c for c in _CELLS if c not in self.used[t]]


def _walk(
    rng: np.random.Generator, board: _Board, frames: list[int], start: tuple[int, int] | None = None
) -> list[tuple[int, int] | None]:
    """A random walk over ``frames`` (sorted indices): moves to a free neighbour about every other frame."""
    cells: list[tuple[int, int] | None] = [None] * FRAMES
    if not frames:
        return cells
    t0 = frames[0]
    options = [start] if start is not None and board.free(t0, start) else board.free_cells(t0)
    cell = options[int(rng.integers(len(options)))]
    for t in frames:
        if t != t0 and rng.random() < 0.55:
            moves = [n for n in _neighbours(cell) if board.free(t, n)]
            if moves:
                cell = moves[int(rng.integers(len(moves)))]
        if not board.free(t, cell):
            free = board.free_cells(t)
            cell = free[int(rng.integers(len(free)))]
        cells[t] = cell
    board.take(cells)
    return cells


def _place_at(
    rng: np.random.Generator, board: _Board, frames: list[int]
) -> list[tuple[int, int] | None]:
    """A shape shown at ``frames`` at one free cell (the same cell for the whole run)."""
    cells: list[tuple[int, int] | None] = [None] * FRAMES
    free = [c for c in _CELLS if all(board.free(t, c) for t in frames)]
    cell = free[int(rng.integers(len(free)))]
    for t in frames:
        cells[t] = cell
    board.take(cells)
    return cells


def _track(name: str, colour: str, shape: str, cells: list[Any], rng: np.random.Generator) -> dict[str, Any]:
    return {"name": name, "colour": colour, "shape": shape, "cells": cells, "gain": float(rng.uniform(0.88, 1.0))}


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def _distinct_pairs(
    rng: np.random.Generator, n: int, avoid: set[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``n`` distinct ``(colour, shape)`` pairs, none in ``avoid``."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        pair = (_pick(rng, list(COLOURS)), _pick(rng, SHAPES))
        if pair not in avoid and pair not in out:
            out.append(pair)
    return out


ALL = list(range(FRAMES))


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


def _needle(rng: np.random.Generator, answer: str, board: _Board) -> tuple[str, list[dict[str, Any]], int]:
    t = int(rng.integers(1, FRAMES - 1))
    cells = _place_at(rng, board, [t])
    tracks = [_track("needle", _pick(rng, list(COLOURS)), answer, cells, rng)]
    others = [s for s in SHAPES if s != answer]
    for i in range(int(rng.integers(1, 4))):
        tracks.append(_track(f"d{i}", _pick(rng, list(COLOURS)), _pick(rng, others), _walk(rng, board, ALL), rng))
    return "what shape appeared only briefly ?", tracks, 0


def _count_runs(rng: np.random.Generator, k: int) -> list[list[int]]:
    """``k`` runs of two frames with gaps of at least two frames, placed at random in the clip."""
    slack = FRAMES - 2 * k - 2 * (k - 1)
    offsets = np.sort(rng.integers(0, slack + 1, size=k))
    return [[int(offsets[i]) + 4 * i, int(offsets[i]) + 4 * i + 1] for i in range(k)]


def _count(rng: np.random.Generator, answer: str, board: _Board) -> tuple[str, list[dict[str, Any]], int]:
    k = NUMBERS.index(answer) + 1
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    cells: list[tuple[int, int] | None] = [None] * FRAMES
    for run in _count_runs(rng, k):
        placed = _place_at(rng, board, run)
        for t in run:
            cells[t] = placed[t]
    tracks = [_track("target", colour, shape, cells, rng)]
    n_distractors = int(rng.integers(1, 4))
    for i, (c, s) in enumerate(_distinct_pairs(rng, n_distractors, {(colour, shape)})):
        if rng.random() < 0.5:
            frames = ALL
        else:  # a blinking distractor: it comes and goes like the target, 2-4 times
            frames = [t for run in _count_runs(rng, int(rng.integers(2, len(NUMBERS) + 1))) for t in run]
        tracks.append(_track(f"d{i}", c, s, _walk(rng, board, frames), rng))
    return f"how many times did the {colour} {shape} appear ?", tracks, 0


def _order(rng: np.random.Generator, answer: str, board: _Board) -> tuple[str, list[dict[str, Any]], int]:
    other = _pick(rng, [s for s in SHAPES if s != answer])
    first_start = int(rng.integers(0, 6))
    first_len = int(rng.integers(2, 6))
    second_start = first_start + first_len + int(rng.integers(0, 3))
    second_start = min(second_start, FRAMES - 2)
    second_end = int(rng.integers(second_start + 2, FRAMES + 1))
    first_frames = list(range(first_start, min(first_start + first_len, second_start)))
    second_frames = list(range(second_start, second_end))
    tracks = [
        _track("first", _pick(rng, list(COLOURS)), answer, _walk(rng, board, first_frames), rng),
        _track("second", _pick(rng, list(COLOURS)), other, _walk(rng, board, second_frames), rng),
    ]
    rest = [s for s in SHAPES if s not in (answer, other)]
    for i in range(int(rng.integers(0, 3))):
        tracks.append(_track(f"d{i}", _pick(rng, list(COLOURS)), _pick(rng, rest), _walk(rng, board, ALL), rng))
    named = [answer, other] if rng.random() < 0.5 else [other, answer]
    return f"which appeared first , the {named[0]} or the {named[1]} ?", tracks, 0


def _path_to(rng: np.random.Generator, start: tuple[int, int], goal: tuple[int, int], steps: int) -> list[tuple[int, int]]:
    """Cells from ``start`` to ``goal`` in ``steps`` moves (wandering, then heading for the goal)."""
    path = [start]
    cell = start
    for i in range(steps):
        remaining = steps - i
        dist = abs(cell[0] - goal[0]) + abs(cell[1] - goal[1])
        options = _neighbours(cell) + [cell]
        if dist >= remaining - 1:
            options = [n for n in options if abs(n[0] - goal[0]) + abs(n[1] - goal[1]) < dist] or [cell]
        cell = _pick(rng, options)
        path.append(cell)
    return path


def _position(rng: np.random.Generator, answer: str, board: _Board) -> tuple[str, list[dict[str, Any]], int]:
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    goal = _pick(rng, REST_CELLS[answer])
    rest = int(rng.integers(3, 6))
    travel = FRAMES - rest
    # start somewhere away from the goal's edge
    starts = [c for c in _CELLS if abs(c[0] - goal[0]) + abs(c[1] - goal[1]) >= 3]
    path = _path_to(rng, _pick(rng, starts), goal, travel - 1)
    cells: list[tuple[int, int] | None] = list(path) + [goal] * rest
    board.take(cells)
    tracks = [_track("target", colour, shape, cells, rng)]
    for i, (c, s) in enumerate(_distinct_pairs(rng, int(rng.integers(1, 4)), {(colour, shape)})):
        tracks.append(_track(f"d{i}", c, s, _walk(rng, board, ALL), rng))
    return f"where was the {colour} {shape} at the end ?", tracks, 0


def _attribute(rng: np.random.Generator, answer: str, board: _Board) -> tuple[str, list[dict[str, Any]], int]:
    n_distractors = int(rng.integers(1, 4))
    if answer in COLOURS:
        shape = _pick(rng, SHAPES)
        tracks = [_track("target", answer, shape, _walk(rng, board, ALL), rng)]
        others = [s for s in SHAPES if s != shape]
        picks = rng.permutation(len(others))[:n_distractors]
        for i, j in enumerate(picks):
            tracks.append(_track(f"d{i}", _pick(rng, list(COLOURS)), others[int(j)], _walk(rng, board, ALL), rng))
        return f"what colour is the {shape} ?", tracks, 0
    colour = _pick(rng, list(COLOURS))
    tracks = [_track("target", colour, answer, _walk(rng, board, ALL), rng)]
    others = [c for c in COLOURS if c != colour]
    picks = rng.permutation(len(others))[:n_distractors]
    for i, j in enumerate(picks):
        tracks.append(_track(f"d{i}", others[int(j)], _pick(rng, SHAPES), _walk(rng, board, ALL), rng))
    return f"what shape is the {colour} object ?", tracks, 0


_BUILDERS = {
    "needle": _needle,
    "count": _count,
    "order": _order,
    "position": _position,
    "attribute": _attribute,
}

#: The answer cycle of each family (``attribute`` alternates colour and shape questions).
_CYCLES: dict[str, tuple[str, ...]] = {
    "needle": SHAPES,
    "count": NUMBERS,
    "order": SHAPES,
    "position": PLACES,
    "attribute": tuple(x for pair in zip(COLOURS, SHAPES + (None,)) for x in pair if x is not None),
}


def _blur(frames: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1]/4 blur over height and width of float ``[T, H, W, 3]`` (edges repeated)."""
    out = frames
    for axis in (1, 2):
        padded = np.concatenate([np.take(out, [0], axis), out, np.take(out, [-1], axis)], axis)
        n = out.shape[axis]
        out = (np.take(padded, range(0, n), axis) + 2 * np.take(padded, range(1, n + 1), axis)
               + np.take(padded, range(2, n + 2), axis)) / 4
    return out


def shift_frames(frames: np.ndarray, domain: str, seed: int) -> np.ndarray:
    """``frames`` (uint8 ``[T, H, W, 3]``) as seen in ``domain``; the identity for ``"source"``.

    * ``"dusk"``: per-channel gains (0.75, 0.55, 0.45) — dim, warm light — plus Gaussian sensor
      noise (σ = 8 grey levels), drawn per pixel and frame.
    * ``"fog"``: a [1, 2, 1] blur, then contrast 0.45 towards a bright haze (grey 160), plus noise
      (σ = 5).

    The noise is a pure function of ``(seed, domain)``.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    if domain == "source":
        return frames
    rng = np.random.default_rng([seed, 1000 + DOMAINS.index(domain)])
    x = frames.astype(np.float32)
    if domain == "dusk":
        x = x * np.asarray([0.75, 0.55, 0.45], np.float32) + rng.normal(0, 8, x.shape).astype(np.float32)
    else:  # fog
        x = 0.45 * _blur(x) + 0.55 * 160.0 + rng.normal(0, 5, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _answer_for(family: str, seed: int) -> str:
    cycle = _CYCLES[family]
    return cycle[(seed // len(FAMILIES)) % len(cycle)]


def make_example(seed: int, family: str | None = None, domain: str = "source") -> Example:
    """The example of ``seed`` (deterministic). ``family`` overrides the seed's own family;
    ``domain`` (one of :data:`DOMAINS`) shows the same clip under a distribution shift."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    fam = FAMILIES[seed % len(FAMILIES)] if family is None else family
    if fam not in _BUILDERS:
        raise ValueError(f"unknown family {fam!r}; expected one of {', '.join(FAMILIES)}")
    answer = _answer_for(fam, seed)
    rng = np.random.default_rng([seed, FAMILIES.index(fam)])
    board = _Board()
    question, tracks, _ = _BUILDERS[fam](rng, answer, board)
    n_cuts = int(rng.integers(0, 3))
    cuts = sorted(int(c) for c in rng.choice(np.arange(3, FRAMES - 2), size=n_cuts, replace=False))
    frames, objects = _render(rng, tracks, cuts)
    focus_names = {"needle": {"needle"}, "order": {"first", "second"}}.get(fam, {"target"})
    focus = [[o.cell for o in row if o.name in focus_names] for row in objects]
    return Example(
        seed=seed,
        family=fam,
        question=question,
        answer=answer,
        frames=shift_frames(frames, domain, seed),
        objects=objects,
        cuts=cuts,
        focus=focus,
        domain=domain,
    )
