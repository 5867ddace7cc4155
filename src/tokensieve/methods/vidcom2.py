"""VidCom2 (Video Compression Commander), pre-LLM, query-agnostic.

``specs/vidcom2.md`` §3: score the post-projector tokens of one video on its lowest-variance
half of the channels, with a sum of five Gaussian kernels between unit tokens and (a) the
video centre, (b) the token's frame centre. Frames that are unlike the video get more tokens
(FCA); inside each frame the tokens least similar to both centres are kept (ATC), in raster
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .base import SegmentContext, Selection, check_segment, gather_per_frame, rank_ascending, validate_choice
from .budget import ALPHAS, CH_RATIO, COUNT_RULES, TAU, fca_budget, frame_scores, retained_count, uniform_budget


@dataclass
class VidCom2:
    """Configured VidCom2 selector.

    ``exact=True`` (default) keeps exactly :func:`~tokensieve.methods.budget.retained_count`
    tokens per video; ``exact=False`` reproduces the reference rounding
    ``max(1, round_half_even(r_t·M))`` per frame (the total may drift by up to ±T/2).
    """

    exact: bool = field(default=True, metadata={"help": "exact total (False: reference rounding)"})
    budget: str = field(default="fca", metadata={"help": "per-frame budget: 'fca' or 'uniform' (FCA off)"})
    tau: float = field(default=TAU, metadata={"range": "[1e-12, inf)", "help": "softmax temperature of the frame budget"})
    ch_ratio: float = field(default=CH_RATIO, metadata={"range": "(0, 1]", "help": "fraction of lowest-variance channels scored"})
    count_rule: str = field(default="round", metadata={"help": "total count: 'round' r*N or 'floor' float32(r)*N"})

    def __post_init__(self) -> None:
        if not isinstance(self.exact, bool):
            raise InputError(f"vidcom2 option exact must be True or False, got {self.exact!r}")
        validate_choice("vidcom2 option budget", self.budget, ("fca", "uniform"))
        validate_choice("vidcom2 option count_rule", self.count_rule, COUNT_RULES)
        if not (isinstance(self.tau, (int, float)) and self.tau > 0):
            raise InputError(f"vidcom2 option tau must be a positive number, got {self.tau!r}")
        if not (isinstance(self.ch_ratio, (int, float)) and 0 < self.ch_ratio <= 1):
            raise InputError(f"vidcom2 option ch_ratio must be in (0, 1], got {self.ch_ratio!r}")

    def select(self, x: torch.Tensor, retain: float, context: SegmentContext | None = None) -> Selection:
        """Kept tokens of one video ``x`` ``[T, M, D]``."""
        T, M, _ = check_segment(x)
        scores = frame_scores(x, tau=self.tau, alphas=ALPHAS, ch_ratio=self.ch_ratio)
        if self.budget == "fca":
            k, weights = fca_budget(x, retain, exact=self.exact, scores=scores, count_rule=self.count_rule)
        elif self.exact:
            k = uniform_budget(T, M, retained_count(T, T * M, retain, self.count_rule))
            weights = torch.full((T,), 1.0 / T, dtype=torch.float64)
        else:
            k = torch.clamp(torch.round(torch.full((T,), retain * M, dtype=torch.float64)), min=1).to(torch.int64)
            weights = torch.full((T,), 1.0 / T, dtype=torch.float64)
        sigma = scores.s_vid + scores.s_frm
        order = rank_ascending(sigma)
        keep = gather_per_frame(order, k)
        return Selection(keep=keep, frame_counts=k, frame_weights=weights)
