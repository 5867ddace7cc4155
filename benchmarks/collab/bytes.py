"""Uplink and downlink bytes of the cloud–device links on the embedded video model.

Uplink (UTS): for held-out clips, the device's visual tokens (after the projector, what the cloud
model reads) are filtered by UTS (MC-dropout, reference direction, ``mask_ratio`` 0.25 and 0.5)
or by a token-compression method (VidCom2), and packed as the real uplink payload
(safetensors + JSON manifest, ``tokensieve.collab.uplink``). Reported against the raw frames
(uint8 RGB, what a device would otherwise send) and against all visual tokens in fp16.

Downlink (DWC): the trainable set of an adapted device model (every norm and bias of the
embedded model, plus rank-16 LoRA A/B on the language model's q/k/v/o projections, the AKD
recipe's trainable set) moves by a simulated update (a small random step on every tensor); the
``VTDW`` encoding is reported for each quantisation, unlimited and under a byte budget, against
the whole trainable set and the whole model in fp16.

    python benchmarks/collab/bytes.py --out benchmarks/collab

Bytes depend on shapes and options, not on timing: the numbers are exact for the given clips.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def uplink(model, processor, clips: int, seed: int) -> list[dict]:
    from tokensieve.collab.uplink import Uplink, encode_uplink
    from tokensieve.methods.uts import UTS, method_keep
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import prompt_for

    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(clips, seed)]
    feats, raw = [], 0
    for ex in examples:
        inputs = processor(text=[prompt_for(processor, ex.question)], videos=[ex.frames], return_tensors="pt")
        with torch.inference_mode():
            out = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
        f = out.pooler_output[0] if isinstance(out.pooler_output, (list, tuple)) else out.pooler_output
        feats.append(f.reshape(-1, f.shape[-1]).float())
        raw += int(sum(frame.nbytes for frame in ex.frames))
    n = min(x.shape[0] for x in feats)
    tokens = torch.stack([x[:n] for x in feats])  # [B, N, C]
    B, N, C = tokens.shape
    all_fp16 = B * N * C * 2
    rows = []
    configs = [("uts", 0.25), ("uts", 0.5), ("vidcom2", 0.25), ("vidcom2", 0.1)]
    for name, ratio in configs:
        if name == "uts":
            keep = UTS(mask_ratio=ratio).tokens_to_keep(tokens)
            label = f"UTS mc_dropout, mask_ratio {ratio}"
        else:
            T = len(examples[0].frames)
            keep = torch.stack([method_keep(tokens[b, : (N // T) * T].view(T, N // T, C), "vidcom2", ratio)
                                for b in range(B)])
            keep = torch.nn.functional.pad(keep, (0, N - keep.shape[1]))
            label = f"vidcom2 retain {ratio}"
        for payload in ("sparse", "dense_zeroed"):
            up = Uplink("device-0", 1, [str(i) for i in range(B)], tokens.half(), keep, answers=[""] * B,
                        confidences=[0.0] * B)
            blob, manifest = encode_uplink(up, payload)
            total = len(blob) + len(json.dumps(manifest).encode())
            rows.append({"filter": label, "payload": payload, "samples": B, "tokens_per_sample": N,
                         "kept_tokens": int(keep.sum()), "bytes": total, "raw_frames_bytes": raw,
                         "all_tokens_fp16_bytes": all_fp16, "vs_raw_frames": total / raw,
                         "vs_all_tokens_fp16": total / all_fp16})
    return rows


def adapted_state(model, rank: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """The device's trainable set (norms, biases, LoRA A/B on q/k/v/o of the LLM) and the whole
    model's parameter count."""
    state: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            state[name] = p.detach().to(torch.float16).clone()
    for name, module in model.model.language_model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            state[f"model.language_model.{name}.lora_A.weight"] = (0.01 * torch.randn(rank, module.in_features, generator=g)).half()
            state[f"model.language_model.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=torch.float16)
    return state, sum(p.numel() for p in model.parameters())


def downlink(model) -> list[dict]:
    from tokensieve.collab import dwc

    device, params = adapted_state(model)
    g = torch.Generator().manual_seed(1)
    cloud = {n: (t.float() + 1e-2 * t.float().abs().mean().clamp_min(1e-3) * torch.randn(t.shape, generator=g)).half()
             for n, t in device.items()}
    trainable = sum(t.numel() for t in device.values())
    model_fp16 = 2 * params
    rows = []
    for quant in dwc.QUANTS:
        for select, budget in (("tensor_budget", math.inf), ("tensor_budget", 20_000), ("element_topq", math.inf)):
            enc = dwc.encode_update(cloud, device, round=1, quant=quant, select=select, budget=budget)
            rows.append({"quant": quant, "select": select, "budget_bytes": None if math.isinf(budget) else budget,
                         "tensors_sent": len(enc.sent), "tensors": len(device), "bytes": len(enc.data),
                         "trainable_values": trainable, "trainable_fp16_bytes": 2 * trainable,
                         "model_fp16_bytes": model_fp16, "vs_trainable_fp16": len(enc.data) / (2 * trainable),
                         "vs_model_fp16": len(enc.data) / model_fp16})
    return rows


def markdown(result: dict) -> str:
    up = ["| uplink filter | payload | kept / all tokens | bytes | vs raw frames | vs all tokens fp16 |",
          "|---|---|---|---|---|---|"]
    for r in result["uplink"]:
        up.append(f"| {r['filter']} | {r['payload']} | {r['kept_tokens']} / {r['samples'] * r['tokens_per_sample']} | "
                  f"{r['bytes']:,} | {100 * r['vs_raw_frames']:.2f}% | {100 * r['vs_all_tokens_fp16']:.1f}% |")
    down = ["| quant | select | budget | tensors sent | bytes | vs trainable fp16 | vs model fp16 |",
            "|---|---|---|---|---|---|---|"]
    for r in result["downlink"]:
        down.append(f"| {r['quant']} | {r['select']} | {r['budget_bytes'] or '∞'} | {r['tensors_sent']}/{r['tensors']} | "
                    f"{r['bytes']:,} | {100 * r['vs_trainable_fp16']:.1f}% | {100 * r['vs_model_fp16']:.3f}% |")
    head = (f"# Cloud–device link bytes (embedded model)\n\n`{result['command']}`\n\n"
            f"{result['clips']} held-out clips; raw frames = uint8 RGB of every frame.\n\n")
    return head + "\n".join(up) + "\n\n" + "\n".join(down) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from tokensieve.zoo.model import load_device

    model, processor = load_device()
    model.eval()
    result = {"command": "python benchmarks/collab/bytes.py " + " ".join(sys.argv[1:]), "clips": args.clips,
              "uplink": uplink(model, processor, args.clips, args.seed), "downlink": downlink(model)}
    md = markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bytes.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bytes.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
