"""Do the embedded model's visual tokens live in its word-embedding space?

Text-guided scores (LFTR ``spatial="text"``, SparseVLM's raters) assume that the projector's
outputs sit near the word embeddings of what they show, as LLaVA-style alignment pre-training
makes them. The embedded model's projector was trained from scratch on question answering
only. This script measures the property instead of assuming it: for every shape in held-out
clips, the visual token of its cell (one cell = one token on the embedded LLaVA-OneVision:
8-pixel patches, 2×2 pooling) is compared by cosine with the input embeddings of every colour
word and every shape word.

Reported per attribute (colour, shape): the mean cosine with the right word and with the other
words, and how often the right word is the nearest one (chance: 1 / number of words); the same
for background tokens (cells without a shape) as a control.

    python benchmarks/quality/alignment.py --clips 200 --model embedded --out benchmarks/quality
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def measure(clips: int, seed: int, model_name: str = "embedded") -> dict:
    from tokensieve.bench.quality import load_for_bench
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import FRAMES_PER_TOKEN, arch_of, load_device, prompt_for, structural_video_tokens, video_token_of

    model, processor = load_device() if model_name == "device" else load_for_bench(model_name)
    model.eval()
    per_token = FRAMES_PER_TOKEN[arch_of(model)]
    video_id = video_token_of(model)
    tok = processor.tokenizer
    emb = model.get_input_embeddings().weight.detach().float()
    words = {"colour": list(synthvid.COLOURS), "shape": list(synthvid.SHAPES)}
    ids = {k: [tok.convert_tokens_to_ids(w) for w in v] for k, v in words.items()}
    for k, v in ids.items():
        if any(i is None or i == tok.unk_token_id for i in v):
            raise SystemExit(f"the tokenizer has no single token for every {k} word: {words[k]}")
    table = {k: torch.nn.functional.normalize(emb[v], dim=-1) for k, v in ids.items()}
    stats = {k: {"right": [], "others": [], "nearest": 0, "n": 0} for k in words}
    background = {k: {"nearest_hist": [0] * len(words[k]), "n": 0, "mean_cos": []} for k in words}
    for s in synthvid.heldout_seeds(clips, seed):
        ex = synthvid.make_example(s)
        inputs = processor(text=[prompt_for(processor, ex.question)], videos=[ex.frames], return_tensors="pt")
        with torch.inference_mode():  # the decoder's input at the visual positions: the projector's output
            hidden = model(**inputs, output_hidden_states=True).hidden_states[0][0]
        f = hidden[inputs["input_ids"][0] == video_id].float()
        f = f[: f.shape[0] - structural_video_tokens(model)]
        G = synthvid.GRID
        T = len(ex.frames) // per_token
        f = torch.nn.functional.normalize(f.view(T, G * G, -1), dim=-1)
        # Qwen2-VL: a token covers two frames; it is compared with the shapes of the pair's first frame
        objects = [ex.objects[t * per_token] for t in range(T)]
        for t, objs in enumerate(objects):
            occupied = set()
            for o in objs:
                cell = o.cell[0] * G + o.cell[1]
                occupied.add(cell)
                v = f[t, cell]
                for k, value in (("colour", o.colour), ("shape", o.shape)):
                    cos = table[k] @ v
                    j = words[k].index(value)
                    st = stats[k]
                    st["right"].append(float(cos[j]))
                    st["others"].extend(float(c) for i, c in enumerate(cos) if i != j)
                    st["nearest"] += int(int(cos.argmax()) == j)
                    st["n"] += 1
            for cell in range(G * G):
                if cell in occupied:
                    continue
                for k in words:
                    cos = table[k] @ f[t, cell]
                    background[k]["nearest_hist"][int(cos.argmax())] += 1
                    background[k]["mean_cos"].append(float(cos.mean()))
                    background[k]["n"] += 1
    result = {"model": model_name, "clips": clips, "seed": seed, "words": words, "attributes": {}}
    for k in words:
        st, bg = stats[k], background[k]
        result["attributes"][k] = {
            "objects": st["n"],
            "mean_cos_right_word": sum(st["right"]) / max(1, len(st["right"])),
            "mean_cos_other_words": sum(st["others"]) / max(1, len(st["others"])),
            "right_word_nearest": st["nearest"] / max(1, st["n"]),
            "chance": 1.0 / len(words[k]),
            "background_tokens": bg["n"],
            "background_mean_cos": sum(bg["mean_cos"]) / max(1, len(bg["mean_cos"])),
            "background_nearest_word_share": {w: c / max(1, bg["n"]) for w, c in zip(words[k], bg["nearest_hist"])},
        }
    return result


def markdown(result: dict, command: str) -> str:
    lines = [f"# Visual tokens vs word embeddings (`{result['model']}`)\n\n`{command}`\n",
             f"{result['clips']} held-out clips. Cosine of each shape's visual token (post-projector) with the "
             "input embedding of each colour / shape word.\n",
             "| attribute | objects | cos(right word) | cos(other words) | right word nearest | chance | "
             "background cos (mean over words) |",
             "|---|---|---|---|---|---|---|"]
    for k, a in result["attributes"].items():
        lines.append(f"| {k} | {a['objects']} | {a['mean_cos_right_word']:.3f} | {a['mean_cos_other_words']:.3f} | "
                     f"{100 * a['right_word_nearest']:.1f}% | {100 * a['chance']:.1f}% | {a['background_mean_cos']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded",
                        help="embedded, embedded-qwen2-vl, device (the 4-layer model, trained without the alignment "
                        "loss) or a model directory (default: %(default)s)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = measure(args.clips, args.seed, args.model)
    command = "python benchmarks/quality/alignment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(result, command)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "alignment" if args.model == "embedded" else f"alignment-{Path(args.model).name}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
