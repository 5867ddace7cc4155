"""What a perfect token choice would keep: an oracle that knows where the answer is.

The quality bench asks how much accuracy a method keeps at a budget. When the best method falls
short of uncompressed, is the method choosing the wrong tokens, or does the model lose accuracy
with *any* pruned sequence at that budget? This script answers it with an oracle selector that
reads the generator's ground truth: in every frame it keeps the cells the question is about
(``Example.focus``: the needle, every appearance of the counted shape, the two shapes whose order
is asked, ...) first, then fills the frame's budget with evenly spaced other cells — the same
per-frame counts as ``uniform`` and the methods' exact budgets. It is registered as a method in
this process only and runs through the real runtime, with the positions the bench uses.

On Qwen2-VL a token covers two frames: its focus is the union of both frames' focus cells.

    python benchmarks/quality/oracle.py --model embedded --positions preserve --out benchmarks/quality/llava
    python benchmarks/quality/oracle.py --model embedded-qwen2-vl --positions preserve --out benchmarks/quality/qwen2-vl

Writes ``oracle.json`` and ``oracle.md`` (accuracy per family at each retain, next to uncompressed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retain", default="0.5,0.25,0.15,0.1")
    parser.add_argument("--positions", choices=("preserve", "compact"), default="preserve")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import tokensieve
    from tokensieve.bench.quality import evaluate_configs, load_for_bench, parse_retains
    from tokensieve.methods import MethodSpec, register
    from tokensieve.methods.base import Selection, SegmentContext, check_segment
    from tokensieve.methods.baselines import evenly_spaced
    from tokensieve.methods.budget import frame_budget
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import FRAMES_PER_TOKEN, arch_of, prompt_for, structural_video_tokens, video_token_of

    torch.set_num_threads(2)
    model, processor = load_for_bench(args.model)
    per_token = FRAMES_PER_TOKEN[arch_of(model)]
    video_id = video_token_of(model)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(args.n, args.seed)]
    grid = synthvid.GRID

    # Each example's visual tokens as the selector will see them (the decoder's input at the
    # video positions), to recognise which example a segment belongs to: the mean token is a
    # fingerprint; matching is nearest-neighbour with a checked margin.
    prints = []
    with torch.inference_mode():
        for e in examples:
            inputs = processor(text=[prompt_for(processor, e.question)], videos=[e.frames], return_tensors="pt")
            hidden = model(**inputs, output_hidden_states=True).hidden_states[0][0]
            f = hidden[inputs["input_ids"][0] == video_id].float()
            prints.append(f[: f.shape[0] - structural_video_tokens(model)].mean(0))
    prints_t = torch.stack(prints)

    focus_cells: list[list[set[int]]] = []  # per example, per token frame: focus cell indices
    for e in examples:
        frames = []
        for t in range(len(e.frames) // per_token):
            cells: set[int] = set()
            for k in range(per_token):
                cells |= {r * grid + c for r, c in e.focus[t * per_token + k]}
            frames.append(cells)
        focus_cells.append(frames)

    @dataclass
    class Oracle:
        def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
            T, M, _ = check_segment(x)
            d = torch.cdist(x.float().mean((0, 1)).unsqueeze(0), prints_t)[0]
            best, second = torch.topk(d, 2, largest=False).values.tolist()
            if not best < 1e-3 * max(1.0, float(prints_t.norm(dim=-1).mean())) or not second > 10 * best:
                raise RuntimeError(f"oracle: cannot tell which example this segment is (distances {best}, {second})")
            idx = int(torch.argmin(d))
            k, weights = frame_budget(x, retain, "uniform")
            parts = []
            for t in range(T):
                want = int(k[t])
                first = sorted(focus_cells[idx][t])[:want]
                rest = [j for j in evenly_spaced(M, M).tolist() if j not in first]
                # fill with evenly spaced others
                fill = [rest[int(i)] for i in evenly_spaced(len(rest), want - len(first)).tolist()] if want > len(first) else []
                parts.append(torch.tensor(sorted(first + fill), dtype=torch.long) + t * M)
            return Selection(keep=torch.cat(parts), frame_counts=k, frame_weights=weights)

    register(MethodSpec(name="oracle", stage="pre-llm", summary="keeps the cells the question is about first",
                        factory=Oracle, default_positions={"1d": args.positions, "mrope": args.positions}))
    retains = parse_retains(args.retain)
    configs = [("none", 1.0)] + [("oracle", r) for r in retains] + [("uniform", r) for r in retains]
    rows = evaluate_configs(model, processor, examples, configs, positions=args.positions)
    base = rows[0]["scores"]
    lines = [f"# Oracle token choice (`{args.model}`, positions `{args.positions}`)", "",
             f"`python benchmarks/quality/oracle.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"{len(examples)} held-out questions (set {args.seed}). The oracle keeps, per frame, the cells the "
             "question is about first, then evenly spaced others, with `uniform`'s per-frame counts "
             "(shown beside it).", "",
             "| method | retain | accuracy % | kept vs uncompressed % | " + " | ".join(f"{f} %" for f in synthvid.FAMILIES) + " |",
             "|---|---|---|---|" + "---|" * len(synthvid.FAMILIES)]
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['method']} | {r['retain']:g} | {100 * s['accuracy']:.1f} | "
                     f"{100 * s['accuracy'] / base['accuracy']:.1f} | "
                     + " | ".join(f"{100 * s['families'][f]['accuracy']:.1f}" for f in synthvid.FAMILIES) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "oracle.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in rows],
                                                    indent=2) + "\n")
        (out / "oracle.md").write_text(md)
    _ = tokensieve
    return 0


if __name__ == "__main__":
    sys.exit(main())
