"""Baselines people compare against: ``random`` (seeded) and ``uniform`` (evenly spaced).

Both are per-frame methods: a budget policy (``uniform`` or ``fca``) sets how many tokens
each frame keeps, then the method picks which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, gather_per_frame, validate_choice
from .budget import BUDGET_POLICIES, COUNT_RULES, frame_budget


@dataclass
class RandomSelect:
    """Keep a seeded random subset of each frame's tokens."""

    seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "random seed; each segment draws from its own stream"})
    budget: str = field(default="uniform", metadata={"help": "per-frame budget policy: 'uniform' or 'fca'"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"random option seed must be an integer, got {self.seed!r}")
        validate_choice("random option budget", self.budget, BUDGET_POLICIES)
        validate_choice("random option count_rule", self.count_rule, COUNT_RULES)

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        T, M, _ = check_segment(x)
        k, weights = frame_budget(x, retain, self.budget, count_rule=self.count_rule)
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + (context.ordinal if context else 0))
        order = torch.stack([torch.randperm(M, generator=gen) for _ in range(T)])
        return Selection(keep=gather_per_frame(order, k), frame_counts=k, frame_weights=weights)


def evenly_spaced(m: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices in ``range(m)`` (centres of ``k`` equal bins), ascending, unique."""
    idx = torch.floor((torch.arange(k, dtype=torch.float64) + 0.5) * m / k).to(torch.int64)
    return idx.clamp_(0, m - 1)


@dataclass
class UniformSelect:
    """Keep evenly spaced tokens of each frame (spatial subsampling in raster order)."""

    budget: str = field(default="uniform", metadata={"help": "per-frame budget policy: 'uniform' or 'fca'"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        validate_choice("uniform option budget", self.budget, BUDGET_POLICIES)
        validate_choice("uniform option count_rule", self.count_rule, COUNT_RULES)

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        T, M, _ = check_segment(x)
        k, weights = frame_budget(x, retain, self.budget, count_rule=self.count_rule)
        parts = [evenly_spaced(M, int(k[t])) + t * M for t in range(T)]
        return Selection(keep=torch.cat(parts), frame_counts=k, frame_weights=weights)
