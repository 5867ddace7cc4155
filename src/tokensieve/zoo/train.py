"""Train the embedded video model from scratch on synthetic video QA.

``python -m tokensieve.zoo.train`` trains the tiny LLaVA-OneVision of
:mod:`tokensieve.zoo.model` on :mod:`tokensieve.zoo.synthvid` clips and writes the result
(fp16 safetensors, config, tokenizer, processor) with ``save_pretrained``.

* Seeded and reproducible: the weights are initialised from ``--seed`` and the examples of
  step ``s`` are a pure function of ``(--seed, s)``, so a run resumed from a checkpoint
  (``--resume``) continues exactly as if it had never stopped.
* Two stages: the vision tower and projector first learn alone (``--vision-steps``) from a
  per-token probe; then the whole model trains, with the vision tower fixed by default
  (``--freeze-vision``; it is done by then, and not back-propagating through it makes each step
  about a quarter cheaper).
* Each clip is one conversation: the example's own question first, exactly as asked at
  inference, then ``--extra-questions`` more about the same clip, phrased as the ``count``,
  ``attribute`` and ``position`` families phrase them (:func:`extra_turns`). They cost a dozen
  tokens each next to the clip's 257, so one step teaches several answers.
* Loss: cross-entropy on each answer word and its end-of-turn token, plus training-only aids
  that make the vision side and the decoder's reading of it learn in minutes rather than
  hours: a linear probe on the projector output (colour × shape of the shape in the token's
  cell, the cell's row and column; the probe is thrown away after training); the decoder's own
  output at each visual token predicting the words that describe what is there (colour, shape,
  place, :func:`token_words`); and the attention of one head in three decoder layers from each
  answer position, guided onto the tokens that hold the answer (:func:`attention_targets`; for
  ``count``, another head, spread over every frame of the asked-for shape and the first token,
  so the share it reads grows with the count). The model that ships is the plain LLaVA-OneVision
  architecture.
* Inputs go through the model's own processor and chat template, exactly as at inference.

``--arch qwen2-vl`` trains the same kind of model on the Qwen2-VL architecture
(:func:`tokensieve.zoo.model.build_model` with ``arch="qwen2-vl"``), by the same recipe. Its
visual tokens each cover one cell over a *pair* of frames (temporal patches of two frames, in
(pair, row, column) order, 128 per clip, no newline after them), so the per-token targets are
taken over the pair: the probe predicts the class of the cell in each of the two frames (one
head for each, plus the row and column); the words taught at a token are those of every shape in
the cell in either frame (:func:`pair_token_words`); and a token's guided-attention weight is
the number of the pair's frames in which it holds the answer (0, 1 or 2, :func:`pair_attention`),
so that a count's targets still weigh twice the count against :data:`COUNT_SINK`. Positions are
Qwen2-VL's multimodal rotary ones (M-RoPE: time, height and width for the visual tokens), which
the model computes itself from the attention mask and ``video_grid_thw``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._argtypes import float_in, non_negative_int, positive_int
from . import synthvid
from .model import (
    ARCHS,
    DEVICE_DIR,
    EMBEDDED_DIRS,
    FRAMES_PER_TOKEN,
    SIZES,
    TEACHER_DIR,
    arch_of,
    build_model,
    build_processor,
    build_tokenizer,
    save_model,
)

__all__ = ["TrainConfig", "main", "make_batch", "pair_attention", "pair_token_words", "train"]

_N_CLASSES = 1 + len(synthvid.COLOURS) * len(synthvid.SHAPES)


class TrainConfig(argparse.Namespace):
    """Parsed ``train`` arguments (see :func:`build_parser`)."""

    steps: int
    vision_steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    aux_weight: float
    focus_weight: float
    count_focus: float
    extra_questions: int
    freeze_vision: bool
    seed: int
    out: str
    checkpoint_dir: str
    checkpoint_every: int
    resume: bool
    eval_n: int
    threads: int
    family_weights: list[float] | None
    size: str
    vision_from: str | None
    grow_from: str | None
    grow: str
    align_weight: float
    deep: bool
    domain_weights: list[float]
    mask_augment: float
    arch: str


#: How often each family is drawn in training (count, which the decoder learns last, most often;
#: attribute, which the extra questions teach too, least).
FAMILY_WEIGHTS = (1.0, 3.0, 1.2, 1.2, 0.8)


def _weights_over(names: Sequence[str], what: str) -> Any:
    """An argparse type: one non-negative weight per name of ``names``, comma-separated, not all 0."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != len(names) or min(values) < 0 or sum(values) <= 0 or not all(map(math.isfinite, values)):
            raise argparse.ArgumentTypeError(
                f"expected {len(names)} non-negative comma-separated numbers "
                f"(one per {what}: {','.join(names)}), got {text!r}"
            )
        return values

    return parse


_weights = _weights_over(synthvid.FAMILIES, "family")
_domain_weights = _weights_over(synthvid.DOMAINS, "domain")


_probability = float_in(0.0, 1.0, "a probability")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


#: The cloud teacher's recipe: the device's vision tower, fixed; the larger decoder and its own
#: projector trained on every domain, half the clips masked as an uplink masks them.
TEACHER_RECIPE = ("--size", "teacher", "--vision-steps", "0", "--steps", "800", "--lr", "1e-3", "--warmup", "50",
                  "--domains", "1,1,1", "--mask-augment", "0.5")
#: ``python -m tokensieve.zoo.train --teacher`` = these arguments.
TEACHER_ARGS = TEACHER_RECIPE + ("--grow-from", str(DEVICE_DIR), "--out", str(TEACHER_DIR),
                                 "--checkpoint-dir", "teacher-checkpoints")
#: The quality instrument's recipe: a 4-layer model grown to 16 layers, its layers spread out
#: (donor layer i becomes layer 4i, the layers between start as the identity, the guided heads
#: move with their layers), so that what the model reads from the visual tokens is read across
#: the depth, as in real LLMs, rather than in the first quarter; and the projector aligned with
#: the word embeddings, as LLaVA-style alignment pre-training aligns it.
DEEP_RECIPE = ("--size", "deep", "--vision-steps", "0", "--steps", "800", "--lr", "1e-3", "--warmup", "50",
               "--grow", "interleave", "--align-weight", "1.0")
#: ``python -m tokensieve.zoo.train --deep`` = these arguments (LLaVA-OneVision: grown from the
#: shipped device model; Qwen2-VL: give ``--grow-from`` the 4-layer model
#: ``python -m tokensieve.zoo.train --arch qwen2-vl`` wrote).
DEEP_ARGS = {"llava-onevision": DEEP_RECIPE + ("--grow-from", str(DEVICE_DIR)), "qwen2-vl": DEEP_RECIPE}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokensieve.zoo.train",
        description="Train the embedded tiny LLaVA-OneVision (or, with --arch qwen2-vl, Qwen2-VL) on synthetic "
        "video QA (CPU, from scratch).",
    )
    parser.add_argument("--vision-steps", type=int, default=500,
                        help="first, steps that train only the vision tower and projector on the per-token probe "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2700,
                        help="then, steps that train the whole model (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--aux-weight", type=float, default=0.5,
                        help="weight of the per-token losses: the projector probe and the decoder's words at "
                        "visual tokens (default: %(default)s)")
    parser.add_argument("--focus-weight", type=float, default=0.5,
                        help="weight of the attention-guidance loss (default: %(default)s)")
    parser.add_argument("--count-focus", type=_non_negative, default=4.0,
                        help="extra weight of the count questions' guidance within it: their head must "
                        "measure how much of the target there is, not just find it (default: %(default)s)")
    parser.add_argument("--extra-questions", type=non_negative_int, default=2,
                        help="more questions asked about each clip in the same conversation, after its own "
                        "(count, attribute and position questions about its other shapes; default: %(default)s)")
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the vision tower fixed after the vision-only steps; the projector still "
                        "learns (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: the package's embedded/, or embedded-qwen2-vl/ with "
                        "--arch qwen2-vl)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where checkpoints go (default: train-checkpoints, or train-checkpoints-qwen2-vl "
                        "with --arch qwen2-vl)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    parser.add_argument("--eval-n", type=int, default=200,
                        help="held-out questions answered with generate at the end (0: skip; default: %(default)s)")
    parser.add_argument("--family-weights", type=_weights, default=list(FAMILY_WEIGHTS), metavar="W,W,W,W,W",
                        help="how often each family is drawn, in the order "
                        f"{','.join(synthvid.FAMILIES)} (default: {','.join(f'{w:g}' for w in FAMILY_WEIGHTS)})")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--teacher", action="store_true",
                        help="train the cloud teacher instead: " + " ".join(TEACHER_RECIPE) + " with the shipped "
                        "device's vision tower, written to the package's teacher/ (options given too override these)")
    parser.add_argument("--deep", action="store_true",
                        help="train the 16-layer quality instrument instead: " + " ".join(DEEP_RECIPE) + ", grown from "
                        "the shipped device model (with --arch qwen2-vl, from --grow-from PATH), written to the "
                        "package's embedded model directory (options given too override these)")
    parser.add_argument("--size", choices=sorted(SIZES), default="device",
                        help="decoder size: the 4-layer device model, the 8-layer cloud teacher or the 16-layer "
                        "quality instrument (default: %(default)s)")
    parser.add_argument("--grow", choices=("append", "interleave"), default="append",
                        help="with --grow-from, where the donor's layers go: first, the new identity layers after "
                        "them ('append'), or spread evenly, donor layer i at layer i*L/L_donor ('interleave'); "
                        "the attention-guided layers move with them (default: %(default)s)")
    parser.add_argument("--align-weight", type=_non_negative, default=0.0,
                        help="weight of the projector alignment loss: 1 - cosine between each visual token that "
                        "holds a shape (the decoder's input) and the mean input embedding of its colour and shape "
                        "words, the word embeddings held fixed (default: %(default)s)")
    parser.add_argument("--grow-from", default=None, metavar="PATH",
                        help="start from the model saved in PATH (same width, fewer layers): every weight it has is "
                        "copied, the extra decoder layers start as the identity (their output projections zero); "
                        "its vision tower stays fixed. Use with --vision-steps 0")
    parser.add_argument("--vision-from", default=None, metavar="PATH",
                        help="take the vision tower from the model saved in PATH and keep it fixed (the teacher "
                        "shares the device's); use with --vision-steps 0")
    parser.add_argument("--domains", dest="domain_weights", type=_domain_weights, default=[1.0, 0.0, 0.0],
                        metavar="W,W,W",
                        help=f"how often each clip is drawn in each domain, in the order {','.join(synthvid.DOMAINS)} "
                        "(default: source only)")
    parser.add_argument("--mask-augment", type=_probability, default=0.0, metavar="P",
                        help="share of clips whose vision-tower tokens are masked as a device's uplink masks them "
                        "(UTS, the lowest-norm tokens kept, a mask ratio drawn from 0.25-0.75), so a cloud teacher "
                        "reads uplinked tokens as well as whole clips (default: %(default)s)")
    parser.add_argument("--arch", choices=ARCHS, default="llava-onevision",
                        help="architecture: the shipped LLaVA-OneVision or Qwen2-VL (M-RoPE, two frames per "
                        "visual token; --teacher, --vision-from and --mask-augment are "
                        "LLaVA-OneVision only; default: %(default)s)")
    return parser


#: Options that only the LLaVA-OneVision recipe supports (the cloud teacher and its helpers).
_LLAVA_ONLY = ("teacher", "vision_from", "mask_augment")


def _resolve(cfg: TrainConfig) -> TrainConfig:
    """Defaults that depend on ``--arch``; options the architecture does not support are refused."""
    if cfg.arch != "llava-onevision":
        used = [name for name in _LLAVA_ONLY if getattr(cfg, name, None)]
        if used:
            flags = ", ".join("--" + name.replace("_", "-") for name in used)
            raise SystemExit(f"{flags}: LLaVA-OneVision only (the cloud teacher's recipe); not with --arch {cfg.arch}")
    if cfg.grow != "append" and not cfg.grow_from:
        raise SystemExit("--grow interleave places the layers of --grow-from PATH: give it")
    if cfg.size == "deep" and not cfg.grow_from:
        raise SystemExit("--size deep is grown from a trained 4-layer model: give --grow-from PATH (for "
                         "LLaVA-OneVision, --deep takes the shipped device model)")
    if cfg.out is None:
        if cfg.size == "deep":
            cfg.out = str(EMBEDDED_DIRS[cfg.arch])
        elif cfg.arch == "llava-onevision" and cfg.size == "device":
            cfg.out = str(DEVICE_DIR)
        else:
            cfg.out = f"{cfg.arch}-{cfg.size}"
    if cfg.checkpoint_dir is None:
        cfg.checkpoint_dir = "train-checkpoints" + ("" if cfg.arch == "llava-onevision" else f"-{cfg.arch}") + (
            "" if cfg.size == "device" else f"-{cfg.size}")
    return cfg





# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def step_seeds(seed: int, step: int, batch_size: int, weights: Sequence[float] | None = None) -> list[int]:
    """Training example seeds of ``step`` (a pure function of ``(seed, step)``, all below the held-out range).

    ``weights`` (one per family of :data:`synthvid.FAMILIES`) sets how often each family is
    drawn; ``None`` draws them equally. The answer within a family stays uniform.
    """
    rng = np.random.default_rng([seed, step, 7])
    n_fam = len(synthvid.FAMILIES)
    if weights is None:
        return [int(s) for s in rng.integers(0, synthvid.HELDOUT_START, size=batch_size)]
    p = np.asarray(weights, np.float64)
    families = rng.choice(n_fam, size=batch_size, p=p / p.sum())
    bases = rng.integers(0, synthvid.HELDOUT_START // n_fam, size=batch_size)
    return [int(b) * n_fam + int(f) for b, f in zip(bases, families)]


def step_domains(seed: int, step: int, batch_size: int, weights: Sequence[float]) -> list[str]:
    """The domain of each training example of ``step`` (a pure function of ``(seed, step)``)."""
    p = np.asarray(weights, np.float64)
    if p[1:].sum() == 0:
        return ["source"] * batch_size  # the device's recipe draws nothing more from the stream
    rng = np.random.default_rng([seed, step, 11])
    return [synthvid.DOMAINS[int(i)] for i in rng.choice(len(p), size=batch_size, p=p / p.sum())]


def cell_targets(example: synthvid.Example) -> np.ndarray:
    """Per frame and cell, the class of the shape there: int64 ``[T, 16]`` (0: none, else 1 + colour·4 + shape)."""
    colours = list(synthvid.COLOURS)
    out = np.zeros((synthvid.FRAMES, synthvid.GRID * synthvid.GRID), np.int64)
    for t, row in enumerate(example.objects):
        for obj in row:
            r, c = obj.cell
            out[t, r * synthvid.GRID + c] = 1 + colours.index(obj.colour) * len(synthvid.SHAPES) + synthvid.SHAPES.index(
                obj.shape
            )
    return out


#: The place word of a cell (the two middle cells of each edge), as ``position`` answers use it.
_PLACE_OF = {cell: place for place, cells in synthvid.REST_CELLS.items() for cell in cells}

#: Words the decoder is taught to emit at each visual token that holds a shape.
TOKEN_WORDS = ("colour", "shape", "place")


def token_words(example: synthvid.Example) -> list[list[str | None]]:
    """Per visual token (frame-major, ``T·16``), the words that describe what is there.

    For a token holding a shape: its colour, its shape and its place word if the cell is the
    middle of an edge. ``None`` where a word does not apply (empty cells hold no words).
    """
    grid = synthvid.GRID
    words: list[list[str | None]] = [[None] * len(TOKEN_WORDS) for _ in range(synthvid.FRAMES * grid * grid)]
    for t, row in enumerate(example.objects):
        for obj in row:
            words[t * grid * grid + obj.cell[0] * grid + obj.cell[1]] = [obj.colour, obj.shape, _PLACE_OF.get(obj.cell)]
    return words




def pair_token_words(example: synthvid.Example) -> list[list[str | None]]:
    """Per visual token of a Qwen2-VL clip (frame pair, row, column: ``T/2·16``), the words that
    describe what is in its cell in either frame of the pair.

    ``2·len(TOKEN_WORDS)`` slots: the words of the shape in the pair's first frame (as
    :func:`token_words`), then those of the second frame's shape that the first did not already
    give (a shape that stays is named once); ``None`` elsewhere.
    """
    per_frame = token_words(example)
    cells = synthvid.GRID * synthvid.GRID
    out: list[list[str | None]] = []
    for pair in range(synthvid.FRAMES // 2):
        for cell in range(cells):
            first = per_frame[2 * pair * cells + cell]
            second = per_frame[(2 * pair + 1) * cells + cell]
            later = [w if w is not None and w not in first else None for w in second]
            out.append(list(first) + later)
    return out


def pair_attention(attend: np.ndarray) -> np.ndarray:
    """Qwen2-VL guidance weights from per-frame targets (bool ``[T·16]``, frame-major as
    :func:`attention_targets` gives them): int64 ``[T/2·16]``, per token of a frame pair, the
    number of the pair's frames (0, 1 or 2) whose cell holds a target. A count target's two-frame
    appearance weighs 2 whether it falls in one pair or straddles two."""
    cells = synthvid.GRID * synthvid.GRID
    return np.asarray(attend).reshape(-1, 2, cells).sum(1).reshape(-1).astype(np.int64)


@dataclass(frozen=True)
class Turn:
    """One question-and-answer turn of a training conversation about one clip.

    ``attend``: bool ``[T·16]``, the visual tokens that hold the answer (guidance targets);
    ``sink``: weight of the conversation's first token in the guided attention (``count`` only,
    see :func:`attention_targets`).
    """

    question: str
    answer: str
    attend: np.ndarray
    sink: float = 0.0


#: Guided-attention weight of the first token for ``count`` questions, relative to one
#: appearance-frame of the target (see :func:`attention_targets`).
COUNT_SINK = 4.0


def attention_targets(example: synthvid.Example) -> np.ndarray:
    """Visual tokens that hold the answer: bool ``[T·16]``.

    ``needle``: the brief shape; ``order``: the shape that came first; ``position``: the target
    in the last three frames; ``attribute``: the target; ``count``: the target in every frame it
    is in (each appearance lasts two frames, so the number of these tokens is twice the answer;
    the guided head shares its attention between them and the first token, in proportion
    2·count : :data:`COUNT_SINK`, so what it reads grows with the count).
    """
    name = {"needle": "needle", "order": "first", "position": "target", "attribute": "target",
            "count": "target"}[example.family]
    first = synthvid.FRAMES - 3 if example.family == "position" else 0
    return _track_tokens(example, lambda o: o.name == name, first)


def _track_tokens(example: synthvid.Example, match: Any, first: int = 0) -> np.ndarray:
    grid = synthvid.GRID
    out = np.zeros(synthvid.FRAMES * grid * grid, bool)
    for t, row in enumerate(example.objects):
        for obj in row:
            if t >= first and match(obj):
                out[t * grid * grid + obj.cell[0] * grid + obj.cell[1]] = True
    return out


def extra_turns(example: synthvid.Example, n: int) -> list[Turn]:
    """Up to ``n`` more questions about the same clip, phrased and answered exactly as the
    ``count``, ``attribute`` and ``position`` families would (a pure function of the example's
    seed).

    Asked about every shape that comes and goes in two-frame appearances as ``count`` targets do
    (these first: counting is learnt last), every shape whose colour (or kind) no other shape in
    the clip shares, and every shape that ends the clip resting on the middle of an edge for
    three frames. They cost a dozen tokens each next to the clip's 257 visual tokens, so each
    step teaches several answers.
    """
    if n <= 0:
        return []
    pairs = sorted({(o.colour, o.shape) for row in example.objects for o in row})
    colours = [c for c, _ in pairs]
    shapes = [s for _, s in pairs]
    last = example.objects[-3:]
    counts: list[Turn] = []
    others: list[Turn] = []
    for colour, shape in pairs:
        def same(o: synthvid.ObjectFrame, c: str = colour, s: str = shape) -> bool:
            return o.colour == c and o.shape == s

        tokens = _track_tokens(example, same)
        per_frame = [sum(same(o) for o in row) for row in example.objects]
        starts = [t for t in range(synthvid.FRAMES) if per_frame[t] and (t == 0 or not per_frame[t - 1])]
        # every appearance exactly two frames: each run has a second frame, and there are no more
        if (max(per_frame) == 1 and 1 <= len(starts) <= len(synthvid.NUMBERS) and sum(per_frame) == 2 * len(starts)
                and all(t + 1 < synthvid.FRAMES and per_frame[t + 1] for t in starts)):
            counts.append(Turn(f"how many times did the {colour} {shape} appear ?", synthvid.NUMBERS[len(starts) - 1],
                               tokens, COUNT_SINK))
        if shapes.count(shape) == 1:
            others.append(Turn(f"what colour is the {shape} ?", colour, tokens))
        if colours.count(colour) == 1:
            others.append(Turn(f"what shape is the {colour} object ?", shape, tokens))
        ends = [[o.cell for o in row if same(o)] for row in last]
        if all(len(e) == 1 for e in ends) and len({e[0] for e in ends}) == 1 and ends[0][0] in _PLACE_OF:
            others.append(Turn(f"where was the {colour} {shape} at the end ?", _PLACE_OF[ends[0][0]],
                               _track_tokens(example, same, synthvid.FRAMES - 3)))
    rng = np.random.default_rng([example.seed, 11])
    ordered = [group[int(i)] for group in (counts, others) for i in rng.permutation(len(group))]
    return [turn for turn in ordered if turn.question != example.question][:n]


def turns_for(example: synthvid.Example, extra: int = 0) -> list[Turn]:
    """The example's own question first (exactly as asked at inference), then :func:`extra_turns`."""
    own = Turn(example.question, example.answer, attention_targets(example),
               COUNT_SINK if example.family == "count" else 0.0)
    return [own, *extra_turns(example, extra)]


def conversation(processor: Any, turns: list[Turn]) -> str:
    """The chat text of ``turns`` (the processor's chat template): the first turn is exactly the
    inference prompt (:func:`tokensieve.zoo.model.prompt_for`) plus its answer."""
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        question = [{"type": "video"}] if i == 0 else []
        messages.append({"role": "user", "content": [*question, {"type": "text", "text": turn.question}]})
        messages.append({"role": "assistant", "content": turn.answer})
    text = processor.apply_chat_template(messages, tokenize=False)
    return text[0] if isinstance(text, list) else text


def make_batch(processor: Any, examples: list[synthvid.Example], extra: int = 0) -> dict[str, Any]:
    """Processor inputs for conversations about ``examples`` (each example's own question, then
    up to ``extra`` more, :func:`turns_for`), with their answers, plus the training targets.

    Returns the processor's tensors (left padded) and, for LLaVA-OneVision, ``position_ids``
    (mask-aware, as ``generate`` uses; Qwen2-VL computes its own 3-D ones), and per turn (``Q`` =
    most turns in the batch): ``answer_pos`` ``[B, Q]`` (the position whose next token is the
    answer word; -1 where a conversation has fewer turns), ``answer_ids`` ``[B, Q]`` (the answer
    words, -100 where none), ``attend`` ``[B, Q, N]`` and ``sink`` ``[B, Q]`` (:class:`Turn`),
    ``question_words`` ``[B, Q, L]`` (the colour and shape words of each turn's question, where
    they are in ``input_ids``); and ``cells`` ``[B, T, 16]`` and ``cell_words`` ``[B, N, K]``
    (token ids of :func:`token_words`, -100 where none).

    ``N`` is the number of visual tokens: ``T·16`` for LLaVA-OneVision (``attend`` bool, ``K`` 3);
    ``T/2·16`` for Qwen2-VL (the architecture of ``processor``), where ``attend`` holds
    :func:`pair_attention`'s weights and ``cell_words`` :func:`pair_token_words` (``K`` 6).
    """
    import torch

    arch = arch_of(processor)
    per = FRAMES_PER_TOKEN[arch]
    convs = [turns_for(e, extra) for e in examples]
    texts = [conversation(processor, turns) for turns in convs]
    batch = processor(text=texts, videos=[e.frames for e in examples], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    if arch == "llava-onevision":
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    vocab = processor.tokenizer.get_vocab()
    q = max(len(turns) for turns in convs)
    b, n = len(examples), synthvid.FRAMES // per * synthvid.GRID * synthvid.GRID
    answer_pos = torch.full((b, q), -1, dtype=torch.long)
    answer_ids = torch.full((b, q), -100, dtype=torch.long)
    attend = torch.zeros((b, q, n), dtype=torch.bool if per == 1 else torch.long)
    sink = torch.zeros((b, q))
    for i, turns in enumerate(convs):
        where = torch.nonzero(batch["input_ids"][i] == vocab["assistant"])[:, 0]
        for j, turn in enumerate(turns):
            answer_pos[i, j] = where[j]
            answer_ids[i, j] = vocab[turn.answer]
            attend[i, j] = torch.from_numpy(turn.attend if per == 1 else pair_attention(turn.attend))
            sink[i, j] = turn.sink
    input_ids = batch["input_ids"]
    content = torch.isin(input_ids, torch.tensor([vocab[w] for w in (*synthvid.COLOURS, *synthvid.SHAPES)]))
    question_words = torch.zeros((b, q, input_ids.shape[1]), dtype=torch.bool)
    for i, turns in enumerate(convs):
        starts = torch.nonzero(input_ids[i] == vocab["user"])[:, 0]  # each turn's question begins here
        for j in range(len(turns)):
            span = slice(int(starts[j]), int(answer_pos[i, j]))
            question_words[i, j, span] = content[i, span]
    batch.update(answer_pos=answer_pos, answer_ids=answer_ids, attend=attend, sink=sink,
                 question_words=question_words)
    batch["cells"] = torch.from_numpy(np.stack([cell_targets(e) for e in examples]))
    words_of = token_words if per == 1 else pair_token_words
    ids = np.array(
        [[[vocab[w] if w is not None else -100 for w in token] for token in words_of(e)] for e in examples],
        np.int64,
    )
    batch["cell_words"] = torch.from_numpy(ids)
    return batch


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class _UplinkMask:
    """Zeroes vision-tower tokens of some clips before the projector, as a device's uplink does.

    For each clip drawn (probability ``share``, from a generator seeded per step) the tokens are
    ranked by UTS's closed-form uncertainty (mean square, :func:`tokensieve.methods.uts.token_uncertainty`)
    and the lowest-ranked ``⌊(1 − r)·N⌋`` kept, ``r`` uniform in [0.25, 0.75] (``keep_low``, the
    uplink's default); the rest are zero, as the cloud receives them.
    """

    def __init__(self, model: Any, share: float) -> None:
        self.share = share
        self.clips: list[bool] = []
        self.ratios: list[float] = []
        self.hook = model.model.multi_modal_projector.register_forward_pre_hook(self._mask)

    def draw(self, seed: int, step: int, n: int) -> None:
        rng = np.random.default_rng([seed, step, 13])
        self.clips = [bool(x) for x in rng.random(n) < self.share]
        self.ratios = [float(x) for x in rng.uniform(0.25, 0.75, n)]

    def _mask(self, module: Any, args: Any) -> Any:
        import torch

        from ..methods.uts import select_tokens, token_uncertainty

        (x,) = args
        if not any(self.clips):
            return None
        b = len(self.clips)
        frames = x.shape[0] // b
        x = x.clone()
        with torch.no_grad():
            for i, (masked, ratio) in enumerate(zip(self.clips, self.ratios)):
                if not masked:
                    continue
                clip = x[i * frames : (i + 1) * frames].reshape(1, -1, x.shape[-1])
                keep = select_tokens(token_uncertainty(clip, estimator="analytic"), mask_ratio=ratio,
                                     direction="keep_low", scope="per_sample")
                x[i * frames : (i + 1) * frames] *= keep.view(frames, -1, 1).to(x.dtype)
        return (x,)


class _Probe:
    """Linear probe on the projector output, pooled 2×2 like the model pools video frames.

    For Qwen2-VL (``arch``), on the vision merger's output, one token per cell and frame pair:
    the class of the cell in the pair's first frame, in its second, and the row and column.
    """

    def __init__(self, model: Any, dim: int, seed: int, arch: str = "llava-onevision") -> None:
        import torch

        self.pairs = FRAMES_PER_TOKEN[arch] == 2
        generator = torch.Generator().manual_seed(seed + 1)
        self.head = torch.nn.Linear(dim, (2 if self.pairs else 1) * _N_CLASSES + 2 * synthvid.GRID)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.02)
            self.head.bias.zero_()
        self.features: Any = None
        where = model.model.visual.merger if self.pairs else model.model.multi_modal_projector
        self.hook = where.register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        self.features = output

    def loss(self, cells: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.pairs:
            return self._pair_loss(cells)
        x = self.features  # [B*T, 64, D]
        n, m, d = x.shape
        side = int(math.isqrt(m))
        x = x.view(n, side, side, d).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # [B*T, 16, D]
        logits = self.head(x)
        cls = cells.reshape(n, -1)
        grid = synthvid.GRID
        idx = torch.arange(grid * grid)
        rows = (idx // grid).expand(n, -1)
        cols = (idx % grid).expand(n, -1)
        loss = F.cross_entropy(logits[..., :_N_CLASSES].reshape(-1, _N_CLASSES), cls.reshape(-1))
        loss = loss + 0.25 * F.cross_entropy(logits[..., _N_CLASSES : _N_CLASSES + grid].reshape(-1, grid), rows.reshape(-1))
        loss = loss + 0.25 * F.cross_entropy(logits[..., _N_CLASSES + grid :].reshape(-1, grid), cols.reshape(-1))
        return loss

    def _pair_loss(self, cells: Any) -> Any:
        import torch
        import torch.nn.functional as F

        grid = synthvid.GRID
        b, t, m = cells.shape  # [B, T, 16]
        # merged tokens come clip by clip, then (pair, row, column): [B*T/2*16, D]
        logits = self.head(self.features).view(b, t // 2, m, -1)
        classes = cells.view(b, t // 2, 2, m).transpose(2, 3)  # [B, T/2, 16, 2]: the cell in each frame
        both = logits[..., : 2 * _N_CLASSES].reshape(-1, _N_CLASSES)  # [first, second] per token
        loss = F.cross_entropy(both, classes.reshape(-1))
        idx = torch.arange(m).expand(b, t // 2, m)
        loss = loss + 0.25 * F.cross_entropy(logits[..., 2 * _N_CLASSES : 2 * _N_CLASSES + grid].reshape(-1, grid),
                                             (idx // grid).reshape(-1))
        loss = loss + 0.25 * F.cross_entropy(logits[..., 2 * _N_CLASSES + grid :].reshape(-1, grid),
                                             (idx % grid).reshape(-1))
        return loss


def _word_loss(logits: Any, input_ids: Any, cell_words: Any, video_id: int) -> Any:
    """Cross-entropy of the language model's output at each visual token against the words
    describing what is in its cell (``cell_words`` ``[B, N, K]``, -100 where none; see
    :func:`token_words` and :func:`pair_token_words`).

    This teaches the decoder to carry "what is here" in word space at the visual positions, which
    the answer position then only has to find and copy.
    """
    import torch.nn.functional as F

    b, n, k = cell_words.shape
    visual = logits[input_ids == video_id].view(b, -1, logits.shape[-1])[:, :n].float()  # LLaVA: drop the newline
    flat = visual.unsqueeze(2).expand(b, n, k, visual.shape[-1]).reshape(-1, visual.shape[-1])
    return F.cross_entropy(flat, cell_words.reshape(-1), ignore_index=-100)


def _align_loss(embeds: Any, input_ids: Any, cell_words: Any, video_id: int, word_embeddings: Any,
                frames_per_token: int = 1) -> Any:
    """Projector alignment: mean over visual tokens that hold a shape of ``1 - cos(x, w̄)``.

    ``embeds`` ``[B, L, D]`` is the decoder's input (the projector's output at the visual
    positions); ``w̄`` the mean input embedding of the token's colour and shape words (slots 0
    and 1 of each frame's :data:`TOKEN_WORDS` in ``cell_words``), held fixed, as alignment
    pre-training keeps the language model's embeddings fixed and moves the projector.
    """
    import torch
    import torch.nn.functional as F

    b, n, k = cell_words.shape
    visual = embeds[input_ids == video_id].view(b, -1, embeds.shape[-1])[:, :n].float()  # LLaVA: drop the newline
    per = len(TOKEN_WORDS)
    slots = [f * per + j for f in range(frames_per_token) for j in (0, 1)]
    ids = cell_words[..., slots]  # [B, n, S]
    valid = ids != -100
    table = word_embeddings.detach().float()
    vecs = table[ids.clamp(min=0)] * valid.unsqueeze(-1)
    counts = valid.sum(-1)
    held = counts > 0
    if not bool(held.any()):
        return embeds.new_zeros(())
    target = vecs.sum(-2)[held] / counts[held].unsqueeze(-1)
    return (1 - F.cosine_similarity(visual[held], target, dim=-1)).mean()


#: Decoder layers (and the one head in each) whose attention from the answer position is guided.
GUIDED_LAYERS = (1, 2, 3)
GUIDED_HEAD = 0
#: The head guided for ``count`` questions instead: reading "how much of the target is there"
#: wants a value that is the same for every kind of shape, while copying a colour or shape
#: out of the target (every other family) wants the opposite, so one head cannot serve both.
COUNT_HEAD = 1
#: The head of the first decoder layer that brings the question's colour and shape words to the
#: answer position, so the guided heads above can look for both at once (left alone, the first
#: layer brings only the colour word of "the red circle", and counting then matches every red
#: shape).
QUESTION_HEAD = 0


def _attention_loss(attentions: Any, batch: dict[str, Any], video_id: int, count_weight: float = 1.0,
                    place: Sequence[int] | None = None) -> Any:
    """Guidance for head :data:`GUIDED_HEAD` of the :data:`GUIDED_LAYERS`, from each turn's
    answer position (turns without targets are skipped), plus head :data:`QUESTION_HEAD` of the
    first layer.

    Without a sink weight: ``-log`` of the attention mass on the tokens holding the answer.
    With one (``count``, guided on :data:`COUNT_HEAD`, weighted ``count_weight``): the
    cross-entropy of the attention against the distribution that gives each target token its
    weight in ``attend`` (1; on Qwen2-VL, the number of the token's two frames that hold the
    target) and the first token weight ``sink``, so the share read from the targets encodes how
    many there are. In the first layer: the cross-entropy against an even spread over the turn's
    colour and shape words (``question_words``; turns without any are skipped). Speeds up
    learning where to look. ``place`` maps those layer numbers onto a grown model's
    (:func:`grown_layers`; ``None``: unchanged).
    """
    import torch

    attend, sink, pos = batch["attend"], batch["sink"], batch["answer_pos"]
    valid = (pos >= 0) & attend.any(-1)
    if not bool(valid.any()):
        return attentions[0].new_zeros(())
    b, q, n = attend.shape
    # [B, n] positions of the visual tokens (LLaVA-OneVision's newline after them dropped)
    visual = torch.nonzero(batch["input_ids"] == video_id)[:, 1].view(b, -1)[:, :n]
    first = batch["attention_mask"].long().argmax(-1)  # first real token (left padding)
    weights = attend.float()  # Qwen2-VL: how many of the token's two frames hold the answer
    held = (weights > 0).float()
    total_weight = weights.sum(-1) + sink
    heads = torch.where(sink > 0, COUNT_HEAD, GUIDED_HEAD)  # [B, Q]
    batch_index = torch.arange(b).unsqueeze(-1)
    total = attentions[0].new_zeros(())
    at = (lambda i: i) if place is None else (lambda i: place[i])
    for layer in (at(g) for g in GUIDED_LAYERS):
        rows = attentions[layer][batch_index, heads, pos.clamp(min=0)]  # [B, Q, L]: each turn's guided head
        vis = rows.gather(2, visual.unsqueeze(1).expand(b, q, n)).clamp_min(1e-6)
        at_first = rows.gather(2, first.view(b, 1, 1).expand(b, q, 1)).squeeze(-1).clamp_min(1e-6)
        plain = -torch.log((vis * held).sum(-1).clamp_min(1e-6))
        spread = -((weights * vis.log()).sum(-1) + sink * at_first.log()) / total_weight.clamp_min(1e-6)
        total = total + torch.where(sink > 0, count_weight * spread, plain)[valid].mean()
    total = total / len(GUIDED_LAYERS)
    words = batch["question_words"].float()  # [B, Q, L]
    asks = (pos >= 0) & (words.sum(-1) > 0)
    if bool(asks.any()):
        length = attentions[0].shape[-1]
        rows = attentions[at(0)][:, QUESTION_HEAD].gather(1, pos.clamp(min=0).unsqueeze(-1).expand(b, q, length))
        spread = -(words * rows.clamp_min(1e-6).log()).sum(-1) / words.sum(-1).clamp_min(1)
        total = total + spread[asks].mean()
    return total


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step``: linear warm-up within each stage, then cosine decay over the second."""
    if step < cfg.vision_steps:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    step -= cfg.vision_steps
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def _checkpoint(cfg: TrainConfig, directory: Path, done: int, model: Any, probe: _Probe, optimizer: Any) -> None:
    """Save a checkpoint after step ``done`` when due (every ``--checkpoint-every`` steps and at the end)."""
    import torch

    total = cfg.vision_steps + cfg.steps
    if cfg.checkpoint_every <= 0 or not (done % cfg.checkpoint_every == 0 or done == total):
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{done}.pt"
    torch.save(
        {"model": model.state_dict(), "probe": probe.head.state_dict(), "optimizer": optimizer.state_dict(),
         "step": done, "config": vars(cfg)},
        path,
    )
    for old in directory.glob("step-*.pt"):
        if old != path:
            old.unlink()


def grown_layers(donor_layers: int, layers: int, how: str = "append") -> list[int]:
    """Where each of a donor's ``donor_layers`` decoder layers goes in a grown ``layers``-layer model.

    ``"append"``: in place (``0..donor_layers-1``), the new layers after them. ``"interleave"``:
    spread evenly, donor layer ``i`` at ``⌊i·layers/donor_layers⌋`` (4 into 16: 0, 4, 8, 12).
    """
    if donor_layers > layers:
        raise SystemExit(f"--grow-from: the donor has {donor_layers} decoder layers, more than this model's {layers}")
    if how == "append":
        return list(range(donor_layers))
    if how == "interleave":
        return [i * layers // donor_layers for i in range(donor_layers)]
    raise SystemExit(f"--grow: expected 'append' or 'interleave', got {how!r}")


def _grow(model: Any, path: str, how: str = "append") -> list[int]:
    """Copy every weight of the model saved in ``path`` into ``model`` (same width, at least as many
    decoder layers, placed as :func:`grown_layers` says); the layers it lacks become the identity
    (attention and MLP output projections zero, so each adds nothing to the residual stream until
    it learns to). Returns the placement."""
    import re

    import torch

    from .model import load_model

    donor, _ = load_model(path)
    place = grown_layers(donor.config.text_config.num_hidden_layers, model.config.text_config.num_hidden_layers, how)
    pattern = re.compile(r"(\.language_model\.layers\.)(\d+)(\.)")

    def moved(key: str) -> str:
        return pattern.sub(lambda m: f"{m.group(1)}{place[int(m.group(2))]}{m.group(3)}", key)

    have = {moved(k): v for k, v in donor.state_dict().items()}
    own = model.state_dict()
    missing = [k for k in have if k not in own or own[k].shape != have[k].shape]
    if missing:
        raise SystemExit(f"--grow-from {path}: its weights do not fit this model (e.g. {missing[0]})")
    with torch.no_grad():
        for k, v in have.items():
            own[k].copy_(v)
        for i, layer in enumerate(model.model.language_model.layers):
            if i not in place:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return place


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the output directory."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg.threads)
    cfg = _resolve(cfg)
    qwen = cfg.arch == "qwen2-vl"
    tokenizer = build_tokenizer(arch=cfg.arch)
    processor = build_processor(tokenizer, arch=cfg.arch)
    model = build_model(cfg.seed, tokenizer, cfg.size, arch=cfg.arch)
    place = list(range(model.config.text_config.num_hidden_layers))
    if cfg.grow_from:
        place = _grow(model, cfg.grow_from, cfg.grow)
        cfg.freeze_vision = True
        if cfg.vision_steps:
            raise SystemExit("--grow-from starts from a trained model: use it with --vision-steps 0")
    if cfg.vision_from:
        from .model import load_model

        donor, _ = load_model(cfg.vision_from)
        model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
        del donor
        cfg.freeze_vision = True
        if cfg.vision_steps:
            raise SystemExit("--vision-from takes a trained vision tower: use it with --vision-steps 0")
    model.set_attn_implementation("eager")  # attention probabilities for the guidance loss
    model.train()
    probe = _Probe(model, model.config.text_config.hidden_size, cfg.seed, cfg.arch)
    masker = _UplinkMask(model, cfg.mask_augment) if cfg.mask_augment > 0 else None
    params = list(model.parameters()) + list(probe.head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    ckpt_dir = Path(cfg.checkpoint_dir)
    start = 0
    if cfg.resume:
        latest = _latest_checkpoint(ckpt_dir)
        if latest is not None:
            state = torch.load(latest, map_location="cpu", weights_only=False)
            saved_arch = state.get("config", {}).get("arch", "llava-onevision")
            if saved_arch != cfg.arch:
                raise SystemExit(f"--resume: {latest} is a {saved_arch} checkpoint, not {cfg.arch}")
            model.load_state_dict(state["model"])
            probe.head.load_state_dict(state["probe"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
            print(f"resumed from {latest} (step {start})", file=sys.stderr)

    def optimise(loss: Any, done: int) -> None:
        """One optimiser step on ``loss``, then the checkpoint after ``done`` steps if one is due."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _checkpoint(cfg, ckpt_dir, done, model, probe, optimizer)

    video_id = int(model.config.video_token_id if qwen else model.config.video_token_index)
    end_id = int(processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    total = cfg.vision_steps + cfg.steps
    bar = tqdm(range(start, total), total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    ema_loss, ema_acc = None, None
    family_acc: dict[str, float | None] = dict.fromkeys(synthvid.FAMILIES)
    began = time.perf_counter()
    for step in bar:
        seeds = step_seeds(cfg.seed, step, cfg.batch_size, cfg.family_weights)
        domains = step_domains(cfg.seed, step, cfg.batch_size, cfg.domain_weights)
        examples = [synthvid.make_example(s, domain=d) for s, d in zip(seeds, domains)]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if masker is not None:
            masker.draw(cfg.seed, step, len(examples))
        if step < cfg.vision_steps:
            # Stage 1: the vision tower and projector alone learn what each token holds.
            pixels = processor.video_processor(videos=[e.frames for e in examples], return_tensors="pt")
            if qwen:
                model.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"])
            else:
                model.model.get_video_features(
                    pixels["pixel_values_videos"], vision_feature_layer=model.config.vision_feature_layer,
                    vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                )
            cells = torch.from_numpy(np.stack([cell_targets(e) for e in examples]))
            aux = probe.loss(cells)
            optimise(aux, step + 1)
            bar.set_postfix(stage="vision", probe=f"{float(aux.detach()):.3f}")
            continue
        if step == max(start, cfg.vision_steps):
            if qwen:  # the tower's patch embedding and blocks; its merger is the projector, and learns
                model.model.visual.requires_grad_(not cfg.freeze_vision)
                model.model.visual.merger.requires_grad_(True)
            else:
                model.model.vision_tower.requires_grad_(not cfg.freeze_vision)
        batch = make_batch(processor, examples, cfg.extra_questions)
        if qwen:
            # no position_ids: the model computes its 3-D (M-RoPE) ones from the mask and the grid
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                pixel_values_videos=batch["pixel_values_videos"],
                video_grid_thw=batch["video_grid_thw"],
                output_attentions=True,
                output_hidden_states=cfg.align_weight > 0,
            )
        else:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                pixel_values_videos=batch["pixel_values_videos"],
                output_attentions=True,
                output_hidden_states=cfg.align_weight > 0,
            )
        pos, targets = batch["answer_pos"].clamp(min=0), batch["answer_ids"]
        asked = targets != -100
        rows = torch.arange(len(examples)).unsqueeze(-1)
        logits = out.logits[rows, pos].float()  # [B, Q, V] predicting each answer word
        ends = out.logits[rows, pos + 1].float()[asked]  # ... and the end of its turn
        # summed over the two tokens, so the answer word weighs as much as each auxiliary loss
        answer_loss = F.cross_entropy(logits[asked], targets[asked]) + F.cross_entropy(
            ends, ends.new_full((ends.shape[0],), end_id, dtype=torch.long)
        )
        aux = probe.loss(batch["cells"])
        words = _word_loss(out.logits, batch["input_ids"], batch["cell_words"], video_id)
        focus = _attention_loss(out.attentions, batch, video_id, cfg.count_focus, place)
        loss = answer_loss + cfg.aux_weight * (aux + words) + cfg.focus_weight * focus
        if cfg.align_weight > 0:
            align = _align_loss(out.hidden_states[0], batch["input_ids"], batch["cell_words"], video_id,
                                model.get_input_embeddings().weight, FRAMES_PER_TOKEN[cfg.arch])
            loss = loss + cfg.align_weight * align
        optimise(loss, step + 1)
        hits = (logits[:, 0].argmax(-1) == targets[:, 0]).tolist()  # each example's own question
        for example, hit in zip(examples, hits):
            old = family_acc[example.family]
            family_acc[example.family] = float(hit) if old is None else 0.98 * old + 0.02 * float(hit)
        acc = float(np.mean(hits))
        value = float(answer_loss.detach())
        ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        shown = {"loss": f"{ema_loss:.3f}", "words": f"{float(words.detach()):.3f}", "acc": f"{ema_acc:.3f}"}
        if cfg.align_weight > 0:
            shown["align"] = f"{float(align.detach()):.3f}"
        bar.set_postfix(shown)
        if (step + 1) % 100 == 0:
            per_family = " ".join(f"{f}={a:.2f}" for f, a in family_acc.items() if a is not None)
            bar.write(f"step {step + 1}: answer loss {ema_loss:.3f}, running accuracy {ema_acc:.3f} ({per_family})",
                      file=sys.stderr)
    bar.close()
    probe.hook.remove()
    if masker is not None:
        masker.hook.remove()
    model.set_attn_implementation("sdpa")
    model.eval()
    out_dir = save_model(model, processor, cfg.out)
    elapsed = time.perf_counter() - began
    print(f"trained {total - start} steps in {elapsed / 60:.1f} min; wrote {out_dir}", file=sys.stderr)
    if cfg.eval_n > 0:
        from .evaluate import evaluate_dir

        evaluate_dir(out_dir, cfg.eval_n)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--teacher" in argv:  # the recipe first, so that options given on the command line override it
        argv = list(TEACHER_ARGS) + argv
    if "--deep" in argv:
        arch = build_parser().parse_known_args(argv)[0].arch
        argv = list(DEEP_ARGS[arch]) + argv
    cfg = _resolve(build_parser().parse_args(argv, namespace=TrainConfig()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
