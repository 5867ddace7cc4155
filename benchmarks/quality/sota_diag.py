"""Where FlashVID, FastVID and HoliTom lose accuracy on the embedded models: the merge or the choice.

Each method runs three ways through the real runtime, at the same exact budgets:

* as shipped (its default options);
* ``raw-`` — the same kept positions, but every kept token keeps its own features (the
  method's averaging/merging switched off): the difference is what merging costs or buys;
* ``flat-`` — the attention signal it weighs or ranks by replaced by a constant (every token
  equal), everything else unchanged: the difference is what the attention signal buys.

The wrappers are registered in this process only.

    python benchmarks/quality/sota_diag.py --model embedded --out benchmarks/quality/llava/sota
    python benchmarks/quality/sota_diag.py --model embedded-qwen2-vl --out benchmarks/quality/qwen2-vl/sota

Writes ``diag.json`` and ``diag.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

METHODS = ("flashvid", "fastvid", "holitom")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retain", default="0.25,0.1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import tokensieve
    from tokensieve.bench.quality import evaluate_configs, load_for_bench, parse_retains
    from tokensieve.methods import MethodSpec, register
    from tokensieve.methods.base import SegmentContext, Selection
    from tokensieve.zoo import synthvid

    torch.set_num_threads(2)
    model, processor = load_for_bench(args.model)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(args.n, args.seed)]

    def wrapper(name: str, mode: str) -> Any:
        spec = tokensieve.methods.get(name)

        class Wrapped:
            def __init__(self) -> None:
                self.inner = spec.create()
                self.needs_text, self.needs_encoder_attention = spec.signals(self.inner)

            def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
                if mode == "flat" and context is not None:
                    ones = torch.ones(x.shape[0], x.shape[1])
                    context = dataclasses.replace(context, encoder_attention=ones, encoder_received=ones)
                elif mode == "flat":
                    ones = torch.ones(x.shape[0], x.shape[1])
                    context = SegmentContext(encoder_attention=ones, encoder_received=ones)
                sel = self.inner.select(x, retain, context)
                if mode == "raw":
                    sel = dataclasses.replace(sel, features=None)
                return sel

        return Wrapped

    for name in METHODS:
        for mode in ("raw", "flat"):
            register(MethodSpec(name=f"{mode}-{name}", stage="pre-llm", summary=f"{name}, {mode}",
                                factory=wrapper(name, mode),
                                default_positions=tokensieve.methods.get(name).default_positions))
    retains = parse_retains(args.retain)
    configs = [("none", 1.0)] + [(f"{p}{m}", r) for m in METHODS for p in ("", "raw-", "flat-") for r in retains]
    rows = evaluate_configs(model, processor, examples, configs)
    base = rows[0]["scores"]
    lines = [f"# FlashVID, FastVID, HoliTom: merge or choice? (`{args.model}`)", "",
             f"`python benchmarks/quality/sota_diag.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"{len(examples)} held-out questions (set {args.seed}); one standard error is about "
             f"{100 * (0.25 / len(examples)) ** 0.5:.1f} points. `raw-` keeps the method's positions with "
             "their own features (no merging); `flat-` gives the method a constant attention signal.", "",
             "| method | retain | accuracy % | kept vs uncompressed % | " + " | ".join(f"{f} %" for f in synthvid.FAMILIES) + " |",
             "|---|---|---|---|" + "---|" * len(synthvid.FAMILIES)]
    for r in rows:
        s = r["scores"]
        if s is None:
            raise SystemExit(f"{r['method']} at {r['retain']}: {r['error']}")
        lines.append(f"| {r['method']} | {r['retain']:g} | {100 * s['accuracy']:.1f} | "
                     f"{100 * s['accuracy'] / base['accuracy']:.1f} | "
                     + " | ".join(f"{100 * s['families'][f]['accuracy']:.1f}" for f in synthvid.FAMILIES) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diag.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in rows],
                                                  indent=2) + "\n")
        (out / "diag.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
