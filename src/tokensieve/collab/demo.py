"""``tokensieve collab demo`` and ``tokensieve bench collab``: the cloud–device round trip, offline.

The device is the embedded video model (:mod:`tokensieve.zoo`), the cloud teacher the shipped
larger model that shares its vision encoder; clips come from :mod:`tokensieve.zoo.synthvid` in
shifted domains (``dusk``, ``fog``). Everything goes through a real collaboration service on
loopback (:mod:`tokensieve.collab.rounds`). Both commands write ``collab.json``, ``collab.md``,
``report.html`` and PNG charts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .._argtypes import float_in, positive_int, writable_dir
from ..errors import InputError

#: What ``bench collab`` compares by default (every variant of :data:`rounds.VARIANTS`).
BENCH_VARIANTS = ("none", "pseudo-label", "akd", "akd-no-replay", "akd-all", "oracle", "teacher")

LABELS = {
    "none": "no adaptation",
    "pseudo-label": "pseudo-labels only (L_CE)",
    "akd": "AKD (UTS uplink)",
    "akd-no-replay": "AKD without source replay",
    "akd-all": "AKD, everything uplinked (no UTS)",
    "oracle": "true target labels, L_CE only",
    "teacher": "cloud teacher",
}


def _domains(text: str) -> tuple[str, ...]:
    from ..zoo import synthvid

    names = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in names if d not in synthvid.DOMAINS or d == "source"]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated shifted domains ({', '.join(d for d in synthvid.DOMAINS if d != 'source')}), "
            f"one per round, got {text!r}")
    return names


_replay = float_in(0.0, 10.0)


def _variants(text: str) -> tuple[str, ...]:
    from .rounds import VARIANTS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated variants from {', '.join(VARIANTS)}, got {text!r}")
    return names


def _common(parser: argparse.ArgumentParser, *, out: str, domains: str, stream: int, eval_n: int) -> None:
    from dataclasses import fields

    from .akd import AKDConfig
    from .rounds import RoundsConfig
    from .uplink import DTYPES

    defaults = {f.name: f.default for cls in (AKDConfig, RoundsConfig) for f in fields(cls)}  # never instantiated here
    parser.add_argument("--out", default=out, help="output directory (default: %(default)s)")
    parser.add_argument("--domains", type=_domains, default=_domains(domains), metavar="D[,D...]",
                        help=f"the shifted domain of each round, in order (default: {domains})")
    parser.add_argument("--stream", type=positive_int, default=stream,
                        help="clips the device answers per round (default: %(default)s)")
    parser.add_argument("--max-uplink", type=positive_int, default=defaults["max_uplink"],
                        help="most uncertain clips uplinked per round (default: %(default)s)")
    parser.add_argument("--uplink-share", type=float_in(0, 1, low_open=True), default=defaults["uplink_share"],
                        metavar="S",
                        help="most bytes uplinked per round, as a share of the streamed clips' raw frames; the "
                        "least confident clips go first (default: %(default)s)")
    parser.add_argument("--eval-n", type=positive_int, default=eval_n,
                        help="held-out clips per domain for each accuracy (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=4, help="AKD epochs per round (default: %(default)s)")
    parser.add_argument("--replay", type=_replay, default=defaults["replay"],
                        help="source clips the cloud replays per uplinked clip, learnt with L_CE and L_anchor so the device "
                        "keeps the source domain (0: the paper's AKD alone; default: %(default)s)")
    parser.add_argument("--anchor", type=float_in(0.0, 1000.0), default=defaults["anchor"], metavar="W",
                        help="weight of L_anchor, which keeps the replayed source clips' hidden states where they "
                        "were (0: off; default: %(default)s)")
    parser.add_argument("--uplink-dtype", choices=DTYPES, default=defaults["uplink_dtype"],
                        help="precision of the uplinked tokens (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="cloud teacher directory (default: the shipped one)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="collab_command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="one device, one cloud, a shifted stream: the round trip on loopback",
                          description="Run the cloud-device round trip offline (embedded device model, shipped "
                          "teacher, a real service on loopback) and write a JSON + HTML report.")
    _common(demo, out="collab-demo", domains="dusk", stream=1000, eval_n=300)
    demo.add_argument("--variant", type=_variants, default=("akd",), metavar="V[,V...]",
                      help="what the cloud does (default: akd; see `tokensieve bench collab`)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, out="benchmarks/collab", domains="dusk,fog", stream=1000, eval_n=300)
    parser.add_argument("--variants", type=_variants, default=BENCH_VARIANTS, metavar="V[,V...]",
                        help=f"what to compare (default: {','.join(BENCH_VARIANTS)})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the variants an interrupted run of the same command already finished "
                        "(saved after each one in OUT/collab.partial.json)")


def _require_extras() -> None:
    import importlib.util

    missing = [m for m in ("peft", "ptwt", "pywt", "httpx", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"the cloud-device collaboration needs {', '.join(missing)}: pip install 'tokensieve[collab]'")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import torch

    from ..zoo.model import load_device, load_model, load_teacher

    torch.set_num_threads(args.threads)
    device_model, processor = load_device()
    teacher = load_model(args.teacher)[0] if args.teacher else load_teacher()[0]
    own = device_model.model.vision_tower.state_dict()
    theirs = teacher.model.vision_tower.state_dict() if hasattr(teacher, "model") else {}
    if own.keys() != theirs.keys() or any(not torch.equal(own[k], theirs[k]) for k in own):
        raise InputError("the teacher must share the device's vision encoder (it reads the tokens the device "
                         "uplinks); this one's differs")
    if teacher.config.text_config.vocab_size != device_model.config.text_config.vocab_size:
        raise InputError("the teacher must share the device's tokenizer; its vocabulary differs")
    return device_model, teacher, processor


def _run_variants(args: argparse.Namespace, variants: Sequence[str]) -> dict[str, Any]:
    _require_extras()
    from transformers.utils import logging as hf_logging

    from .akd import AKDConfig
    from .rounds import RoundsConfig, run_rounds

    out = writable_dir(args.out, "--out")
    hf_logging.disable_progress_bar()
    device_model, teacher, processor = _setup(args)
    cfg = RoundsConfig(domains=tuple(args.domains), stream=args.stream, max_uplink=args.max_uplink,
                       uplink_share=args.uplink_share, eval_n=args.eval_n, replay=args.replay,
                       uplink_dtype=args.uplink_dtype,
                       akd=AKDConfig(epochs=args.epochs, anchor=args.anchor))
    runs: dict[str, Any] = {}
    partial = out / "collab.partial.json"
    if getattr(args, "resume", False) and partial.is_file():
        saved = json.loads(partial.read_text(encoding="utf-8"))
        runs = {v: r for v, r in saved.get("runs", {}).items() if v in variants}
        print(f"resuming: {', '.join(runs) or 'nothing'} already done", file=sys.stderr)
    for variant in variants:
        if variant in runs:
            continue
        with tempfile.TemporaryDirectory(prefix="tokensieve-collab-") as root:
            runs[variant] = run_rounds(device_model, teacher, processor, cfg, variant, service_root=root,
                                       log=lambda m: print(m, file=sys.stderr, flush=True))
        # after every variant, so a long run that stops can go on with --resume
        partial.write_text(json.dumps({"runs": runs}, indent=2, default=str) + "\n", encoding="utf-8")
    # every variant's own time, so that a run resumed with --resume still reports the whole of it
    seconds = sum(float(run.get("seconds", 0.0)) for run in runs.values())
    result = {"runs": {v: runs[v] for v in variants}, "seconds": round(seconds, 1),
              "device_model": "tokensieve.zoo device", "teacher": str(args.teacher or "tokensieve.zoo teacher")}
    _write(out, result)
    partial.unlink(missing_ok=True)
    return result


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _tables(result: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    runs = result["runs"]
    any_run = next(iter(runs.values()))
    domains = list(any_run["initial"])
    acc_header = ["variant", "after round"] + domains
    acc_rows: list[list[str]] = []
    link_header = ["variant", "round", "domain", "uplinked", "pseudo-labels right", "bytes up", "up / raw frames",
                   "bytes down", "down / model fp16", "device = mirror", "device s", "cloud s"]
    link_rows: list[list[str]] = []
    for variant, run in runs.items():
        label = LABELS.get(variant, variant)
        acc_rows.append([label, "0 (before)"] + [_pct(run["initial"].get(d)) for d in domains])
        for row in run.get("rounds", []):
            acc_rows.append([label, f"{row['round']} ({row['domain']})"]
                            + [_pct(row.get("accuracy", {}).get(d)) for d in domains])
            s = row.get("seconds", {})
            if "bytes_up" in row:
                link_rows.append([
                    label, str(row["round"]), row["domain"], f"{row['uplinked']}/{row['stream']}",
                    _pct(row.get("pseudo_label_accuracy")), f"{row['bytes_up']:,}", _pct(row["uplink_vs_raw_stream"]),
                    f"{row.get('bytes_down', 0):,}", _pct(row.get("downlink_vs_model_fp16")),
                    "yes" if row.get("device_matches_mirror") else "NO",
                    f"{s.get('device_infer', 0) + s.get('uplink', 0) + s.get('device_apply', 0):.0f}",
                    f"{s.get('cloud_label', 0) + s.get('cloud_akd', 0) + s.get('cloud_dwc', 0):.0f}",
                ])
    return acc_header, acc_rows, link_header, link_rows


def _write(out: Path, result: dict[str, Any]) -> None:
    import html

    from ..report import html_page, html_table, markdown_table
    from ..report.draw import line_chart

    (out / "collab.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    acc_header, acc_rows, link_header, link_rows = _tables(result)
    (out / "collab.md").write_text(
        "# Cloud-device collaboration\n\nHeld-out accuracy of the device after each round:\n\n"
        + markdown_table(acc_header, acc_rows) + "\n\nLinks and time per round:\n\n"
        + markdown_table(link_header, link_rows) + "\n", encoding="utf-8")
    runs = result["runs"]
    domains = list(next(iter(runs.values()))["initial"])
    charts = []
    for d in domains:
        series = {}
        for variant, run in runs.items():
            pts = [(0.0, run["initial"][d])]
            if variant == "teacher":
                n_rounds = max((len(r.get("rounds", [])) for r in runs.values()), default=0)
                pts += [(float(i), run["initial"][d]) for i in range(1, n_rounds + 1)]
            elif variant == "none":
                n_rounds = max((len(r.get("rounds", [])) for r in runs.values()), default=0)
                pts += [(float(i), run["initial"][d]) for i in range(1, n_rounds + 1)]
            else:
                pts += [(float(r["round"]), r["accuracy"][d]) for r in run.get("rounds", []) if "accuracy" in r]
            series[variant] = pts  # short names: the legend is narrow; the tables spell them out
        name = f"accuracy_{d}.png"
        line_chart(series, title=f"Device accuracy on held-out {d} clips", xlabel="round", ylabel="accuracy",
                   path=out / name)
        charts.append(name)
    up = {v: [(float(r["round"]), 100 * r["uplink_vs_raw_stream"]) for r in run.get("rounds", []) if "bytes_up" in r]
          for v, run in runs.items()}
    whole = sorted(v for v, pts in up.items() if pts and max(y for _, y in pts) > 50)
    up = {k: v for k, v in up.items() if v and k not in whole}
    if up:
        top = max(y for pts in up.values() for _, y in pts)
        title = "Uplink bytes / raw frames of the stream" + (f" ({', '.join(whole)}: ~100%, not drawn)" if whole else "")
        line_chart(up, title=title, xlabel="round", ylabel="%", ylim=(0.0, 10.0 * max(1, math.ceil(top / 10))),
                   hline=(5.0, "5%"), path=out / "uplink.png")
        charts.append("uplink.png")
    down = {v: [(float(r["round"]), 100 * r["downlink_vs_model_fp16"]) for r in run.get("rounds", [])
                               if "bytes_down" in r] for v, run in runs.items()}
    down = {k: v for k, v in down.items() if v}
    if down:
        top = max(y for pts in down.values() for _, y in pts)
        line_chart(down, title="Downlink bytes / device model in fp16", xlabel="round", ylabel="%",
                   ylim=(0.0, 1.5 * max(1, math.ceil(top / 1.5))), hline=(1.0, "1%"), path=out / "downlink.png")
        charts.append("downlink.png")
    sections = [
        "<p>The embedded device model answers a stream of clips in a shifted domain; the uncertain ones go "
        "up (UTS), the cloud teacher labels them and distils into the device model's adapters (AKD), and a "
        "quantised update comes back (DWC), all through the collaboration service on loopback.</p>",
        "<h2>Held-out accuracy</h2>", html_table(acc_header, acc_rows),
        "<p>Times are wall seconds on the machine that ran it; other jobs may have shared it.</p>",
        "<h2>Links and time</h2>", html_table(link_header, link_rows),
        *[f"<img src='{html.escape(c)}' alt='{html.escape(c)}'>" for c in charts],
    ]
    (out / "report.html").write_text(html_page("tokensieve cloud-device collaboration", sections), encoding="utf-8")


def _print_summary(result: dict[str, Any], out: Path) -> None:
    from ..report import text_table

    acc_header, acc_rows, link_header, link_rows = _tables(result)
    print(text_table(acc_header, acc_rows))
    if link_rows:
        print()
        print(text_table(link_header, link_rows))
    print(f"\nwrote {out / 'collab.json'}, {out / 'report.html'} ({result['seconds']:.0f} s)")


def run_demo(args: argparse.Namespace) -> int:
    result = _run_variants(args, args.variant)
    _print_summary(result, Path(args.out))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    result = _run_variants(args, args.variants)
    _print_summary(result, Path(args.out))
    return 0


class _Plugin:
    def __init__(self, add: Any, run: Any) -> None:
        self.add_arguments, self.run = add, run


collab = _Plugin(add_demo_arguments, run_demo)
bench = _Plugin(add_bench_arguments, run_bench)
