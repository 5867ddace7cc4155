"""Token merging inside the vision tower (stage E1, mode M1 of ``specs/encoder.md``).

The blocks from ``MergeSpec.start`` through the one whose output the projector reads are
replaced, on the instance, by a forward that runs the same sub-modules in the same order —
``x + Attn(norm1 x)``, then ToMe's merge (:mod:`tokensieve.methods.tome`), then ``x + MLP(norm2 x)``
— with proportional attention (``log s`` added to the logits through the attention mask) once
tokens have merged. After the last of them every original position takes its group's vector,
so the projector, the pooling, the placeholders and the language model see the grid they
expect: the saving is the tower's, and any pre-LLM or in-LLM method runs after it unchanged.

The merging state lives for one pass of the tower (its first merging block starts it); every
item (a video frame, an image tile) merges on its own, all to the same count. With nothing to
merge (``keep = 1``) a block runs exactly the operations of the original forward.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ._missing import MISSING as _MISSING
from ..methods.tome import MergeSpec, MergeState, bipartite_merge, head_mean_keys, unmerge
from ..models.base import TowerLayout

KERNELS = ("eager", "sdpa")


def check_tower(layout: TowerLayout | None, spec: MergeSpec, what: str) -> TowerLayout:
    """Refuse a tower token merging cannot run in, before anything is patched."""
    if layout is None:
        raise InputError(f"encoder_merge on {what}: token merging in the vision tower is implemented for "
                         "LLaVA-OneVision's SigLIP tower only (the Qwen and InternVL towers are next)")
    if layout.attn_implementation not in KERNELS:
        raise InputError(f"encoder_merge needs the vision tower's attention to take an additive bias "
                         f"(eager or sdpa); it runs {layout.attn_implementation!r}")
    if spec.start > layout.last:
        raise InputError(f"encoder_merge_start={spec.start} is past the block whose output the projector reads "
                         f"(block {layout.last})")
    spec.schedule(layout.tokens, layout.last + 1)  # a count the blocks cannot reach fails here
    return layout


class TowerMerge:
    """Installed on the blocks of one tower; :meth:`remove` restores them exactly."""

    def __init__(self, layout: TowerLayout, spec: MergeSpec) -> None:
        self.layout, self.spec = layout, spec
        self.state: MergeState | None = None
        self.schedule: list[int] = []
        self.keys: dict[int, torch.Tensor] = {}
        self.saved: dict[int, Any] = {}
        self.handles: list[Any] = []
        self.merged_counts: list[int] = []  # tokens each merging block handed on, last pass
        norm1, attn, _, _, key = layout.names
        # the key hooks are objects, not closures, so a deep copy of the model gets its own
        for i in range(spec.start, layout.last + 1):
            block = layout.blocks[i]
            self.saved[i] = block.__dict__.get("forward", _MISSING)
            block.forward = _Block(self, i, block)  # type: ignore[method-assign]
            proj = getattr(getattr(block, attn), key)
            self.handles.append(proj.register_forward_hook(_Keys(self, i)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for i, prev in self.saved.items():
            block = self.layout.blocks[i]
            block.__dict__.pop("forward", None)
            if prev is not _MISSING:
                block.__dict__["forward"] = prev
        self.state = None
        self.keys.clear()


class _Keys:
    """Key-projection hook: keeps the block's keys, ToMe's metric."""

    def __init__(self, owner: TowerMerge, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, _module: Any, _args: Any, out: torch.Tensor) -> None:
        self.owner.keys[self.index] = out


class _Block:
    """One block's forward with merging (see the module docstring)."""

    def __init__(self, owner: TowerMerge, index: int, block: torch.nn.Module) -> None:
        self.owner, self.index, self.block = owner, index, block

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        o, blk = self.owner, self.block
        norm1, attn, norm2, mlp, _ = o.layout.names
        spec = o.spec
        if self.index == spec.start:  # the first merging block starts every pass of the tower
            B, n0, _ = hidden_states.shape
            o.state = MergeState.start(B, n0, hidden_states.device)
            o.schedule = spec.schedule(n0, o.layout.last + 1)
            o.merged_counts = []
        bias = o.state.attention_bias(hidden_states.dtype)
        if bias is not None:
            if attention_mask is not None:
                raise InputError("encoder_merge: the vision tower was called with an attention mask, which "
                                 "token merging does not combine with")
            attention_mask = bias
        residual = hidden_states
        x = getattr(blk, norm1)(hidden_states)
        x, _ = getattr(blk, attn)(hidden_states=x, attention_mask=attention_mask, **kwargs)
        x = residual + x
        r = o.schedule[self.index - spec.start]
        if r:
            metric = head_mean_keys(o.keys.pop(self.index), o.layout.heads)
            x, o.state = bipartite_merge(x, metric, o.state, r)
        o.keys.pop(self.index, None)
        residual = x
        x = getattr(blk, mlp)(getattr(blk, norm2)(x))
        x = residual + x
        o.merged_counts.append(int(x.shape[1]))
        if self.index == o.layout.last:
            x = unmerge(x, o.state)
            o.state = None
        return x
