"""Answer synthetic video questions with ``model.generate`` and score them.

Every question goes through the processor's chat template and greedy ``generate`` exactly as a
user would run it, so a model patched by :func:`tokensieve.compress` is measured through the
real runtime.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import synthvid
from .model import load_model, prompt_for

__all__ = ["Scores", "answer", "answer_prepared", "blank_frames", "evaluate_dir", "iter_batches", "prepare", "score"]


def blank_frames(example: synthvid.Example) -> np.ndarray:
    """A mid-grey clip of the example's shape: the video-blind control."""
    return np.full_like(example.frames, 128)


def prepare(
    processor: Any, examples: Sequence[synthvid.Example], *, batch_size: int = 16, blank: bool = False
) -> list[Any]:
    """Processor inputs for ``examples`` in batches of ``batch_size`` (chat template, left padding).

    ``blank`` replaces every clip by :func:`blank_frames`. Prepared batches can be answered
    several times (e.g. once per compression method) with :func:`answer_prepared`.
    """
    return list(iter_batches(processor, examples, batch_size=batch_size, blank=blank))


def iter_batches(
    processor: Any, examples: Sequence[synthvid.Example], *, batch_size: int = 16, blank: bool = False
) -> Iterator[Any]:
    """:func:`prepare`'s batches one at a time (only one batch's pixels held at once)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [prompt_for(processor, e.question) for e in chunk]
        videos = [blank_frames(e) if blank else e.frames for e in chunk]
        yield processor(text=prompts, videos=videos, return_tensors="pt", padding=True)


def answer_prepared(
    model: Any,
    processor: Any,
    batches: Sequence[Any],
    *,
    max_new_tokens: int = 2,
    on_batch: Callable[[int, Any], None] | None = None,
) -> list[str]:
    """Greedy answers (decoded text) to prepared batches, in order.

    ``on_batch(n, model)`` runs after each batch with its size (for progress bars and for
    reading ``tokensieve.stats(model)``).
    """
    import torch

    out: list[str] = []
    for inputs in batches:
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1] :]
        out.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(int(inputs["input_ids"].shape[0]), model)
    return out


def answer(
    model: Any,
    processor: Any,
    examples: Sequence[synthvid.Example],
    *,
    batch_size: int = 16,
    blank: bool = False,
    max_new_tokens: int = 2,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers (decoded text) to ``examples``, ``batch_size`` at a time (left padded).

    ``blank`` replaces every clip by :func:`blank_frames`. ``on_batch(n)`` is called after each
    batch with the number of questions it answered (for progress bars).
    """
    batches = prepare(processor, examples, batch_size=batch_size, blank=blank)
    callback = (lambda n, _model: on_batch(n)) if on_batch is not None else None
    return answer_prepared(model, processor, batches, max_new_tokens=max_new_tokens, on_batch=callback)


@dataclass
class Scores:
    """Accuracy of a set of answers, overall and per family."""

    n: int
    correct: int
    per_family: dict[str, tuple[int, int]] = field(default_factory=dict)  # family -> (correct, n)
    chance: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def family_accuracy(self, family: str) -> float:
        c, n = self.per_family.get(family, (0, 0))
        return c / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": round(self.accuracy, 4),
            "chance": round(self.chance, 4),
            "families": {
                f: {"n": n, "correct": c, "accuracy": round(c / n, 4) if n else None}
                for f, (c, n) in self.per_family.items()
            },
        }


def score(examples: Sequence[synthvid.Example], answers: Iterable[str]) -> Scores:
    """Exact-match scores of ``answers`` against ``examples``."""
    per: dict[str, list[int]] = {f: [0, 0] for f in synthvid.FAMILIES}
    correct = 0
    n = 0
    for example, text in zip(examples, answers):
        ok = synthvid.check_answer(example, text)
        per[example.family][0] += int(ok)
        per[example.family][1] += 1
        correct += int(ok)
        n += 1
    return Scores(
        n=n,
        correct=correct,
        per_family={f: (c, m) for f, (c, m) in per.items() if m},
        chance=synthvid.chance_level(list(examples)),
    )


def evaluate_dir(path: str | Path, n: int = 1000, seed: int = 0, batch_size: int = 25) -> dict[str, Any]:
    """Score the model in ``path`` (either architecture of :mod:`tokensieve.zoo.model`) on ``n``
    held-out questions, with the real and with blank clips; prints a summary."""
    from tqdm.auto import tqdm

    model, processor = load_model(path)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(n, seed)]
    result: dict[str, Any] = {"model": str(path), "heldout_seed": seed}
    began = time.perf_counter()
    for label, blank in (("video", False), ("blank", True)):
        with tqdm(total=len(examples), desc=f"eval ({label})", unit="q", dynamic_ncols=True) as bar:
            answers = answer(model, processor, examples, batch_size=batch_size, blank=blank, on_batch=bar.update)
        result[label] = score(examples, answers).as_dict()
    result["seconds"] = round(time.perf_counter() - began, 1)
    for label in ("video", "blank"):
        s = result[label]
        fams = ", ".join(f"{f} {v['accuracy']:.3f}" for f, v in s["families"].items())
        print(f"{label}: accuracy {s['accuracy']:.3f} (chance {s['chance']:.3f}) | {fams}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m tokensieve.zoo.evaluate [PATH] [--arch ARCH] [--n N] [--seed S] [--json FILE]``."""
    import argparse
    import json

    from .model import ARCHS, EMBEDDED_DIRS

    parser = argparse.ArgumentParser(prog="python -m tokensieve.zoo.evaluate",
                                     description="Held-out accuracy of a synthetic-video model (and its blank-video control).")
    parser.add_argument("path", nargs="?", default=None,
                        help="a saved model directory (LLaVA-OneVision or Qwen2-VL; default: the package's embedded "
                        "model of --arch)")
    parser.add_argument("--arch", choices=ARCHS, default="llava-onevision",
                        help="whose embedded model to score when no PATH is given (default: %(default)s)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    path = args.path if args.path is not None else str(EMBEDDED_DIRS[args.arch])
    result = evaluate_dir(path, args.n, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
