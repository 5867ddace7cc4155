"""How much VidCom2 scoring adds to a prefill of the same input.

Input: one video of 32 frames × 196 tokens × 3584 channels (LLaVA-OneVision-7B after
pooling), fp32. The prefill reference is a Qwen2-7B-shaped decoder layer (hidden 3584,
MLP 18944, 28 query / 4 key-value heads, SDPA) run on the same 6,272 visual tokens plus a
short prompt, with random weights (speed does not depend on weight values); the full
28-layer prefill is that time × 28 (the embedding and LM head are left out, which only
makes the ratio look worse for tokensieve).

    python benchmarks/scoring_overhead.py [--threads 2] [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from tokensieve.methods import VidCom2

T, M, D = 32, 196, 3584
PROMPT = 64
LAYERS = 28


def median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.randn(T, M, D)
    selector = VidCom2()
    selector.select(x, 0.25)  # warm-up
    score_ms, score_all = median_ms(lambda: selector.select(x, 0.25), args.repeats)
    print(f"vidcom2 scoring of [{T}, {M}, {D}] fp32: median {score_ms:.1f} ms over {args.repeats}")

    cfg = Qwen2Config(hidden_size=D, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                      num_hidden_layers=1, vocab_size=1024, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(cfg, 0).eval()
    rope = Qwen2RotaryEmbedding(cfg)
    L = T * M + PROMPT
    h = torch.randn(1, L, D) * 0.02
    pos = torch.arange(L)[None]
    cos_sin = rope(h, pos)

    def run_layer():
        with torch.no_grad():
            layer(h, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)

    print(f"timing one Qwen2-7B decoder layer on {L} tokens ({args.layer_repeats} runs) ...", flush=True)
    layer_ms, layer_all = median_ms(run_layer, args.layer_repeats)
    prefill_ms = layer_ms * LAYERS
    ratio = score_ms / prefill_ms
    print(f"one layer: {layer_ms:.0f} ms; {LAYERS}-layer prefill ≈ {prefill_ms / 1000:.1f} s")
    print(f"scoring / prefill = {100 * ratio:.4f} %")

    result = {
        "input": {"T": T, "M": M, "D": D, "dtype": "float32", "prompt_tokens": PROMPT},
        "vidcom2_score_ms": {"median": score_ms, "all": score_all},
        "decoder_layer_ms": {"median": layer_ms, "all": layer_all, "shape": "Qwen2-7B (3584/18944/28q/4kv), sdpa"},
        "prefill_ms_estimate": prefill_ms,
        "layers": LAYERS,
        "score_over_prefill": ratio,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "command": "python benchmarks/scoring_overhead.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoring_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scoring_overhead.md").write_text(
        "| input | vidcom2 scoring (median) | 1 decoder layer (Qwen2-7B shape) | 28-layer prefill (est.) | scoring / prefill |\n"
        "|---|---|---|---|---|\n"
        f"| {T}×{M}×{D} fp32 | {score_ms:.1f} ms | {layer_ms / 1000:.2f} s | {prefill_ms / 1000:.1f} s | "
        f"{100 * ratio:.4f} % |\n\n"
        f"Machine: {result['machine']['threads']} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Command: `{result['command']}`\n"
    )


if __name__ == "__main__":
    main()
