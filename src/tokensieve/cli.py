"""Command line interface: ``tokensieve methods | make-tiny | run | demo | bench``.

``tokensieve run`` loads a Hugging Face video LLM, compresses its visual tokens with a
registered method and answers one question about a video or an image, reporting how many
visual tokens the model saw before and after compression and how long prefill and the whole
generation took. Every error the user can cause ends in one ``error: ...`` line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from tokensieve._argtypes import non_negative_int, positive_int
from tokensieve.errors import InputError, TokensieveError, first_line

__all__ = ["build_parser", "main"]

_DTYPES = ("float32", "bfloat16", "float16")
_ATTN = ("sdpa", "eager")
_POSITIONS = ("preserve", "compact")


# ---------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------


def _retain(text: str) -> float:
    """``--retain``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] (fraction of visual tokens kept), got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (see :func:`tokensieve._argtypes.key_value`)."""
    from ._argtypes import key_value

    return key_value(text)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = dict(args.option)
    named = {
        "budget": args.budget,
        "temporal": args.temporal,
        "spatial": args.spatial,
        "temporal_ratio": args.temporal_rate,
        "spatial_ratio": args.spatial_rate,
    }
    if args.method == "sparsevlm" and named["budget"] is not None:  # its own 'budget' is the keep schedule
        named["frame_budget"] = named.pop("budget")
    options.update({k: v for k, v in named.items() if v is not None})
    if "positions" in options:  # one name for every method: compress(positions=...), i.e. --positions
        value = options.pop("positions")
        if value not in _POSITIONS:
            raise InputError(f"-o positions must be one of {', '.join(_POSITIONS)}, got {value!r}")
        if args.positions is not None and args.positions != value:
            raise InputError(f"positions given twice with different values: --positions {args.positions} "
                             f"and -o positions={value}")
        args.positions = value
    return options


def _question_mask(processor: Any, input_ids: Any, question: str) -> Any:
    """Mark the question's tokens in ``input_ids`` ``[1, L]``; ``None`` when they cannot be found."""
    import torch

    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return None
    row = input_ids[0].tolist()
    for text in (question, " " + question, "\n" + question):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        for start in range(len(row) - n, -1, -1):
            if n and row[start : start + n] == ids:
                mask = torch.zeros_like(input_ids, dtype=torch.bool)
                mask[0, start : start + n] = True
                return mask
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``tokensieve`` argument parser with its three subcommands."""
    from tokensieve.tiny import ARCHS

    parser = argparse.ArgumentParser(
        prog="tokensieve",
        description="Training-free visual token compression for Hugging Face video LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    methods = sub.add_parser("methods", help="list the registered compression methods")
    methods.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    methods.set_defaults(func=_cmd_methods)

    tiny = sub.add_parser("make-tiny", help="write a tiny randomly initialised model + processor")
    tiny.add_argument("path", metavar="PATH", help="output directory")
    tiny.add_argument("--arch", choices=ARCHS, default="llava-onevision", help="architecture (default: %(default)s)")
    tiny.add_argument("--seed", type=non_negative_int, default=0, help="weight initialisation seed (default: %(default)s)")
    tiny.set_defaults(func=_cmd_make_tiny)

    run = sub.add_parser("run", help="answer a question about a video or image with a compressed model")
    run.add_argument("--model", required=True, metavar="ID_OR_PATH", help="Hugging Face model id or local directory")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", metavar="FILE", help="video file to ask about")
    source.add_argument("--image", metavar="FILE", help="image file to ask about")
    run.add_argument("--question", required=True, metavar="TEXT", help="the question")
    run.add_argument("--method", default="vidcom2", help="compression method, or 'none' (default: %(default)s)")
    run.add_argument(
        "--retain", type=_retain, default=0.25, help="fraction of visual tokens kept, in (0, 1] (default: %(default)s)"
    )
    run.add_argument(
        "--frames", type=positive_int, default=32, help="frames sampled from the video, >= 1 (default: %(default)s)"
    )
    run.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default: %(default)s)"
    )
    run.add_argument(
        "--positions", choices=_POSITIONS, default=None, help="position ids of kept tokens (default: the method's)"
    )
    run.add_argument("--budget", choices=("uniform", "fca"), default=None,
                     help="per-frame budget policy for methods that accept one (default: the method's)")
    run.add_argument("--temporal", choices=("similarity", "differential", "off"), default=None,
                     help="lftr: temporal stage (default: similarity)")
    run.add_argument("--spatial", choices=("text", "topic", "off"), default=None,
                     help="lftr: spatial stage (default: text)")
    run.add_argument("--temporal-rate", type=_retain, default=None, metavar="R",
                     help="lftr: fraction kept by the temporal stage, in (0, 1] (overrides --retain)")
    run.add_argument("--spatial-rate", type=_retain, default=None, metavar="R",
                     help="lftr: fraction of the temporal output kept by the spatial stage, in (0, 1]")
    run.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                     help="any method option, e.g. -o exact=false -o seed=3 (repeatable)")
    run.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (default: %(default)s)")
    run.add_argument("--attn", choices=_ATTN, default="sdpa", help="attention implementation (default: %(default)s)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.set_defaults(func=_cmd_run)

    evaluate = sub.add_parser("eval", help="evaluate with lmms-eval: write the offline task (make-task)")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="KIND", required=True)
    task = eval_sub.add_parser(
        "make-task", help="write the offline lmms-eval task tokensieve_synthvid (held-out synthetic video questions)",
        description="Write the offline lmms-eval task tokensieve_synthvid into DIR: lossless clips, data.jsonl "
                    "and the task YAML; then run lmms-eval with --include_path DIR.")
    task.add_argument("path", metavar="DIR", help="output directory")
    task.add_argument("--n", type=positive_int, default=50, help="questions (default: %(default)s)")
    task.add_argument("--seed", type=non_negative_int, default=0,
                      help="held-out set (the quality bench's --seed; default: %(default)s)")
    task.add_argument("--max-new-tokens", type=positive_int, default=2,
                      help="generation budget per answer (default: %(default)s, as the quality bench)")
    task.set_defaults(func=_cmd_make_task)

    # Commands that live in their own modules: each module offers
    # ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when used.
    for name, module, help_text in _PLUGINS:
        _add_plugin(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="measure methods: speed (latency, memory, FLOPs) or quality (accuracy)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    for name, module, help_text in _BENCH_PLUGINS:
        _add_plugin(bench_sub, name, module, help_text)
    return parser


#: (command, module, help) of top-level commands implemented elsewhere
_PLUGINS: tuple[tuple[str, str, str], ...] = (
    ("demo", "tokensieve.zoo.demo", "offline demo: the embedded video model, uncompressed and compressed"),
    ("cloud", "tokensieve.collab.commands:cloud", "cloud side of the cloud-device collaboration: serve, devices, updates"),
    ("device", "tokensieve.collab.commands:device", "device side: status, upload an uplink payload, pull an update"),
    ("collab", "tokensieve.collab.demo:collab", "the cloud-device round trip offline: `tokensieve collab demo`"),
)
#: (kind, module, help) of ``tokensieve bench KIND``
_BENCH_PLUGINS: tuple[tuple[str, str, str], ...] = (
    ("speed", "tokensieve.bench.speed", "prefill/decode latency, peak memory and FLOPs per method"),
    ("quality", "tokensieve.bench.quality", "accuracy per method × retain × question family"),
    ("collab", "tokensieve.collab.demo:bench", "cloud-device adaptation: AKD against its baselines over rounds"),
)


def _add_plugin(sub: Any, name: str, module: str, help_text: str) -> None:
    import importlib

    module, _, attr = module.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return  # not part of this installation
        raise
    if attr:
        mod = getattr(mod, attr)
    parser = sub.add_parser(name, help=help_text, description=help_text)
    mod.add_arguments(parser)
    parser.set_defaults(func=mod.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 user error).

    Argument errors exit through ``argparse`` (``SystemExit(2)``) before anything is loaded.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args))
    except TokensieveError as exc:
        _error(str(exc))
        return 2


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------


def _positions_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def _spec_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready view of a ``MethodSpec`` (callables left out)."""
    if dataclasses.is_dataclass(spec):
        raw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    else:
        raw = dict(vars(spec))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if callable(value) and not isinstance(value, (str, dict, tuple, list)):
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _cmd_methods(args: argparse.Namespace) -> int:
    import tokensieve

    specs = tokensieve.methods.list()
    if args.json:
        print(json.dumps([_spec_dict(s) for s in specs], indent=2))
        return 0
    header = ("NAME", "STAGE", "TEXT", "ENC-ATTN", "POSITIONS", "REFERENCE-POSITIONS", "BUDGETS", "SUMMARY")
    rows = [
        (
            s.name,
            s.stage,
            "yes" if s.needs_text else "no",
            "yes" if s.needs_encoder_attention else "no",
            _positions_text(s.default_positions),
            _positions_text(s.reference_positions),
            ",".join(s.budget_policies) or "-",
            s.summary,
        )
        for s in specs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    for spec in specs:
        if spec.options:
            print(f"\n{spec.name} options:")
            for name, text in spec.options.items():
                print(f"  {name}: {text}")
    print("\nevery method also takes (the vision-encoder stages; README: Before and inside the vision encoder):")
    for name, text in ENCODER_OPTIONS.items():
        print(f"  {name}: {text}")
    return 0


#: compress(...) options every method takes, shown by ``tokensieve methods``
ENCODER_OPTIONS = {
    "encoder_frames": "fraction of each video's frames the vision encoder sees, in (0, 1] (the others are never encoded)",
    "encoder_policy": "how those frames are chosen from pixels: 'dp' (default), 'topk' or 'uniform'",
    "encoder_merge": "merge tokens inside the vision tower down to this fraction, then unmerge (ToMe; LLaVA-OneVision)",
    "encoder_merge_start": "first tower block that merges (default 0)",
    "encoder_merge_schedule": "'even' (default) or 'early' (halve from the first block until the count)",
    "encoder_cache_mb": "keep recent videos' features up to this many MB: a repeated video skips the tower",
}


# ---------------------------------------------------------------------------------------------
# make-tiny
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide the library's progress bars for the duration of a command."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from tokensieve.tiny import make_tiny

    from tokensieve._argtypes import writable_dir

    target = writable_dir(args.path, "output path")
    with _quiet_progress():
        make_tiny(args.arch, target, seed=args.seed)
    print(f"wrote tiny {args.arch} model and processor to {target}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval make-task
# ---------------------------------------------------------------------------------------------


def _cmd_make_task(args: argparse.Namespace) -> int:
    from tokensieve.eval.synth_task import TASK_NAME, write
    from tokensieve.zoo.model import EMBEDDED_DIRS

    path = write(args.path, args.n, args.seed, max_new_tokens=args.max_new_tokens)
    model = EMBEDDED_DIRS["llava-onevision"]
    print(f"wrote {args.n} questions (held-out set {args.seed}) to {path.parent}; run it with\n"
          f"  lmms-eval --model tokensieve --model_args pretrained={model},device=cpu,dtype=float32,"
          f"method=vidcom2,retain=0.25 --tasks {TASK_NAME} --include_path {path.parent} --batch_size 4 "
          "--log_samples --output_path lmms-runs")
    return 0


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path (not a hub id)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name) or name in {".", ".."}


def _load(name: str, dtype: str, attn: str) -> tuple[Any, Any]:
    """Load ``(model, processor)``; loading failures become :class:`InputError`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tokensieve.processing import load_processor

    if _looks_local(name) and not Path(name).expanduser().exists():
        raise InputError(f"could not load model '{name}': no such directory")
    path = str(Path(name).expanduser()) if _looks_local(name) else name
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise InputError(
            f"could not load model '{name}': the directory has no config.json "
            "(expected a model directory written by save_pretrained, or a hub model id)"
        )
    try:
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"could not load model '{name}': {first_line(exc)}") from exc
    model.eval()
    return model, processor


def _build_inputs(processor: Any, question: str, video: Any | None, image: Any | None) -> Any:
    """Chat prompt + processor call for one video (a ``VideoClip``) or one image."""
    if getattr(processor, "chat_template", None) is None:
        raise InputError("the model's processor has no chat template; expected an instruction-tuned model")
    item = {"type": "video"} if video is not None else {"type": "image"}
    messages = [{"role": "user", "content": [item, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, list):
        prompt = prompt[0]
    if video is not None:
        return processor(
            text=[prompt], videos=[video.frames], video_metadata=[video.metadata()], return_tensors="pt"
        )
    return processor(text=[prompt], images=[image], return_tensors="pt")


def _generate(model: Any, inputs: Any, max_new_tokens: int) -> tuple[Any, float, float]:
    """Greedy ``generate``; returns the output ids, the time to the first token (the prefill)
    and the total time in ms, both from one call on one clock."""
    import torch
    from transformers import LogitsProcessorList

    first: list[float] = []

    def mark(input_ids: Any, scores: Any) -> Any:  # called once per step, after its forward
        if not first:
            first.append(time.perf_counter())
        return scores

    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([mark]))
    end = time.perf_counter()
    return output, ((first[0] if first else end) - start) * 1000.0, (end - start) * 1000.0


def _content_tokens(model: Any, inputs: Any) -> int:
    """Visual content tokens of the (uncompressed) input: placeholders minus structural tokens
    (LLaVA's newlines), counted as the compressed path counts them."""
    import torch

    from tokensieve.models import get_adapter

    with torch.inference_mode():
        prepared = get_adapter(model).prepare(model, dict(inputs))
    return sum(seg.num_frames * seg.tokens_per_frame for row in prepared.segments for seg in row)


def _cmd_run(args: argparse.Namespace) -> int:
    import tokensieve
    from tokensieve.video import load_image, read_video

    options = _method_options(args)
    if args.method != "none":
        spec = tokensieve.methods.get(args.method)  # unknown method or option: fail before any loading
        from tokensieve.methods.encoder import method_options_only

        selector = spec.create(**method_options_only(options))
        needs_text = spec.signals(selector)[0]
    elif options:
        raise InputError("method options were given with --method none")
    clip = read_video(args.video, args.frames) if args.video else None
    image = load_image(args.image) if args.image else None

    with _quiet_progress():
        model, processor = _load(args.model, args.dtype, args.attn)
    try:
        inputs = _build_inputs(processor, args.question, clip, image)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TokensieveError):
            raise
        raise InputError(f"could not prepare the inputs for '{args.model}': {first_line(exc)}") from exc
    inputs = inputs.to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(model.dtype)
    prompt_len = int(inputs["input_ids"].shape[1])
    visual_tokens = _content_tokens(model, inputs) if args.method == "none" else None

    handle = None
    if args.method != "none":
        handle = tokensieve.compress(model, args.method, retain=args.retain, positions=args.positions, **options)
        mask = _question_mask(processor, inputs["input_ids"], args.question) if needs_text else None
        if mask is not None:
            inputs["question_mask"] = mask
    try:
        _generate(model, inputs, 1)  # warm-up: the first call pays one-time costs
        output, prefill_ms, total_ms = _generate(model, inputs, args.max_new_tokens)
        stats = tokensieve.stats(model) if handle is not None else None
    finally:
        if handle is not None:
            handle.restore()

    new_tokens = output[:, prompt_len:]
    answer = processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    before = stats.tokens_before if stats is not None else visual_tokens
    after = stats.tokens_after if stats is not None else visual_tokens
    result: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "retain": args.retain if handle is not None else 1.0,
        "positions": handle.positions if handle is not None else None,
        "options": options,
        "question_tokens": int(inputs["question_mask"].sum()) if "question_mask" in inputs else None,
        "input": {
            "kind": "video" if clip is not None else "image",
            "path": args.video or args.image,
            "frames": len(clip.frames) if clip is not None else 1,
            "frame_indices": list(clip.indices) if clip is not None else [0],
        },
        "question": args.question,
        "answer": answer,
        "new_tokens": int(new_tokens.shape[1]),
        "prompt_tokens": prompt_len,
        "tokens_before": int(before),
        "tokens_after": int(after),
        "prefill_ms": round(prefill_ms, 3),
        "total_ms": round(total_ms, 3),
        "stats": stats.as_dict() if stats is not None else None,
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    kept = f" ({100.0 * after / before:.1f}% kept)" if before else ""
    print(f"answer: {answer}")
    print(f"visual tokens: {before} -> {after}{kept}")
    print(f"method: {args.method}" + (f" (retain {args.retain}, positions {result['positions']})" if handle else ""))
    print(f"prefill: {prefill_ms:.1f} ms")
    print(f"total: {total_ms:.1f} ms ({result['new_tokens']} new tokens)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
