"""``tokensieve demo``: the embedded video models, uncompressed and compressed, offline.

Loads the models shipped in the package — a tiny LLaVA-OneVision (1-D positions) and a tiny
Qwen2-VL (M-RoPE), both trained on synthetic video QA — makes a held-out question set, answers
it uncompressed and with several methods at several retain ratios (greedy ``generate`` after
the chat template, through the real runtime), and prints one table per model: accuracy,
accuracy kept vs uncompressed, visual tokens (equivalent tokens for in-LLM methods), prefill
time and speed-up. Writes ``report.html`` with the tables and, for one example question, each
frame with the kept visual tokens highlighted and the per-frame budgets (one PNG per model,
method and retain ratio), plus ``results.json``.
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

#: The three seed methods, the 2025–26 video methods (FlashVID, FastVID, HoliTom) and the strongest
#: peers of the quality bench, with random as the floor.
#: SparseVLM is counted as its paper counts (``equivalent="output"``, the visual tokens leaving
#: each layer): by the input count its first pruning layer (1 of 16) already puts 0.1 out of
#: reach; the tables show the input count (``eq``) for every in-LLM method all the same.
DEFAULT_METHODS = ("vidcom2", "lftr", "sparsevlm:equivalent=output", "flashvid", "fastvid", "holitom", "fastv", "dycoke",
                   "visionzip", "random")
DEFAULT_RETAINS = (0.25, 0.1)
DEFAULT_MODELS = ("embedded", "embedded-qwen2-vl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=",".join(DEFAULT_MODELS), metavar="NAME|PATH[,...]",
                        help="comma-separated: the shipped models (embedded: LLaVA-OneVision, embedded-qwen2-vl: "
                        "Qwen2-VL) or directories of models trained the same way (default: %(default)s)")
    parser.add_argument("--n", type=int, default=100, help="held-out questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="held-out set number (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods, each NAME or NAME:KEY=VALUE[:KEY=VALUE] with method options, "
                        "or 'all' (default: %(default)s)")
    parser.add_argument("--retain", default=",".join(f"{r:g}" for r in DEFAULT_RETAINS),
                        help="comma-separated retain ratios in (0, 1] (default: %(default)s)")
    parser.add_argument("--depth", choices=("published", "scaled"), default="scaled",
                        help="in-LLM methods' layers: at the published layers' fraction of the model's depth, or the "
                        "published indices as given (default: %(default)s)")
    parser.add_argument("--out", default="tokensieve-demo", help="directory for report.html, PNGs and results.json "
                        "(default: %(default)s)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html and the pictures")
    parser.add_argument("--batch-size", type=int, default=25, help="questions per generate call (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def kept_by_frame(
    input_ids: Any, keep: Any, video_token_id: int, frames: int, per_frame: int, frames_per_token: int = 1
) -> list[list[int]]:
    """Per frame, the kept token cells (raster order within the frame) of the one video in ``input_ids`` ``[L]``.

    ``keep`` holds the kept sequence positions (``tokensieve.stats(model).keep[b]``); ``None``
    means everything was kept. The video's tokens come ``per_frame`` per token frame, token
    frame by token frame (anything after them, LLaVA-OneVision's newline, is structural); a token
    covers ``frames_per_token`` frames (Qwen2-VL's temporal patches: 2) and counts in each.
    """
    import torch

    positions = torch.nonzero(input_ids == video_token_id).flatten().tolist()
    kept = set(range(len(positions))) if keep is None else set()
    if keep is not None:
        index = {p: i for i, p in enumerate(positions)}
        kept = {index[int(p)] for p in keep.tolist() if int(p) in index}
    out: list[list[int]] = [[] for _ in range(frames)]
    token_frames = frames // frames_per_token
    for j in sorted(kept):
        if j < token_frames * per_frame:
            for k in range(frames_per_token):
                out[(j // per_frame) * frames_per_token + k].append(j % per_frame)
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
    n: int = 100,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    retains: Sequence[float] = DEFAULT_RETAINS,
    depth: str | None = "scaled",
    batch_size: int = 25,
    name: str = "embedded",
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Answer ``n`` held-out questions uncompressed and with every method × retain on one model.

    Returns ``(result, rows, shown)``: the result dict (table, example, seconds), the raw rows
    (with each one's kept cells per frame of the example) and the example question shown.
    """
    import torch
    from tqdm.auto import tqdm

    import tokensieve
    from tokensieve.bench.quality import evaluate_configs, split_method
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import FRAMES_PER_TOKEN, arch_of, prompt_for, structural_video_tokens, video_token_of

    began = time.perf_counter()
    arch = arch_of(model)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(n, seed)]
    configs = [("none", 1.0)] + [(m, r) for m in methods for r in retains]
    with tqdm(total=len(configs) * len(examples) + len(configs), desc=f"demo {name}", unit="q", dynamic_ncols=True,
              disable=not progress, file=sys.stderr) as bar:
        rows = evaluate_configs(model, processor, examples, configs, batch_size=batch_size, on_progress=bar.update,
                                depth=depth)

        # One example (the first needle question, if any) for timings and pictures.
        shown = next((e for e in examples if e.family == "needle"), examples[0])
        prompt = prompt_for(processor, shown.question)
        inputs = processor(text=[prompt], videos=[shown.frames], return_tensors="pt")
        video_id = video_token_of(model)
        per_token = FRAMES_PER_TOKEN[arch]
        content = int((inputs["input_ids"] == video_id).sum()) - structural_video_tokens(model)
        per_frame = content // (len(shown.frames) // per_token)
        layout = dict(video_token_id=video_id, frames=len(shown.frames), per_frame=per_frame, frames_per_token=per_token)
        for row, (method, retain) in zip(rows, configs):
            if row.get("error"):
                row["prefill_ms"], row["example_kept"] = None, None
            elif method == "none":
                row["prefill_ms"] = _prefill_ms(model, inputs)
                row["example_kept"] = kept_by_frame(inputs["input_ids"][0], None, **layout)
            else:
                name_, extra = split_method(method)
                if depth and "depth" in tokensieve.methods.get(name_).options:
                    extra.setdefault("depth", depth)
                with tokensieve.compress(model, name_, retain=retain, **extra):
                    row["prefill_ms"] = _prefill_ms(model, inputs)
                    st = tokensieve.stats(model)
                    # in-LLM methods: the tokens kept at the last prune point
                    row["example_kept"] = kept_by_frame(inputs["input_ids"][0], st.keep[0], **layout)
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
        if row.get("error"):
            table.append({"method": row["method"], "retain": row["retain"], "accuracy": None, "accuracy_kept": None,
                          "visual_tokens": None, "prefill_ms": None, "speedup": None, "families": {},
                          "error": row["error"]})
            continue
        acc = row["scores"]["accuracy"]
        table.append(
            {
                "method": row["method"],
                "retain": row["retain"],
                "accuracy": acc,
                "accuracy_kept": acc / base_acc if base_acc else None,
                "visual_tokens": row["visual_tokens_after"],
                "equivalent_in": row.get("equivalent_in"),
                "prefill_ms": round(row["prefill_ms"], 2),
                "speedup": round(base["prefill_ms"] / row["prefill_ms"], 3) if row["prefill_ms"] else None,
                "families": {f: v["accuracy"] for f, v in row["scores"]["families"].items()},
            }
        )
    result: dict[str, Any] = {
        "model": name,
        "arch": arch,
        "n": len(examples),
        "seed": seed,
        "depth": depth,
        "chance": synthvid.chance_level(examples),
        "table": table,
        "example": {
            "seed": shown.seed,
            "family": shown.family,
            "question": shown.question,
            "answer": shown.answer,
            "focus": shown.focus,
            "answers": {f"{r['method']}@{r['retain']:g}": r.get("example_answer") for r in rows if r["method"] != "none"},
            "kept_per_frame": {f"{r['method']}@{r['retain']:g}": [len(k) for k in r["example_kept"]]
                               for r in rows if r["example_kept"] is not None},
        },
        "seconds": round(time.perf_counter() - began, 1),
    }
    return result, rows, shown


def _table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "retain", "accuracy", "kept vs uncompressed", "visual tokens", "prefill ms", "speed-up"]
    rows = []
    for r in result["table"]:
        name = "uncompressed" if r["method"] == "none" else r["method"]
        if r.get("error"):
            rows.append([name, f"{r['retain']:g}", "not run", "–", "–", "–", "–"])
            continue
        kept = "–" if r["accuracy_kept"] is None else f"{100 * r['accuracy_kept']:.1f}%"
        rows.append(
            [
                name,
                f"{r['retain']:g}",
                f"{100 * r['accuracy']:.1f}%",
                kept,
                f"{r['equivalent_in']:.1f} eq" if r.get("equivalent_in") is not None else f"{r['visual_tokens']:g}",
                f"{r['prefill_ms']:.1f}",
                f"{r['speedup']:.2f}x" if r["speedup"] else "–",
            ]
        )
    return header, rows


_ARCH_WORDS = {
    "llava-onevision": "tiny LLaVA-OneVision (1-D positions; each frame a 4×4 grid of visual tokens)",
    "qwen2-vl": "tiny Qwen2-VL (M-RoPE; each visual token a cell over two frames, so a pair of frames shares "
    "one 4×4 grid)",
}


def _slug(model: str) -> str:
    """A file-name part for a model name or directory."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name.replace(":", "-").replace("=", "-") or "model")


def _model_sections(out: Path, result: dict[str, Any], rows: list[dict[str, Any]], shown: Any) -> list[str]:
    import html

    from tokensieve.report import html_table, kept_patches_strip
    from tokensieve.zoo import synthvid

    header, table = _table_rows(result)
    fam_header = ["method", "retain"] + list(synthvid.FAMILIES)
    fam_rows = [
        ["uncompressed" if r["method"] == "none" else r["method"], f"{r['retain']:g}"]
        + [("–" if r.get("error") else f"{100 * r['families'].get(f, 0.0):.0f}%") for f in synthvid.FAMILIES]
        for r in result["table"]
    ]
    pictures = []
    for row in rows:
        if row["example_kept"] is None:
            continue
        name = "uncompressed" if row["method"] == "none" else f"{_slug(row['method'])}_r{row['retain']:g}"
        file = out / f"kept_{_slug(result['model'])}_{name}.png"
        per_token = 2 if result["arch"] == "qwen2-vl" else 1
        total = sum(len(k) for k in row["example_kept"]) // per_token
        label = "uncompressed" if row["method"] == "none" else f"{row['method']} at retain {row['retain']:g}"
        answer = row.get("example_answer")
        title = f"{label}: {total} visual tokens kept" + (f"; answer: {answer}" if answer is not None else "")
        kept_patches_strip(
            shown.frames, row["example_kept"], synthvid.GRID, title=title, focus=shown.focus, path=file
        )
        pictures.append(f"<img src='{html.escape(file.name)}' alt='{html.escape(label)}'>")
    ex = result["example"]
    errors = [r for r in result["table"] if r.get("error")]
    return [
        f"<h2>{html.escape(result['model'])}: {html.escape(_ARCH_WORDS.get(result['arch'], result['arch']))}</h2>",
        html_table(header, table),
        *([f"<p>Not run: {html.escape(r['method'])} at {r['retain']:g}: {html.escape(r['error'])}</p>" for r in errors]),
        "<h3>Accuracy per question family</h3>",
        html_table(fam_header, fam_rows),
        "<h3>Kept visual tokens on one question</h3>",
        f"<p>Question: <b>{html.escape(ex['question'])}</b> — answer <b>{html.escape(ex['answer'])}</b>. "
        "Dimmed cells were dropped, the red outline marks what the question is about, the bar and count under "
        "each frame show its budget; for in-LLM methods, what is kept after the last prune point.</p>",
        *pictures,
    ]


def _write_report(out: Path, results: list[tuple[dict[str, Any], list[dict[str, Any]], Any]]) -> None:
    from tokensieve.report import html_page

    out.mkdir(parents=True, exist_ok=True)
    first = results[0][0]
    sections = [
        f"<p>{first['n']} held-out synthetic video questions (set {first['seed']}), answered by each embedded model "
        f"with greedy <code>generate</code>; chance {100 * first['chance']:.1f}%. Visual tokens: the mean per "
        "question; for in-LLM methods (FastV, PDrop, SparseVLM) the equivalent count, the visual tokens per layer "
        "averaged over the decoder's layers, with their layers at the published layers' depth fraction "
        f"(<code>depth={first['depth']}</code>). Prefill: median of 7 one-token <code>generate</code> calls on the "
        "example question (batch 1); speed-up relative to uncompressed.</p>",
    ]
    for result, rows, shown in results:
        sections += _model_sections(out, result, rows, shown)
    (out / "report.html").write_text(html_page("tokensieve demo", sections), encoding="utf-8")


def _parse_models(text: str) -> list[str]:
    from tokensieve.errors import InputError
    from tokensieve.zoo.model import EMBEDDED_NAMES

    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if not names:
        raise InputError(f"--model needs at least one of {', '.join(EMBEDDED_NAMES)} or a model directory")
    for name in names:
        if name not in EMBEDDED_NAMES and not Path(name).expanduser().is_dir():
            raise InputError(f"--model: {name!r} is neither a shipped model ({', '.join(EMBEDDED_NAMES)}) "
                             "nor a model directory")
    return names


def run(args: argparse.Namespace) -> int:
    from tokensieve._argtypes import writable_dir
    from transformers.utils import logging as hf_logging

    from tokensieve.bench.quality import check_counts, load_for_bench, parse_methods, parse_retains
    from tokensieve.report import text_table

    methods = parse_methods(args.methods)
    retains = parse_retains(args.retain)
    models = _parse_models(args.model)
    check_counts(args)
    out = None if args.no_report else writable_dir(args.out, "--out")
    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    results = []
    for name in models:
        model, processor = load_for_bench(name)
        results.append(run_demo(model, processor, n=args.n, seed=args.seed, methods=methods, retains=retains,
                                depth=args.depth, batch_size=args.batch_size, name=name))
    combined: dict[str, Any] = {"models": [r for r, _, _ in results], "seconds": 0.0}
    if out is not None:
        _write_report(out, results)
        combined["report"] = str(out / "report.html")
    combined["seconds"] = round(time.perf_counter() - began, 1)
    if out is not None:
        (out / "results.json").write_text(json.dumps(combined, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(combined, indent=2))
        return 0
    for result in combined["models"]:
        header, rows = _table_rows(result)
        print(f"{result['model']} ({result['arch']}): {result['n']} held-out questions; chance "
              f"{100 * result['chance']:.1f}%")
        print(text_table(header, rows))
        for r in result["table"]:
            if r.get("error"):
                print(f"  not run: {r['method']} at {r['retain']:g}: {r['error']}")
        print()
    if out is not None:
        print(f"report: {out / 'report.html'}")
    print(f"({combined['seconds']:.0f} s)")
    return 0
