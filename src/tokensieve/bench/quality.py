"""``tokensieve bench quality``: accuracy per method × retain ratio × question family.

Answers held-out synthetic video questions (:mod:`tokensieve.zoo.synthvid`) with a model that
was trained on them — by default the embedded one — uncompressed and compressed by every
requested method at every requested retain ratio, with greedy ``generate`` after the
processor's chat template, so compression runs through the real runtime. Methods run with
their default options: nothing is tuned to this data.

Writes ``quality.json`` (everything), ``quality.md`` (tables) and ``quality.png`` (accuracy vs
retain, one line per method) plus ``quality_<family>.png`` per question family.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tokensieve.errors import InputError

__all__ = ["add_arguments", "evaluate_configs", "load_for_bench", "markdown_report", "parse_methods", "parse_retains",
           "run", "split_method"]

DEFAULT_RETAINS = (0.5, 0.25, 0.15, 0.1)


def parse_retains(text: str) -> list[float]:
    """``"0.5,0.25"`` → ``[0.5, 0.25]``; every value in (0, 1]."""
    out: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--retain takes comma-separated numbers in (0, 1], got {part!r}") from None
        if not 0.0 < value <= 1.0:
            raise InputError(f"--retain values must lie in (0, 1] (fraction of visual tokens kept), got {value}")
        out.append(value)
    if not out:
        raise InputError("--retain needs at least one value in (0, 1]")
    return out


def split_method(text: str, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:KEY=VALUE:KEY=VALUE"`` (method options, values as ``tokensieve run -o``
    reads them; the encoder stage's ``encoder_frames`` / ``encoder_policy`` too) → ``(name,
    options)``; unknown methods and options are errors. ``extra`` options are checked with them."""
    import argparse

    import tokensieve
    from tokensieve._argtypes import key_value

    name, *parts = [p.strip() for p in text.split(":")]
    spec = tokensieve.methods.get(name)  # raises InputError naming the available methods
    options: dict[str, Any] = {}
    for part in parts:
        try:
            key, value = key_value(part)
        except argparse.ArgumentTypeError as exc:
            raise InputError(f"method {text!r}: options go as name:KEY=VALUE[:KEY=VALUE]; {exc}") from None
        options[key] = value
    from tokensieve.methods.encoder import method_options_only

    spec.create(**method_options_only({**options, **(extra or {})}))  # unknown or invalid options fail here, before anything runs
    return name, options


def parse_methods(text: str | None) -> list[str]:
    """Comma-separated methods, each a name or ``name:KEY=VALUE[:KEY=VALUE]`` (``all``: every
    registered method with its defaults, also inside a list); unknown names or options are errors."""
    import tokensieve

    names = tokensieve.methods.names()
    if text is None or text.strip() in ("", "all"):
        return names
    wanted: list[str] = []
    for m in (m.strip() for m in text.split(",")):
        if not m:
            continue
        if m == "all":
            wanted += [n for n in names if n not in wanted]
            continue
        split_method(m)
        if m not in wanted:
            wanted.append(m)
    return wanted


def load_for_bench(model: str) -> tuple[Any, Any]:
    """``(model, processor)`` for a shipped instrument (``embedded``: LLaVA-OneVision,
    ``embedded-qwen2-vl``: Qwen2-VL) or a local model directory trained the same way."""
    from tokensieve.zoo.model import EMBEDDED_NAMES, load_embedded, load_model

    if model in EMBEDDED_NAMES:
        return load_embedded(arch=EMBEDDED_NAMES[model])
    path = Path(model).expanduser()
    if not path.is_dir():
        raise InputError(f"--model must be {' or '.join(repr(n) for n in EMBEDDED_NAMES)} or a model directory "
                         f"written by save_pretrained; no directory {model!r}")
    return load_model(path)


def evaluate_configs(
    model: Any,
    processor: Any,
    examples: Sequence[Any],
    configs: Sequence[tuple[str, float]],
    *,
    batch_size: int = 25,
    on_progress: Callable[[int], None] | None = None,
    positions: str | None = None,
    depth: str | None = None,
) -> list[dict[str, Any]]:
    """Score ``examples`` under every ``(method, retain)`` in ``configs`` (``("none", 1.0)``: uncompressed).

    ``depth``: given to the methods that take it (in-LLM layer placement, ``"scaled"`` or
    ``"published"``); ``None`` leaves every method's default.

    ``positions``: the position ids of kept tokens (:func:`tokensieve.compress`; ``None``: each
    method's default).

    Returns one row per config: ``method``, ``retain``, ``scores`` (see
    :meth:`tokensieve.zoo.evaluate.Scores.as_dict`), ``visual_tokens_before`` /
    ``visual_tokens_after`` (mean per question; in-LLM methods: those reaching the last layer),
    ``equivalent_in`` / ``equivalent_out`` (in-LLM methods: mean visual tokens entering / leaving
    each decoder layer; ``None`` otherwise) and ``seconds``.
    """
    import tokensieve
    from tokensieve.zoo.evaluate import answer_prepared, prepare, score

    from tokensieve.zoo.model import structural_video_tokens, video_token_of

    batches = prepare(processor, examples, batch_size=batch_size)
    video_id = video_token_of(model)
    structural = structural_video_tokens(model)
    rows: list[dict[str, Any]] = []
    for method, retain in configs:
        counts: dict[str, float] = {"before": 0, "after": 0, "n": 0, "e_in": 0.0, "e_out": 0.0, "inllm": 0}

        def on_batch(n: int, m: Any, counts: dict[str, float] = counts, compressed: bool = method != "none") -> None:
            counts["n"] += n
            if compressed:
                st = tokensieve.stats(m)
                counts["before"] += int(st.tokens_before)
                counts["after"] += int(st.tokens_after)
                for b in range(len(st.segments)):
                    eq = st.equivalent_tokens(b)
                    if eq is not None:  # in-LLM: visual tokens per layer, averaged over the layers
                        counts["inllm"] = 1
                        counts["e_in"] += eq["E_in"]
                        counts["e_out"] += eq["E_out"]
            if on_progress is not None:
                on_progress(n)

        began = time.perf_counter()
        try:
            if method == "none":
                answers = answer_prepared(model, processor, batches, on_batch=on_batch)
                visual = sum(int((b["input_ids"] == video_id).sum()) for b in batches)
                counts["before"] = counts["after"] = visual - structural * sum(int(b["input_ids"].shape[0]) for b in batches)
            else:
                name, extra = split_method(method)
                if depth and "depth" in tokensieve.methods.get(name).options:
                    extra.setdefault("depth", depth)
                with tokensieve.compress(model, name, retain=retain, positions=positions, **extra):
                    answers = answer_prepared(model, processor, batches, on_batch=on_batch)
        except InputError as exc:
            # The method cannot run at this ratio on this model (e.g. an in-LLM method whose
            # pruning layer leaves too few layers): report it, do not change its options.
            if on_progress is not None:
                on_progress(len(examples) - counts["n"])
            rows.append({"method": method, "retain": retain, "scores": None, "error": str(exc),
                         "visual_tokens_before": None, "visual_tokens_after": None,
                         "equivalent_in": None, "equivalent_out": None,
                         "seconds": round(time.perf_counter() - began, 2), "answers": None})
            continue
        n = max(counts["n"], 1)
        rows.append(
            {
                "method": method,
                "retain": retain,
                "scores": score(examples, answers).as_dict(),
                "error": None,
                "visual_tokens_before": round(counts["before"] / n, 2),
                "visual_tokens_after": round(counts["after"] / n, 2),
                # in-LLM methods: equivalent tokens (mean visual tokens entering / leaving each layer)
                "equivalent_in": round(counts["e_in"] / n, 2) if counts["inllm"] else None,
                "equivalent_out": round(counts["e_out"] / n, 2) if counts["inllm"] else None,
                "seconds": round(time.perf_counter() - began, 2),
                "answers": answers,
            }
        )
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def visual_cell(row: dict[str, Any]) -> str:
    """The visual-token count of a result row as the tables show it: kept tokens, or for in-LLM
    methods the equivalent count (mean entering each layer) marked ``eq``."""
    if row.get("equivalent_in") is not None:
        return f"{row['equivalent_in']:.1f} eq"
    return f"{row['visual_tokens_after']:g}"


def markdown_report(result: dict[str, Any]) -> str:
    """The Markdown tables of a quality result: overall + per family, and accuracy kept vs uncompressed."""
    from tokensieve.report import markdown_table
    from tokensieve.zoo.synthvid import FAMILIES

    rows = result["rows"]
    base = next((r for r in rows if r["method"] == "none"), None)
    base_acc = base["scores"]["accuracy"] if base else None
    header = ["method", "retain", "visual tokens", "accuracy %", "kept vs uncompressed %"] + [f"{f} %" for f in FAMILIES]
    table = []
    for r in rows:
        s = r["scores"]
        if s is None:
            table.append([r["method"], f"{r['retain']:g}", "n/a", "n/a", "n/a"] + ["n/a"] * len(FAMILIES))
            continue
        kept = s["accuracy"] / base_acc if base_acc else None
        fams = [_pct((s["families"].get(f) or {}).get("accuracy")) for f in FAMILIES]
        table.append(
            [r["method"], f"{r['retain']:g}", visual_cell(r), _pct(s["accuracy"]), _pct(kept)] + fams
        )
    meta = result["meta"]
    lines = [
        f"Model: `{meta['model']}`; {meta['n']} held-out questions (set {meta['seed']}), "
        f"{meta['n'] // len(FAMILIES)} per family; chance {_pct(meta['chance'])}%. "
        "Greedy `generate` after the chat template; every method with its default options"
        + (f", positions `{meta['positions']}`" if meta.get("positions") else "")
        + (f", in-LLM layers `depth={meta['depth']}`" if meta.get("depth") else "") + ".",
        "",
        markdown_table(header, table),
    ]
    # accuracy by retain, one column per retain (overall and needle), for quick comparison
    retains = sorted({r["retain"] for r in rows if r["method"] != "none"}, reverse=True)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    for label, key in (("overall", None), ("needle", "needle"), ("count", "count"), ("order", "order")):
        sub = []
        for m in methods:
            cells = []
            for ret in retains:
                r = next((x for x in rows if x["method"] == m and x["retain"] == ret), None)
                if r is None or r["scores"] is None:
                    cells.append("–")
                    continue
                s = r["scores"]
                cells.append(_pct(s["accuracy"] if key is None else (s["families"].get(key) or {}).get("accuracy")))
            sub.append([m] + cells)
        ref = base["scores"] if base else None
        ref_val = None if ref is None else (ref["accuracy"] if key is None else (ref["families"].get(key) or {}).get("accuracy"))
        lines += [
            "",
            f"**{label} accuracy % by retain** (uncompressed: {_pct(ref_val)})",
            "",
            markdown_table(["method"] + [f"r={x:g}" for x in retains], sub),
        ]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "**Not run** (the method refuses this ratio on this model; options left at their defaults):", ""]
        lines += [f"- `{r['method']}` at retain {r['retain']:g}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """``quality.png`` (overall) and ``quality_<family>.png``: accuracy vs retain, one line per method."""
    from tokensieve.report import line_chart
    from tokensieve.zoo.synthvid import FAMILIES

    rows = result["rows"]
    base = next((r for r in rows if r["method"] == "none"), None)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    paths = []
    for family in (None, *FAMILIES):

        def value(r: dict[str, Any], family: str | None = family) -> float | None:
            s = r["scores"]
            if family is None:
                return float(s["accuracy"])
            got = s["families"].get(family)  # a small question set may lack a family
            return None if got is None else float(got["accuracy"])

        series = {}
        for m in methods:
            pts = [(r["retain"], v) for r in rows
                   if r["method"] == m and r["scores"] is not None and (v := value(r)) is not None]
            if base is not None and (v := value(base)) is not None:
                pts.append((1.0, v))
            if pts:
                series[m] = pts
        if not series:
            continue
        name = "quality.png" if family is None else f"quality_{family}.png"
        what = "all families" if family is None else f"{family} questions"
        chance = result["meta"]["chance"] if family is None else result["meta"]["chance_by_family"].get(family, 0.0)
        line_chart(
            series,
            title=f"Accuracy vs retain ratio ({what}, {result['meta']['n']} questions)",
            xlabel="retain ratio",
            ylabel="accuracy",
            hline=(chance, "chance"),
            path=out / name,
        )
        paths.append(out / name)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", metavar="embedded|embedded-qwen2-vl|PATH",
                        help="a shipped synthetic-video model (embedded: LLaVA-OneVision, embedded-qwen2-vl: "
                        "Qwen2-VL) or a directory of one trained the same way (default: %(default)s)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, each NAME or NAME:KEY=VALUE[:KEY=VALUE] with method options "
                        "(e.g. sparsevlm:equivalent=output), or 'all' (every method, its defaults; also inside a "
                        "list; default: %(default)s)")
    parser.add_argument("--retain", default=",".join(f"{r:g}" for r in DEFAULT_RETAINS),
                        help="comma-separated retain ratios in (0, 1] (default: %(default)s)")
    parser.add_argument("--n", type=int, default=500, help="held-out questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="held-out set number (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=25, help="questions per generate call (default: %(default)s)")
    parser.add_argument("--out", default="quality-results", help="output directory (default: %(default)s)")
    parser.add_argument("--positions", choices=("preserve", "compact"), default=None,
                        help="position ids of kept tokens for every method (default: each method's own)")
    parser.add_argument("--depth", choices=("published", "scaled"), default="scaled",
                        help="in-LLM methods' layers (FastV, PDrop, SparseVLM): at the published layers' fraction of "
                        "this model's depth, or the published indices as given (default: %(default)s: the embedded "
                        "models have 16 layers, the published indices are for 32)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the Markdown table")


def check_counts(args: argparse.Namespace) -> None:
    """``--n``, ``--seed`` and ``--batch-size`` of a quality run (also ``tokensieve demo``)."""
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    from tokensieve._argtypes import writable_dir
    from tqdm.auto import tqdm

    from tokensieve.zoo import synthvid

    methods = parse_methods(args.methods)
    retains = parse_retains(args.retain)
    check_counts(args)
    out = writable_dir(args.out, "--out")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, processor = load_for_bench(args.model)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(args.n, args.seed)]
    configs = [("none", 1.0)] + [(m, r) for m in methods for r in retains]
    began = time.perf_counter()
    with tqdm(total=len(configs) * len(examples), desc="bench quality", unit="q", dynamic_ncols=True,
              file=sys.stderr) as bar:
        rows = evaluate_configs(model, processor, examples, configs, batch_size=args.batch_size, on_progress=bar.update,
                                positions=args.positions, depth=args.depth)
    by_family: dict[str, list[Any]] = {}
    for e in examples:
        by_family.setdefault(e.family, []).append(e)
    result = {
        "meta": {
            "model": args.model,
            "n": len(examples),
            "seed": args.seed,
            "methods": methods,
            "retains": retains,
            "chance": synthvid.chance_level(examples),
            "chance_by_family": {f: synthvid.chance_level(v) for f, v in by_family.items()},
            "positions": args.positions,
            "depth": args.depth,
            "seconds": round(time.perf_counter() - began, 1),
            "command": "tokensieve bench quality " + " ".join(
                [f"--model {args.model}", f"--methods {','.join(methods)}", f"--retain {','.join(f'{r:g}' for r in retains)}",
                 f"--n {args.n}", f"--seed {args.seed}"] + ([f"--positions {args.positions}"] if args.positions else [])
                + ([f"--depth {args.depth}"] if args.depth else [])
            ),
        },
        "rows": [
            {**{k: v for k, v in r.items() if k != "answers"},
             # per question, in order: right or not (for paired comparisons between runs)
             "correct": None if r["answers"] is None
             else [bool(synthvid.check_answer(e, a)) for e, a in zip(examples, r["answers"])]}
            for r in rows
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = markdown_report(result)
    (out / "quality.md").write_text(md, encoding="utf-8")
    plot(result, out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(md)
        print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0
