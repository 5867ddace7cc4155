"""Where the embedded model looks when it answers ``count`` questions.

``python benchmarks/quality/count_attention.py [--model PATH] [--n 100]`` takes the first
``--n`` ``count`` questions of the held-out set (set 0, as ``tokensieve bench quality`` uses),
runs one uncompressed forward pass with eager attention, and prints, from each question's
answer position:

* in the first decoder layer, per head, the attention on the question's colour word and on its
  shape word (*how many times did the* **red circle** *appear*);
* in the guided layers, on the count head (``tokensieve.zoo.train.COUNT_HEAD``), the mean
  attention per visual token on the target, on distractors of the same colour but another
  shape, of the same shape but another colour, and of neither, and on the first token;
* the share of answers right (the answer word's logit is the largest).

Any model trained by ``python -m tokensieve.zoo.train`` can be passed; to see an earlier
embedded model, check out its commit (e.g. ``git worktree add /tmp/old <commit>``) and pass
``--model /tmp/old/src/tokensieve/zoo/embedded``.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from tokensieve.zoo import synthvid
from tokensieve.zoo.model import EMBEDDED_DIR, build_processor, build_tokenizer
from tokensieve.zoo.train import COUNT_HEAD, GUIDED_LAYERS, _track_tokens, make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_DIR))
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    processor = build_processor(build_tokenizer())
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").eval()
    seeds = synthvid.heldout_seeds(20 * args.n, 0)
    examples = list(itertools.islice((e for e in map(synthvid.make_example, seeds) if e.family == "count"), args.n))
    batch = make_batch(processor, examples)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], pixel_values_videos=batch["pixel_values_videos"],
                    output_attentions=True)
    b = len(examples)
    rows = torch.arange(b)
    pos = batch["answer_pos"][:, 0]
    right = (out.logits[rows, pos].argmax(-1) == batch["answer_ids"][:, 0]).float().mean()
    print(f"{args.model}: {b} count questions, {100 * float(right):.1f}% answered right\n")

    vocab = processor.tokenizer.get_vocab()
    ids = batch["input_ids"]
    colour_word = torch.isin(ids, torch.tensor([vocab[c] for c in synthvid.COLOURS])) & batch["question_words"][:, 0]
    shape_word = torch.isin(ids, torch.tensor([vocab[s] for s in synthvid.SHAPES])) & batch["question_words"][:, 0]
    print("first decoder layer, attention from the answer position (mean over questions)")
    print("head  colour word  shape word")
    for head in range(out.attentions[0].shape[1]):
        att = out.attentions[0][rows, head, pos]  # [B, L]
        print(f"{head:>4}  {float((att * colour_word).sum(-1).mean()):>11.3f}  {float((att * shape_word).sum(-1).mean()):>10.3f}")

    video_id = int(model.config.video_token_index)
    n = synthvid.FRAMES * synthvid.GRID * synthvid.GRID
    visual = torch.nonzero(ids == video_id)[:, 1].view(b, n + 1)[:, :n]
    first = batch["attention_mask"].long().argmax(-1)
    groups = {name: torch.zeros(b, n, dtype=torch.bool) for name in ("target", "same colour", "same shape", "neither")}
    for i, example in enumerate(examples):
        target = next(o for row in example.objects for o in row if o.name == "target")

        def kind(o: synthvid.ObjectFrame, t: synthvid.ObjectFrame = target) -> str:
            if o.name == "target":
                return "target"
            return {(True, False): "same colour", (False, True): "same shape"}.get(
                (o.colour == t.colour, o.shape == t.shape), "neither")

        for name in groups:
            groups[name][i] = torch.from_numpy(_track_tokens(example, lambda o, name=name: kind(o) == name))
    print(f"\ncount head {COUNT_HEAD}, attention per visual token from the answer position (mean over tokens)")
    print("layer  " + "  ".join(f"{name:>11}" for name in groups) + "  first token")
    for layer in GUIDED_LAYERS:
        att = out.attentions[layer][rows, COUNT_HEAD, pos]
        on_visual = att.gather(1, visual)
        cells = [float(on_visual[mask].mean()) if mask.any() else float("nan") for mask in groups.values()]
        print(f"{layer:>5}  " + "  ".join(f"{c:>11.4f}" for c in cells) + f"  {float(att[rows, first].mean()):>11.3f}")


if __name__ == "__main__":
    main()
