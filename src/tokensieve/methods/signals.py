"""Signals a method may ask for, computed from plain tensors.

``frame_mean_attention`` is the summary-token stand-in for encoders without a [CLS] token or
an attention-pooling head (Qwen2-VL/2.5-VL's ViT, LLaVA-OneVision's headless SigLIP):
``a[t, m] = <x[t, m], mean_m x[t]> / sqrt(D)`` — the attention logit a pseudo-[CLS] query (the
frame mean) would give each token; softmax is monotone, so rankings are the same
(``specs/lftr.md`` §3.5.1).

``received_attention`` is the stand-in for "attention each token receives" in the tower's last
layer (head and query mean, ``specs/sota.md``'s U3, which FlashVID and HoliTom read):
``a[t, m] = mean_i softmax_j(<x_i, x_j> / sqrt(D))[m]`` over the frame's own tokens.

``question_positions`` picks the question's tokens in one sample.
"""

from __future__ import annotations

import math

import torch


def frame_mean_attention(x: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """Per-token importance ``[T, M]`` from ``x`` ``[T, M, D]`` (fp32)."""
    xf = x.float()
    mean = xf.mean(dim=1, keepdim=True)
    if metric == "cos":
        xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        mean = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return (xf * mean).sum(-1)
    return (xf * mean).sum(-1) / math.sqrt(x.shape[-1])


def received_attention(x: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives from its frame's tokens, ``[T, M]`` fp32 (rows sum to 1)
    from ``x`` ``[T, M, D]``: one head of self-attention on the features themselves."""
    xf = x.float()
    logits = xf @ xf.transpose(-1, -2) / math.sqrt(x.shape[-1])
    return logits.softmax(dim=-1).mean(dim=1)


def question_positions(
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    exclude_ids: set[int],
    end_ids: set[int],
) -> torch.Tensor:
    """Sequence positions of the question in one sample (``[Q]`` int64, ascending).

    The question is the run of text after the sample's last visual token, up to (not
    including) the first end-of-turn token; special tokens in ``exclude_ids`` are skipped.
    When nothing follows the visual tokens, the text before the first visual token is used.

    Args:
        input_ids: ``[L]`` token ids. valid: ``[L]`` bool, not padding.
        visual: ``[L]`` bool, positions of visual (and structural) tokens.
    """
    ids = input_ids.tolist()
    ok = (valid & ~visual).tolist()
    vis = visual.nonzero(as_tuple=True)[0]
    L = len(ids)

    def run(start: int, stop: int) -> list[int]:
        out = []
        for i in range(start, stop):
            if not ok[i]:
                continue
            if ids[i] in end_ids and out:
                break
            if ids[i] in exclude_ids or ids[i] in end_ids:
                continue
            out.append(i)
        return out

    if vis.numel() == 0:
        picked = run(0, L)
    else:
        picked = run(int(vis[-1]) + 1, L) or run(0, int(vis[0]))
    return torch.tensor(picked, dtype=torch.long, device=input_ids.device)
