"""The lmms-eval plugin against the committed quality bench, question by question.

Writes the offline task (``tokensieve eval make-task``) for the first ``--n`` held-out
questions, runs ``python -m lmms_eval --model tokensieve`` on both embedded models for each
configuration, and compares every question's right/wrong with the ``correct`` lists committed
in ``benchmarks/quality/<model>/{preserve,sparsevlm-output}/quality.json`` (the bench ran in
another environment: torch 2.13 without torchvision, batches of 25; here lmms-eval, the
transformers video processors, batches of ``--batch-size``).

    python benchmarks/lmms_eval/compare.py --n 100 --out benchmarks/lmms_eval

Needs an environment with lmms-eval (the README's ``ci:test-eval`` command). Writes
``compare.md`` and ``compare.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: (the method part of --model_args, quality-bench folder, bench method, retain)
CONFIGS = (
    ("none", "preserve", "none", 1.0),
    ("vidcom2,retain=0.25", "preserve", "vidcom2", 0.25),
    ("vidcom2,retain=0.1", "preserve", "vidcom2", 0.1),
    ("fastv,retain=0.25,depth=scaled", "preserve", "fastv", 0.25),
    ("sparsevlm,retain=0.25,depth=scaled,equivalent=output", "sparsevlm-output", "sparsevlm:equivalent=output", 0.25),
    ("random,retain=0.25", "preserve", "random", 0.25),
)
MODELS = (("embedded", "llava-onevision", "llava"), ("embedded-qwen2-vl", "qwen2-vl", "qwen2-vl"))


def run_one(task_dir: Path, out: Path, model_dir: Path, method_args: str, batch_size: int) -> tuple[list[float], dict, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "tokensieve",
               "--model_args", f"pretrained={model_dir},device=cpu,dtype=float32,method={method_args}",
               "--tasks", "tokensieve_synthvid", "--include_path", str(task_dir), "--batch_size", str(batch_size),
               "--log_samples", "--output_path", str(out / "lmms"), "--verbosity", "DEBUG"]
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"lmms-eval failed for {method_args}:\n{done.stderr[-3000:]}")
    samples = next((out / "lmms").rglob("*_samples_tokensieve_synthvid.jsonl"))
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines() if line.strip()),
                  key=lambda d: int(d["doc_id"]))
    results = json.loads(next((out / "lmms").rglob("*_results.json")).read_text())
    return [float(d["accuracy"]) for d in docs], results.get("throughput", {}), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "lmms_eval"))
    args = parser.parse_args(argv)

    from tokensieve.eval.synth_task import write
    from tokensieve.zoo.model import EMBEDDED_DIRS

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokensieve-lmms-") as tmp:
        task_dir = write(Path(tmp) / "task", args.n).parent
        for name, arch, folder in MODELS:
            for i, (method_args, bench_dir, bench_method, retain) in enumerate(CONFIGS):
                bench = json.loads((ROOT / "benchmarks" / "quality" / folder / bench_dir / "quality.json").read_text())
                row = next(r for r in bench["rows"] if r["method"] == bench_method and r["retain"] == retain)
                correct = [float(c) for c in row["correct"][: args.n]]
                mine, throughput, seconds = run_one(task_dir, Path(tmp) / f"{name}-{i}", EMBEDDED_DIRS[arch],
                                                    method_args, args.batch_size)
                differ = [k for k, (a, b) in enumerate(zip(mine, correct)) if a != b]
                rows.append({
                    "model": name, "method": method_args, "lmms_accuracy": sum(mine) / len(mine),
                    "bench_accuracy": sum(correct) / len(correct), "questions_that_differ": differ,
                    "visual_before": throughput.get("avg_tokensieve_visual_before"),
                    "visual_after": throughput.get("avg_tokensieve_visual_after"),
                    "seconds": round(seconds, 1),
                })
                print(f"{name:18s} {method_args:55s} lmms-eval {100 * rows[-1]['lmms_accuracy']:5.1f}%  "
                      f"bench {100 * rows[-1]['bench_accuracy']:5.1f}%  differ {len(differ)}  {seconds:.0f}s", flush=True)
    meta = {"n": args.n, "batch_size": args.batch_size,
            "command": f"python benchmarks/lmms_eval/compare.py --n {args.n} --batch-size {args.batch_size}"}
    (out_dir / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# The lmms-eval plugin against the quality bench",
        "",
        f"`{meta['command']}`: the first {args.n} held-out questions through `python -m lmms_eval --model tokensieve` "
        f"(offline task `tokensieve_synthvid`, batch {args.batch_size}, CPU, fp32), each question's right/wrong "
        "compared with the committed quality bench (`benchmarks/quality/*/preserve|sparsevlm-output/quality.json`, "
        "batch 25, another environment: torch 2.13 without torchvision).",
        "",
        "| model | `--model_args` method part | lmms-eval | quality bench | questions that differ | visual tokens (avg before → after) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vis = (f"{r['visual_before']:.1f} → {r['visual_after']:.1f}" if r["visual_before"] is not None else "–")
        lines.append(f"| `{r['model']}` | `method={r['method']}` | {100 * r['lmms_accuracy']:.1f}% | "
                     f"{100 * r['bench_accuracy']:.1f}% | {len(r['questions_that_differ'])} | {vis} | {r['seconds']} |")
    lines.append("")
    (out_dir / "compare.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
