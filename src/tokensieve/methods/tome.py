"""Token merging inside a ViT (stage E1 of ``specs/encoder.md``): ToMe's bipartite soft matching
with size-weighted (proportional) attention, with exact counts, in the original token order.

Pure tensor code: the runtime calls these functions from inside the vision tower's blocks.
ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461 §3) in
block ``l``, after ``x ← x + Attn(LN x)`` and before the MLP:

1. metric ``k̄``: the block's keys averaged over heads, L2-normalised;
2. split the current tokens alternately, ``A`` = even places, ``B`` = odd places;
3. each ``a`` finds its most similar ``b*`` (cosine of the metric);
4. the ``r`` ``A`` tokens with the highest similarity merge into their ``b*``;
5. ``x_b ← (s_b·x_b + Σ s_a·x_a) / (s_b + Σ s_a)``, ``s_b ← s_b + Σ s_a`` (sizes start at 1);
6. later blocks attend with ``logits + log s_j`` — exactly attending to ``s_j`` copies of token ``j``.

Differences from the reference code: survivors keep their original order (ToMe concatenates
``[unmerged A, B]``), every tie goes to the smaller index, and the per-layer ``r`` is the
largest-remainder split of ``n₀ − K`` (:func:`merge_schedule`), so exactly ``K`` tokens remain
whatever the pixels. :class:`MergeState` carries sizes and each original token's group, so the
tower's output can be *unmerged* — every original position takes its group's vector (mode M1)
— and the projector, the pooling and the language model see the grid they expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


SCHEDULES = ("even", "early")


def merge_schedule(n0: int, keep: int, layers: int, policy: str = "even") -> list[int]:
    """Tokens merged in each of ``layers`` consecutive blocks so that ``keep`` of ``n0`` remain.

    The ``n0 − keep`` merges are split as evenly as possible (the earlier blocks take the
    remainder), within what bipartite matching allows — a block merges at most half of what it
    sees, so before block ``l`` at most ``keep·2^(L−l)`` tokens may remain — which moves work to
    earlier blocks when the even split would leave too much for the last ones. ``policy="early"``
    merges as much as each block allows from the first one on (``⌊n/2⌋`` until ``keep`` remain):
    the later blocks then run on ``keep`` tokens, the cheapest tower for a given count (ToMe
    §4.1 compares such decreasing schedules with the constant one). Depends on ``(n0, keep,
    layers, policy)`` only; raises :class:`InputError` when ``n0 > keep·2^layers``."""
    if not 1 <= keep <= n0:
        raise InputError(f"token merging must keep between 1 and {n0} tokens, got {keep}")
    if layers < 1:
        raise InputError("token merging needs at least one block to merge in")
    if n0 > keep * 2**min(layers, 62):
        raise InputError(
            f"{layers} blocks cannot merge {n0} tokens down to {keep} (each merges at most half of what it "
            "sees); keep more tokens or merge from an earlier block"
        )
    if policy not in SCHEDULES:
        raise InputError(f"encoder_merge_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {policy!r}")
    if policy == "early":
        out, n = [], n0
        for _ in range(layers):
            r = min(n // 2, n - keep)
            out.append(r)
            n -= r
        return out
    total = n0 - keep
    share = [total // layers + (1 if i < total % layers else 0) for i in range(layers)]
    out, n = [], n0
    for i, want in enumerate(share):
        upper = keep * 2 ** min(layers - i - 1, 62)  # most tokens the later blocks can still halve to keep
        lower = max(-(-n // 2), keep)
        nxt = min(max(n - want, lower), upper)
        out.append(n - nxt)
        n = nxt
    return out


@dataclass
class MergeState:
    """Merging bookkeeping of one tower call, for ``B`` items (frames) of ``n₀`` tokens.

    Attributes:
        sizes: ``[B, n]`` float, original tokens in each current token.
        group: ``[B, n₀]`` int64, the current token holding each original token.
    """

    sizes: torch.Tensor
    group: torch.Tensor

    @classmethod
    def start(cls, batch: int, n0: int, device: torch.device | str = "cpu") -> "MergeState":
        return cls(sizes=torch.ones(batch, n0, device=device),
                   group=torch.arange(n0, device=device).expand(batch, n0).clone())

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[B, 1, 1, n]`` additive ``log s_j`` for proportional attention; ``None`` before any merge."""
        if bool((self.sizes == 1).all()):
            return None
        return self.sizes.log().to(dtype)[:, None, None, :]


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, state: MergeState, r: int) -> tuple[torch.Tensor, MergeState]:
    """Merge ``r`` tokens of every item: ``x`` ``[B, n, D]``, ``metric`` ``[B, n, C]``.

    Returns ``x`` ``[B, n − r, D]`` (size-weighted means, original order kept) and the updated
    state. ``r = 0`` returns the inputs unchanged."""
    B, n, D = x.shape
    if r <= 0:
        return x, state
    if r > n // 2:
        raise InputError(f"cannot merge {r} of {n} tokens in one block (at most {n // 2})")
    dev = x.device
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    a_idx = torch.arange(0, n, 2, device=dev)
    b_idx = torch.arange(1, n, 2, device=dev)
    score = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # [B, nA, nB]
    best, partner = score.max(dim=-1)  # the first (smallest) b among equal similarities
    order = torch.sort(-best, dim=-1, stable=True).indices  # most similar first, ties by smaller a
    merged_a = order[:, :r]  # [B, r] indices into A
    gone = torch.zeros(B, n, dtype=torch.bool, device=dev)
    gone.scatter_(1, a_idx[merged_a], True)
    # new index of every current token: survivors keep their order; a merged a goes to its b
    new_index = torch.cumsum(~gone, dim=1) - 1
    dst = b_idx[torch.gather(partner, 1, merged_a)]  # [B, r] current index of each merged a's b
    new_index.scatter_(1, a_idx[merged_a], torch.gather(new_index, 1, dst))
    acc = torch.promote_types(x.dtype, torch.float32)  # sums in fp32 at least
    sizes = state.sizes.to(acc)
    weighted = torch.zeros(B, n - r, D, dtype=acc, device=dev)
    weighted.scatter_add_(1, new_index[..., None].expand(B, n, D), x.to(acc) * sizes[..., None])
    new_sizes = torch.zeros(B, n - r, dtype=acc, device=dev).scatter_add_(1, new_index, sizes)
    out = (weighted / new_sizes[..., None]).to(x.dtype)
    return out, MergeState(sizes=new_sizes.to(state.sizes.dtype), group=torch.gather(new_index, 1, state.group))


def unmerge(x: torch.Tensor, state: MergeState) -> torch.Tensor:
    """``[B, n₀, D]``: every original position takes its group's vector (``x`` ``[B, n, D]``)."""
    return torch.gather(x, 1, state.group[..., None].expand(-1, -1, x.shape[-1]))


def head_mean_keys(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """ToMe's metric: keys ``[B, n, H·d]`` averaged over the ``H`` heads, ``[B, n, d]``."""
    B, n, width = keys.shape
    return keys.view(B, n, heads, width // heads).mean(2)


#: compress(...) keywords that configure token merging inside the vision tower
MERGE_OPTION_NAMES = ("encoder_merge", "encoder_merge_start", "encoder_merge_schedule")


@dataclass(frozen=True)
class MergeSpec:
    """Token merging in the vision tower's blocks (stage E1, mode M1: merge, then unmerge).

    Attributes:
        keep: fraction of each frame's (image tile's) patch tokens left after the last merging
            block, in ``(0, 1]``: ``K = round(keep·n₀)`` (at least 1); ``1`` merges nothing.
        start: the first block that merges (0 = the first block); merging runs through the block
            whose output the projector reads, then every position takes its group's vector.
        schedule: ``"even"`` (the merges split evenly over the blocks) or ``"early"`` (each block
            merges as much as it can until the count is reached); :func:`merge_schedule`.
    """

    keep: float = 1.0
    start: int = 0
    schedule_policy: str = "even"

    def __post_init__(self) -> None:
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < float(k) <= 1:
            raise InputError(f"encoder_merge must be a number in (0, 1] (the fraction of the tower's tokens left "
                             f"after its last merging block), got {k!r}")
        s = self.start
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"encoder_merge_start must be a block index >= 0, got {s!r}")
        if self.schedule_policy not in SCHEDULES:
            raise InputError(f"encoder_merge_schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {self.schedule_policy!r}")

    def tokens_left(self, n0: int) -> int:
        return max(1, min(n0, int(float(self.keep) * n0 + 0.5)))

    def schedule(self, n0: int, blocks: int) -> list[int]:
        """Per merging block (``start`` … last), the tokens it merges; pure in ``(n₀, blocks)``."""
        if self.start >= blocks:
            raise InputError(f"encoder_merge_start={self.start} is past the tower's {blocks} blocks that run "
                             f"before its features are read (indices 0..{blocks - 1})")
        return merge_schedule(n0, self.tokens_left(n0), blocks - self.start, self.schedule_policy)


def merge_spec(options: dict[str, object]) -> tuple[MergeSpec | None, dict[str, object]]:
    """Split ``compress``'s keywords into the token-merging spec (``None`` when not asked for)
    and the rest."""
    rest = {k: v for k, v in options.items() if k not in MERGE_OPTION_NAMES}
    if "encoder_merge" not in options:
        extra = [k for k in MERGE_OPTION_NAMES if k in options]
        if extra:
            raise InputError(f"{extra[0]} needs encoder_merge (the fraction of tower tokens kept)")
        return None, rest
    from .base import as_scalar

    return MergeSpec(keep=as_scalar(options["encoder_merge"]),  # type: ignore[arg-type]
                     start=as_scalar(options.get("encoder_merge_start", 0)),  # type: ignore[arg-type]
                     schedule_policy=options.get("encoder_merge_schedule", "even")), rest  # type: ignore[arg-type]
