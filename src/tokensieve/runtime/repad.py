"""Gathered rows back into a batch: the one place that knows padding sides and mask positions.

Every compression step ends the same way — each sample keeps a different number of tokens, and
the kept rows are stacked again, padded on the side the input was padded on, with a new 2-D
mask. The pre-LLM trim, the in-LLM prune points and the label gather all use these helpers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.base import mask_positions


def padding_side_of(mask: torch.Tensor) -> str:
    """``"left"`` or ``"right"`` from a 2-D mask; unpadded batches count as left (generation's side)."""
    if mask.shape[1] == 0:
        return "left"
    if bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any()):
        return "right"
    return "left"


def row_slot(n: int, width: int, side: str) -> slice:
    """Where a row of ``n`` tokens sits in a padded row of ``width``."""
    return slice(width - n, width) if side == "left" else slice(0, n)


def repad(rows: Sequence[torch.Tensor], side: str, fill: float | int = 0, width: int | None = None) -> torch.Tensor:
    """Stack ``rows`` (each ``[n_b, ...]``, sequence first) into ``[B, width, ...]``, each row on
    ``side`` and the rest filled with ``fill``; ``width`` defaults to the longest row."""
    width = max((int(r.shape[0]) for r in rows), default=0) if width is None else width
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), fill)
    for b, r in enumerate(rows):
        out[b, row_slot(int(r.shape[0]), width, side)] = r
    return out


def repad_positions(rows: Sequence[torch.Tensor], side: str) -> torch.Tensor:
    """Position rows ``[n_b]`` (1-D) or ``[3, n_b]`` (M-RoPE) into ``[B, L]`` or ``[3, B, L]``."""
    if rows[0].dim() == 1:
        return repad(rows, side)
    return repad([r.transpose(0, 1) for r in rows], side).permute(2, 0, 1).contiguous()


def mask_of(lengths: Sequence[int], side: str, like: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """The 2-D mask ``[B, width]`` (dtype of ``like``) of rows of ``lengths`` padded on ``side``."""
    return repad([like.new_ones(int(n)) for n in lengths], side, 0, width)


__all__ = ["mask_of", "mask_positions", "padding_side_of", "repad", "repad_positions", "row_slot"]
