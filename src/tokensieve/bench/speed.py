"""``tokensieve bench speed``: prefill, decode, memory and FLOPs of each method against the
uncompressed model and the FLOP ideal, in one run.

Every configuration (baseline or method × retain × frames) runs in a fresh subprocess so that
peak memory does not mix; repeats are interleaved (baseline first in every round). Inside a
worker the model is built from a built-in shape (random weights) or loaded from ``--model``,
one video of ``frames`` frames is prepared, and one ``generate`` call is timed with hooks:

* vision encoder: the tower's forward (LLaVA ``vision_tower``, Qwen ``visual``);
* scoring: tokensieve's own time (segment scoring, the encoder signals it computes for it, plus in-LLM row attention and pruning);
* LLM prefill: the language model's first forward (for pre-LLM methods after pruning);
* decode: mean of the language model's later forwards (ms per new token);
* end to end: the whole ``generate``;
* peak memory: CUDA ``max_memory_allocated``, or on CPU the process's peak resident set
  (``ru_maxrss``) and its rise during the run.

From the medians: prefill speed-up vs baseline, the FLOP-ideal speed-up (baseline FLOPs /
method FLOPs, analytical ``n·d·(2d + 2·d_kv) + 2n²d + 3ndm`` per layer) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._argtypes import positive_int, writable_dir
from ..errors import InputError
from .arches import ARCHES, get_arch

DEFAULT_METHODS = "vidcom2,flashvid,fastvid,holitom,random,uniform,lftr,visionzip,dycoke,fastv,pdrop,sparsevlm,keyframes"
FIELDS = (
    "vision_ms", "score_ms", "prefill_ms", "decode_ms_per_token", "end_to_end_ms", "peak_mb", "peak_rise_mb",
    "visual_tokens", "visual_kept", "llm_prefill_tflops",
)


# --- argument parsing --------------------------------------------------------------------------


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    for v in values:
        if not 0 < v <= 1:
            raise argparse.ArgumentTypeError(f"{what} must be in (0, 1], got {v}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"frames must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"frames must be integers >= 1, got {text!r}")
    return values


def _arch(text: str) -> str:
    if text not in ARCHES:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; built-in shapes: {', '.join(ARCHES)}")
    return text


def _visual_token(model: Any) -> int:
    """The placeholder id of a video's tokens (InternVL writes frames with its image context token)."""
    cfg = model.config
    value = getattr(cfg, "video_token_id", None)
    return int(value if value is not None else cfg.image_token_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--arch", type=_arch, default=None, help=f"built-in shape: {', '.join(ARCHES)}")
    src.add_argument("--model", default=None, metavar="PATH", help="a local checkpoint directory instead")
    parser.add_argument("--frames", type=_ints, default=[16], help="frame counts, e.g. 8,16,32 (default 16)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--retain", type=lambda t: _floats(t, "retain"), default=[0.25],
                        help="comma-separated retain ratios in (0, 1] (default 0.25)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method option, e.g. -o pdrop.equivalent=output (repeatable; VALUE read as JSON if it parses)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per configuration (default 3)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per run (default 16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads in each worker (default: all)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="truncate the built-in vision tower to N layers (default: the published depth)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per worker (default 1 on cuda, 0 on cpu)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write speed.json / speed.md / speed.png there")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise InputError(f"--option expects METHOD.KEY=VALUE, got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        out.setdefault(method.strip(), {})[key.strip()] = parsed
    return out


def _validate(args: argparse.Namespace) -> None:
    if args.arch is None and args.model is None:
        raise InputError("bench speed needs --arch NAME (built-in shape) or --model PATH")
    if args.model is not None and not Path(args.model).is_dir():
        raise InputError(f"--model must be a local checkpoint directory, got {args.model!r}")
    if args.repeats < 1 or args.new_tokens < 1:
        raise InputError("--repeats and --new-tokens must be >= 1")
    import tokensieve

    from .quality import split_method

    options = _method_options(args.option)
    for label in [m.strip() for m in args.methods.split(",") if m.strip()]:
        name, own = split_method(label)
        split_method(name, {**own, **options.get(name, {})})
    for name in options:
        tokensieve.methods.get(name)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")


# --- the worker: one configuration in this process ------------------------------------------------


def _rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024.0 if sys.platform != "darwin" else usage / 1024.0 / 1024.0


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def _lm_and_vision(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    inner = model.model
    vision = getattr(inner, "vision_tower", None) or getattr(inner, "visual")
    return inner.language_model, vision


def _flops(seq: list[int], shape: tuple[int, int, int, int]) -> float:
    from ..methods.inllm import prefill_flops

    d, m, dkv, _ = shape
    return prefill_flops([int(n) for n in seq], d, m, dkv)


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import tokensieve
    from tokensieve.runtime.patch import lm_shape

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    dtype = getattr(torch, cfg["dtype"])
    device = cfg["device"]
    if cfg.get("model"):
        from transformers import AutoModelForImageTextToText

        from .arches import Arch

        model = AutoModelForImageTextToText.from_pretrained(cfg["model"], dtype=dtype,
                                                            attn_implementation=cfg["attn"]).eval()
        family = {"LlavaOnevisionForConditionalGeneration": "llava-onevision",
                  "Qwen2VLForConditionalGeneration": "qwen2-vl",
                  "Qwen2_5_VLForConditionalGeneration": "qwen2.5-vl",
                  "Qwen3VLForConditionalGeneration": "qwen3-vl",
                  "Qwen3VLMoeForConditionalGeneration": "qwen3-vl",
                  "InternVLForConditionalGeneration": "internvl"}.get(type(model).__name__)
        if family is None:
            raise InputError("bench speed supports LLaVA-OneVision, Qwen2/2.5-VL, Qwen3-VL and InternVL, "
                             f"got {type(model).__name__}")
        vc = model.config.vision_config
        arch = Arch("checkpoint", family, {}, {"image_size": getattr(vc, "image_size", 384),
                                               "patch_size": vc.patch_size}, 448)
    else:
        from .arches import build_model

        arch = get_arch(cfg["arch"])
        model = build_model(arch, dtype=dtype, attn=cfg["attn"], vision_layers=cfg.get("vision_layers"))
    model.to(device)
    from .arches import make_inputs

    inputs = make_inputs(model, arch, cfg["frames"], dtype=dtype, device=device)
    if cfg.get("model"):
        ids = inputs["input_ids"]
        from .arches import V_END, V_START, VIDEO_TOKEN

        # the synthetic prompt uses the built-in shapes' placeholder ids: map them to the checkpoint's
        ids[ids == VIDEO_TOKEN] = _visual_token(model)
        ids[ids == V_START] = getattr(model.config, "vision_start_token_id", V_START)
        ids[ids == V_END] = getattr(model.config, "vision_end_token_id", V_END)
    lm, vision = _lm_and_vision(model)
    marks: dict[str, list[float]] = {"lm": [], "vision": []}
    starts: dict[str, float] = {}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def pre(name: str):
        def hook(*_: Any, **__: Any) -> None:
            sync()
            starts[name] = time.perf_counter()
        return hook

    def post(name: str):
        def hook(*_: Any, **__: Any) -> None:
            sync()
            marks[name].append((time.perf_counter() - starts[name]) * 1000.0)
        return hook

    handles = [lm.register_forward_pre_hook(pre("lm"), with_kwargs=True), lm.register_forward_hook(post("lm")),
               vision.register_forward_pre_hook(pre("vision")), vision.register_forward_hook(post("vision"))]
    handle = None
    if cfg["method"] != "none":
        handle = tokensieve.compress(model, cfg.get("name", cfg["method"]), retain=cfg["retain"],
                                     **cfg.get("options", {}))
    n_new = int(cfg["new_tokens"])
    warmup = cfg["warmup"] if cfg["warmup"] is not None else (1 if device == "cuda" else 0)
    with torch.no_grad():
        for _ in range(warmup):
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for v in marks.values():
            v.clear()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = _current_rss_mb()
        sync()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        sync()
        total_ms = (time.perf_counter() - t0) * 1000.0
    for h in handles:
        h.remove()
    shape = lm_shape(model)
    n_visual = int((inputs["input_ids"] == _visual_token(model)).sum())
    seq = int(inputs["input_ids"].shape[1])
    result: dict[str, Any] = {
        "vision_ms": sum(marks["vision"]),
        "prefill_ms": marks["lm"][0],
        "decode_ms_per_token": statistics.mean(marks["lm"][1:]) if len(marks["lm"]) > 1 else 0.0,
        "end_to_end_ms": total_ms,
        "visual_tokens": n_visual,
    }
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_rise_mb"] = result["peak_mb"]
    else:
        result["peak_mb"] = _rss_mb()
        result["peak_rise_mb"] = max(0.0, _rss_mb() - rss_before)
    if handle is not None:
        st = tokensieve.stats(model)
        # scoring: the selection, the encoder signals computed for it, the choice of the frames the
        # encoder sees, the in-LLM ranking
        score = st.score_ms + st.signal_ms + st.plan_ms + (st.inllm.score_ms if st.inllm is not None else 0.0)
        result["score_ms"] = score
        result["visual_kept"] = st.tokens_after
        flops = st.prefill_flops(0)
        result["llm_prefill_tflops"] = flops["pruned"] / 1e12
        eq = st.equivalent_tokens(0)
        if eq is not None:
            result["equivalent_tokens"] = eq
        handle.restore()
    else:
        result["score_ms"] = 0.0
        result["visual_kept"] = n_visual
        result["llm_prefill_tflops"] = _flops([seq] * shape[3], shape) / 1e12
    return result


# --- the parent: plan, run workers, aggregate ----------------------------------------------------


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .quality import split_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = _method_options(args.option)
    base = dict(arch=args.arch, model=args.model, dtype=args.dtype, device=args.device, attn=args.attn,
                threads=args.threads, vision_layers=args.vision_layers, warmup=args.warmup,
                new_tokens=args.new_tokens)
    out = []
    for frames in args.frames:
        out.append(dict(base, frames=frames, method="none", retain=1.0))
        for method in methods:  # a name, or name:KEY=VALUE[:KEY=VALUE] (its options; -o adds to them)
            name, own = split_method(method)
            for retain in args.retain:
                out.append(dict(base, frames=frames, method=method, name=name, retain=retain,
                                options={**own, **options.get(name, {})}))
    return out


def _run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "tokensieve.bench.speed", "--worker", json.dumps(cfg)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0].removeprefix("error: ")}
    return json.loads(lines[-1])


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(configs: list[dict[str, Any]], runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration with medians/spreads and speed-ups against its baseline."""
    rows = []
    for cfg, results in zip(configs, runs):
        ok = [r for r in results if "error" not in r]
        row: dict[str, Any] = {"method": cfg["method"], "retain": cfg["retain"], "frames": cfg["frames"],
                               "options": cfg.get("options", {})}
        if not ok:
            row["error"] = results[0].get("error", "failed") if results else "not run"
            rows.append(row)
            continue
        for f in FIELDS:
            vals = [float(r[f]) for r in ok if f in r]
            if vals:
                row[f] = _summary(vals)
        if "equivalent_tokens" in ok[0]:
            row["equivalent_tokens"] = ok[0]["equivalent_tokens"]
        rows.append(row)
    base = {r["frames"]: r for r in rows if r["method"] == "none" and "error" not in r}
    for r in rows:
        b = base.get(r["frames"])
        if b is None or "error" in r:
            continue
        r["prefill_speedup"] = b["prefill_ms"]["median"] / r["prefill_ms"]["median"]
        r["end_to_end_speedup"] = b["end_to_end_ms"]["median"] / r["end_to_end_ms"]["median"]
        r["flop_ideal_speedup"] = b["llm_prefill_tflops"]["median"] / r["llm_prefill_tflops"]["median"]
        r["efficiency"] = r["prefill_speedup"] / r["flop_ideal_speedup"]
        r["score_share_of_baseline_prefill"] = r.get("score_ms", {"median": 0.0})["median"] / b["prefill_ms"]["median"]
        r["peak_vs_baseline_mb"] = r["peak_mb"]["median"] - b["peak_mb"]["median"]
    return rows


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
    }


def markdown(result: dict[str, Any]) -> str:
    head = ("| frames | method | retain | visual kept | vision ms | scoring ms | LLM prefill ms | prefill speed-up "
            "| FLOP-ideal | efficiency | decode ms/tok | end-to-end ms | end-to-end speed-up | peak MB | peak rise MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        name = "uncompressed" if r["method"] == "none" else r["method"]
        if "error" in r:
            lines.append(f"| {r['frames']} | {name} | {r['retain']} | error: {r['error']} ||||||||||||")
            continue

        def med(key: str, fmt: str = "{:.0f}") -> str:
            v = r.get(key)
            if v is None:
                return "–"
            text = fmt.format(v["median"])
            if key in ("prefill_ms", "end_to_end_ms") and v["max"] > v["median"] * 1.0001:
                text += f" ({fmt.format(v['min'])}–{fmt.format(v['max'])})"
            return text

        base = r["method"] == "none"
        lines.append(
            f"| {r['frames']} | {name} | {'1.0' if base else r['retain']} | "
            f"{int(r['visual_kept']['median'])}/{int(r['visual_tokens']['median'])} | {med('vision_ms')} | "
            f"{med('score_ms', '{:.1f}')} | {med('prefill_ms')} | "
            f"{'1.00×' if base else '{:.2f}×'.format(r['prefill_speedup'])} | "
            f"{'1.00×' if base else '{:.2f}×'.format(r['flop_ideal_speedup'])} | "
            f"{'–' if base else '{:.0%}'.format(r['efficiency'])} | {med('decode_ms_per_token', '{:.1f}')} | "
            f"{med('end_to_end_ms')} | {'1.00×' if base else '{:.2f}×'.format(r['end_to_end_speedup'])} | "
            f"{med('peak_mb')} | {med('peak_rise_mb')} |"
        )
    return head + "\n".join(lines) + "\n"


NOTES = """
Columns: medians over the repeats (min–max in brackets for the noisy ones). *LLM prefill*:
the language model's first forward. *FLOP-ideal*: baseline prefill FLOPs / this method's
(analytical, per layer). *Efficiency*: measured prefill speed-up / FLOP-ideal. *Peak MB*: peak
resident memory of the worker process (model weights included; on CUDA, max allocated).
*Peak rise*: how far the resident memory rose above its level just before `generate` — the
memory the run itself needed. In-LLM methods (fastv, pdrop, sparsevlm): *visual kept* counts
the tokens reaching the last layer; their retain is the equivalent-token ratio.
*Vision ms*: the vision tower's forward; an encoder stage (`keyframes`, `encoder_frames=…`)
runs it on the frames it keeps only. *End-to-end speed-up*: the whole `generate` against the
uncompressed one — what a user waits for. *Scoring ms* includes choosing those frames.
"""


def plot(result: dict[str, Any], path: Path) -> None:
    """Prefill and end-to-end speed-up of every configuration against its uncompressed run."""
    from ..report.draw import bar_chart

    groups: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        if r["method"] == "none" or "error" in r:
            continue
        groups[f"{r['frames']}f {r['method']} @{r['retain']:g}"] = {
            "LLM prefill": r["prefill_speedup"], "end to end": r["end_to_end_speedup"],
            "prefill FLOP ideal": r["flop_ideal_speedup"]}
    tower = "full tower" if result.get("vision_layers") is None else f"tower cut to {result['vision_layers']} layers"
    bar_chart(groups, title=f"speed-up against the uncompressed model ({result['label']}, {tower})",
              ylabel="speed-up (times)", hline=(1.0, "1x"), path=path)


def run(args: argparse.Namespace) -> int:
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    _validate(args)
    if args.out:
        writable_dir(args.out, "--out")  # before the runs: never lose them for want of a place
    configs = _configs(args)
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    total = len(configs) * args.repeats
    done = 0
    start = time.perf_counter()
    for rep in range(args.repeats):
        for i, cfg in enumerate(configs):
            done += 1
            label = "uncompressed" if cfg["method"] == "none" else f"{cfg['method']}@{cfg['retain']}"
            print(f"[{done}/{total}] frames={cfg['frames']} {label} (repeat {rep + 1}) "
                  f"elapsed {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
            runs[i].append(_run_one(cfg))
            if "error" in runs[i][-1]:
                print(f"    failed: {runs[i][-1]['error']}", file=sys.stderr, flush=True)
    result = {
        "label": args.arch or args.model,
        "arch": args.arch,
        "model": args.model,
        "source": ARCHES[args.arch].source if args.arch else None,
        "vision_layers": args.vision_layers,
        "frames": args.frames,
        "retain": args.retain,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "attn": args.attn,
        "machine": machine_info(args),
        "command": "tokensieve bench speed " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "speed"] else sys.argv[1:]),
        "rows": aggregate(configs, runs),
    }
    depth = ("the full published depth" if args.vision_layers is None
             else f"cut to {args.vision_layers} layers (`--vision-layers`: a quick run, not an end-to-end headline)")
    table = f"`{result['command']}`\n\nVision tower: {depth}.\n\n" + markdown(result) + NOTES
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"speed-{result['label']}".replace("/", "_")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(table)
        plot(result, out / f"{stem}.png")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        print(f"error: {len(failed)} of {len(result['rows'])} configurations failed "
              f"(first: {failed[0]['method']}: {failed[0]['error']})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokensieve bench speed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
