"""What the embedded model answers to one question family under one compression method.

``python benchmarks/quality/answers.py [--family order] [--method vidcom2] [--retain 0.25]
[-o KEY=VALUE ...] [--n 500]`` takes the questions of ``--family`` among the first ``--n``
held-out questions (set 0, as ``tokensieve bench quality`` uses), answers them with the method
installed (``--method none``: uncompressed; ``-o``: the method's options, as ``tokensieve run``
takes them) and prints how many are right and which words were answered. For ``order`` it also
counts answers that name the other named shape, or neither.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter

import tokensieve
from tokensieve.cli import _option
from tokensieve.zoo import synthvid
from tokensieve.zoo.evaluate import answer
from tokensieve.zoo.model import load_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="order", choices=synthvid.FAMILIES)
    parser.add_argument("--method", default="vidcom2")
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", type=_option)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    model, processor = load_embedded()
    examples = [e for e in map(synthvid.make_example, synthvid.heldout_seeds(args.n, 0)) if e.family == args.family]
    options = dict(args.option)
    method = (contextlib.nullcontext() if args.method == "none"
              else tokensieve.compress(model, args.method, retain=args.retain, **options))
    with method:
        answers = [synthvid.normalise_answer(text) for text in answer(model, processor, examples, batch_size=25)]
    right = sum(word == example.answer for word, example in zip(answers, examples))
    setting = "uncompressed" if args.method == "none" else f"{args.method} at retain {args.retain}" + (
        f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
    print(f"{setting}, {len(examples)} {args.family} questions: right {right}")
    print("answered: " + ", ".join(f"{word} {n}" for word, n in Counter(answers).most_common()))
    if args.family == "order":
        other = sum(word != example.answer and word in example.options for word, example in zip(answers, examples))
        print(f"the other named shape {other}, neither {len(examples) - right - other}")


if __name__ == "__main__":
    main()
