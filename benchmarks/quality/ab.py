"""The position A/B: the same quality-bench run with the kept tokens keeping their original
position ids (``preserve``) and renumbered consecutively (``compact``), side by side.

For each model (a pair of ``tokensieve bench quality`` result directories, run with
``--positions preserve`` and ``--positions compact``), per method and retain ratio: overall
accuracy under each, the difference, its standard error (the two runs answer the same
questions, so the paired per-question differences give it), and the difference per question
family. Writes ``ab.md`` and ``ab.json``.

    python benchmarks/quality/ab.py --model embedded benchmarks/quality/llava/preserve benchmarks/quality/llava/compact \\
        --model embedded-qwen2-vl benchmarks/quality/qwen2-vl/preserve benchmarks/quality/qwen2-vl/compact \\
        --out benchmarks/quality
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

FAMILIES = ("needle", "count", "order", "position", "attribute")


def _load(path: Path) -> dict[str, Any]:
    return json.loads((path / "quality.json").read_text(encoding="utf-8"))


def _paired_se(a: list[bool] | None, b: list[bool] | None) -> float | None:
    """Standard error of mean(a) - mean(b) over the same questions."""
    if not a or not b or len(a) != len(b):
        return None
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return math.sqrt(var / n)


def compare(preserve: dict[str, Any], compact: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    by_key = {(r["method"], r["retain"]): r for r in compact["rows"]}
    for p in preserve["rows"]:
        if p["method"] == "none":
            continue
        c = by_key.get((p["method"], p["retain"]))
        row: dict[str, Any] = {"method": p["method"], "retain": p["retain"]}
        ps, cs = p.get("scores"), (c or {}).get("scores")
        row["preserve"] = None if ps is None else ps["accuracy"]
        row["compact"] = None if cs is None else cs["accuracy"]
        row["preserve_error"] = p.get("error")
        row["compact_error"] = None if c is None else c.get("error")
        if ps is not None and cs is not None:
            row["delta"] = ps["accuracy"] - cs["accuracy"]
            row["se"] = _paired_se(p.get("correct"), (c or {}).get("correct"))
            row["families"] = {
                f: (ps["families"].get(f) or {}).get("accuracy", 0.0) - (cs["families"].get(f) or {}).get("accuracy", 0.0)
                for f in FAMILIES
            }
        rows.append(row)
    return rows


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown(models: list[tuple[str, dict[str, Any], list[dict[str, Any]]]]) -> str:
    lines = [
        "# Position A/B: `preserve` (original position ids) vs `compact` (renumbered)",
        "",
        "Accuracy % on the quality bench's held-out questions; Δ = preserve − compact in points, with the "
        "paired standard error where the per-question answers were kept. Per-family columns are Δ.",
        "",
        "The library's defaults follow from it (`tokensieve.methods`, `PRESERVE`): each method takes the "
        "setting with the higher mean accuracy over the retains on the model of that position scheme — "
        "`preserve` everywhere except LFTR on 1-D RoPE (`compact`). `compact` is not defined for in-LLM "
        "pruning on M-RoPE models, so those cells are empty.",
    ]
    for name, meta, rows in models:
        lines += ["", f"## {name}", "", f"`{meta['command']}` and the same with `--positions compact`; "
                  f"uncompressed {_pct(meta['uncompressed'])}%.", ""]
        header = ["method", "retain", "preserve", "compact", "Δ", "± SE"] + [f"Δ {f}" for f in FAMILIES]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        notes = []
        for r in rows:
            if "delta" not in r:
                why = r.get("compact_error") or r.get("preserve_error") or "not run"
                lines.append(f"| {r['method']} | {r['retain']:g} | {_pct(r['preserve'])} | {_pct(r['compact'])} | – | – |"
                             + " – |" * len(FAMILIES))
                notes.append(f"- `{r['method']}` at {r['retain']:g}: {why}")
                continue
            se = "–" if r.get("se") is None else f"{100 * r['se']:.1f}"
            lines.append(
                f"| {r['method']} | {r['retain']:g} | {_pct(r['preserve'])} | {_pct(r['compact'])} | "
                f"{_pct(r['delta'], True)} | {se} | " + " | ".join(_pct(r["families"][f], True) for f in FAMILIES) + " |"
            )
        summary = {}
        for r in rows:
            if "delta" in r:
                summary.setdefault(r["method"], []).append(r["delta"])
        lines += ["", "Mean Δ over the retains each method ran at:", ""]
        lines += [f"- `{m}`: {_pct(sum(v) / len(v), True)} points ({len(v)} retains; "
                  f"{sum(1 for x in v if x > 0)} favour preserve, {sum(1 for x in v if x < 0)} compact)"
                  for m, v in summary.items()]
        if notes:
            lines += ["", "Cells without a Δ:", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs=3, action="append", metavar=("NAME", "PRESERVE_DIR", "COMPACT_DIR"),
                        required=True)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    models = []
    for name, pdir, cdir in args.model:
        p, c = _load(Path(pdir)), _load(Path(cdir))
        base = next(r for r in p["rows"] if r["method"] == "none")
        meta = {"command": p["meta"]["command"], "uncompressed": base["scores"]["accuracy"]}
        models.append((name, meta, compare(p, c)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps([{"model": n, **m, "rows": r} for n, m, r in models], indent=2) + "\n",
                                 encoding="utf-8")
    (out / "ab.md").write_text(markdown(models), encoding="utf-8")
    print(markdown(models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
