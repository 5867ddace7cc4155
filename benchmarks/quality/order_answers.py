"""What the embedded model answers to ``order`` questions under one compression method.

``python benchmarks/quality/order_answers.py [--method vidcom2] [--retain 0.25] [--n 500]``
takes the ``order`` questions among the first ``--n`` held-out questions (set 0, as
``visiontrim bench quality`` uses) and counts answers that name the right shape, the other
named shape, or neither.
"""

from __future__ import annotations

import argparse
from collections import Counter

import visiontrim
from visiontrim.zoo import synthvid
from visiontrim.zoo.evaluate import answer
from visiontrim.zoo.model import load_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="vidcom2")
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    model, processor = load_embedded()
    examples = [e for e in map(synthvid.make_example, synthvid.heldout_seeds(args.n, 0)) if e.family == "order"]
    with visiontrim.compress(model, args.method, retain=args.retain):
        answers = answer(model, processor, examples, batch_size=25)
    counts: Counter[str] = Counter()
    for example, text in zip(examples, answers):
        word = synthvid.normalise_answer(text)
        other = next(s for s in example.options if s != example.answer)
        counts["right" if word == example.answer else "other named shape" if word == other else "neither"] += 1
    print(f"{args.method} at retain {args.retain}, {len(examples)} order questions: " +
          ", ".join(f"{k} {counts[k]}" for k in ("right", "other named shape", "neither")))


if __name__ == "__main__":
    main()
