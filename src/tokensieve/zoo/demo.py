"""``tokensieve demo``: the embedded video model, uncompressed and compressed, offline.

Loads the model shipped in the package (a tiny LLaVA-OneVision trained on synthetic video QA),
makes a held-out question set, answers it uncompressed and with several methods at several
retain ratios (greedy ``generate`` after the chat template, through the real runtime), and
prints one table: accuracy, accuracy kept vs uncompressed, visual tokens, prefill time and
speed-up. Writes ``report.html`` with the table and, for one example question, each frame
with the kept visual tokens highlighted and the per-frame budgets (one PNG per method and
retain ratio), plus ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence


__all__ = ["add_arguments", "kept_by_frame", "run", "run_demo"]

DEFAULT_METHODS = ("vidcom2", "lftr", "dycoke", "random")
DEFAULT_RETAINS = (0.25, 0.1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", metavar="embedded|PATH",
                        help="the embedded model or a directory of a model trained the same way (default: %(default)s)")
    parser.add_argument("--n", type=int, default=200, help="held-out questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="held-out set number (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods, or 'all' (default: %(default)s)")
    parser.add_argument("--retain", default=",".join(f"{r:g}" for r in DEFAULT_RETAINS),
                        help="comma-separated retain ratios in (0, 1] (default: %(default)s)")
    parser.add_argument("--out", default="tokensieve-demo", help="directory for report.html, PNGs and results.json "
                        "(default: %(default)s)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html and the pictures")
    parser.add_argument("--batch-size", type=int, default=25, help="questions per generate call (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def kept_by_frame(input_ids: Any, keep: Any, video_token_id: int, frames: int, per_frame: int) -> list[list[int]]:
    """Per frame, the kept token indices (raster order within the frame) of the one video in ``input_ids`` ``[L]``.

    ``keep`` holds the kept sequence positions (``tokensieve.stats(model).keep[b]``); ``None``
    means everything was kept.
    """
    import torch

    positions = torch.nonzero(input_ids == video_token_id).flatten().tolist()
    kept = set(range(len(positions))) if keep is None else set()
    if keep is not None:
        index = {p: i for i, p in enumerate(positions)}
        kept = {index[int(p)] for p in keep.tolist() if int(p) in index}
    out: list[list[int]] = [[] for _ in range(frames)]
    for j in sorted(kept):
        if j < frames * per_frame:  # the trailing newline is structural
            out[j // per_frame].append(j % per_frame)
    return out


def _prefill_ms(model: Any, inputs: Any, repeats: int = 7) -> float:
    """Median wall time of a one-token greedy ``generate`` (the prefill) on ``inputs``."""
    import torch

    times = []
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def run_demo(
    model: Any,
    processor: Any,
    *,
    n: int = 200,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    retains: Sequence[float] = DEFAULT_RETAINS,
    batch_size: int = 25,
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer ``n`` held-out questions uncompressed and with every method × retain; returns the result dict.

    With ``out``, also writes ``report.html``, the kept-token PNGs and ``results.json`` there.
    """
    import torch
    from tqdm.auto import tqdm

    import tokensieve
    from tokensieve.bench.quality import evaluate_configs
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import prompt_for

    began = time.perf_counter()
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(n, seed)]
    configs = [("none", 1.0)] + [(m, r) for m in methods for r in retains]
    with tqdm(total=len(configs) * len(examples) + len(configs), desc="demo", unit="q", dynamic_ncols=True,
              disable=not progress, file=sys.stderr) as bar:
        rows = evaluate_configs(model, processor, examples, configs, batch_size=batch_size, on_progress=bar.update)

        # One example (the first needle question, if any) for timings and pictures.
        shown = next((e for e in examples if e.family == "needle"), examples[0])
        prompt = prompt_for(processor, shown.question)
        inputs = processor(text=[prompt], videos=[shown.frames], return_tensors="pt")
        video_id = int(model.config.video_token_index)
        per_frame = int((inputs["input_ids"] == video_id).sum() - 1) // len(shown.frames)
        for row, (method, retain) in zip(rows, configs):
            if method == "none":
                row["prefill_ms"] = _prefill_ms(model, inputs)
                row["example_kept"] = kept_by_frame(inputs["input_ids"][0], None, video_id, len(shown.frames), per_frame)
            else:
                with tokensieve.compress(model, method, retain=retain):
                    row["prefill_ms"] = _prefill_ms(model, inputs)
                    st = tokensieve.stats(model)
                    row["example_kept"] = kept_by_frame(
                        inputs["input_ids"][0], st.keep[0], video_id, len(shown.frames), per_frame
                    )
                    with torch.inference_mode():
                        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                    row["example_answer"] = processor.batch_decode(
                        generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                    )[0].strip()
            bar.update(1)

    base = rows[0]
    base_acc = base["scores"]["accuracy"]
    table = []
    for row in rows:
        acc = row["scores"]["accuracy"]
        table.append(
            {
                "method": row["method"],
                "retain": row["retain"],
                "accuracy": acc,
                "accuracy_kept": acc / base_acc if base_acc else None,
                "visual_tokens": row["visual_tokens_after"],
                "prefill_ms": round(row["prefill_ms"], 2),
                "speedup": round(base["prefill_ms"] / row["prefill_ms"], 3) if row["prefill_ms"] else None,
                "families": {f: v["accuracy"] for f, v in row["scores"]["families"].items()},
            }
        )
    result: dict[str, Any] = {
        "n": len(examples),
        "seed": seed,
        "chance": synthvid.chance_level(examples),
        "table": table,
        "example": {
            "seed": shown.seed,
            "family": shown.family,
            "question": shown.question,
            "answer": shown.answer,
            "focus": shown.focus,
            "answers": {f"{r['method']}@{r['retain']:g}": r.get("example_answer") for r in rows if r["method"] != "none"},
            "kept_per_frame": {f"{r['method']}@{r['retain']:g}": [len(k) for k in r["example_kept"]] for r in rows},
        },
        "seconds": 0.0,
    }
    if out is not None:
        _write_report(out, result, rows, shown)
        result["report"] = str(out / "report.html")
    result["seconds"] = round(time.perf_counter() - began, 1)
    if out is not None:
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "retain", "accuracy", "kept vs uncompressed", "visual tokens", "prefill ms", "speed-up"]
    rows = []
    for r in result["table"]:
        kept = "–" if r["accuracy_kept"] is None else f"{100 * r['accuracy_kept']:.1f}%"
        rows.append(
            [
                "uncompressed" if r["method"] == "none" else r["method"],
                f"{r['retain']:g}",
                f"{100 * r['accuracy']:.1f}%",
                kept,
                f"{r['visual_tokens']:g}",
                f"{r['prefill_ms']:.1f}",
                f"{r['speedup']:.2f}x" if r["speedup"] else "–",
            ]
        )
    return header, rows


def _write_report(out: Path, result: dict[str, Any], rows: list[dict[str, Any]], shown: Any) -> None:
    import html

    from tokensieve.report import html_page, html_table, kept_patches_strip
    from tokensieve.zoo import synthvid

    out.mkdir(parents=True, exist_ok=True)
    header, table = _table_rows(result)
    fam_header = ["method", "retain"] + list(synthvid.FAMILIES)
    fam_rows = [
        ["uncompressed" if r["method"] == "none" else r["method"], f"{r['retain']:g}"]
        + [f"{100 * r['families'].get(f, 0.0):.0f}%" for f in synthvid.FAMILIES]
        for r in result["table"]
    ]
    pictures = []
    for row in rows:
        name = "uncompressed" if row["method"] == "none" else f"{row['method']}_r{row['retain']:g}"
        file = out / f"kept_{name}.png"
        total = sum(len(k) for k in row["example_kept"])
        label = "uncompressed" if row["method"] == "none" else f"{row['method']} at retain {row['retain']:g}"
        answer = row.get("example_answer")
        title = f"{label}: {total} visual tokens kept" + (f"; answer: {answer}" if answer is not None else "")
        kept_patches_strip(
            shown.frames, row["example_kept"], synthvid.GRID, title=title, focus=shown.focus, path=file
        )
        pictures.append(f"<img src='{html.escape(file.name)}' alt='{html.escape(label)}'>")
    ex = result["example"]
    sections = [
        f"<p>{result['n']} held-out synthetic video questions (set {result['seed']}), answered by the embedded "
        f"tiny LLaVA-OneVision with greedy <code>generate</code>; chance {100 * result['chance']:.1f}%. "
        "Prefill: median of 7 one-token <code>generate</code> calls on the example below (batch 1); "
        "speed-up relative to uncompressed.</p>",
        html_table(header, table),
        "<h2>Accuracy per question family</h2>",
        html_table(fam_header, fam_rows),
        "<h2>Kept visual tokens on one question</h2>",
        f"<p>Question: <b>{html.escape(ex['question'])}</b> — answer <b>{html.escape(ex['answer'])}</b>. "
        "Each frame is a 4×4 grid of visual tokens; dimmed cells were dropped, the red outline marks "
        "what the question is about, the bar and count under each frame show its budget.</p>",
        *pictures,
    ]
    (out / "report.html").write_text(html_page("tokensieve demo", sections), encoding="utf-8")


def _parse_methods(text: str) -> list[str]:
    from tokensieve.bench.quality import parse_methods

    return parse_methods(text)


def run(args: argparse.Namespace) -> int:
    from tokensieve._argtypes import writable_dir
    from transformers.utils import logging as hf_logging

    from tokensieve.bench.quality import check_counts, load_for_bench, parse_retains
    from tokensieve.report import text_table

    methods = _parse_methods(args.methods)
    retains = parse_retains(args.retain)
    check_counts(args)
    out = None if args.no_report else writable_dir(args.out, "--out")
    hf_logging.disable_progress_bar()
    model, processor = load_for_bench(args.model)
    result = run_demo(
        model, processor, n=args.n, seed=args.seed, methods=methods, retains=retains,
        batch_size=args.batch_size, out=out,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    header, rows = _table_rows(result)
    print(f"{result['n']} held-out questions; chance {100 * result['chance']:.1f}%")
    print(text_table(header, rows))
    if out is not None:
        print(f"report: {out / 'report.html'}")
    print(f"({result['seconds']:.0f} s)")
    return 0
