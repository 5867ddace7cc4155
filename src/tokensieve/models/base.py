"""Adapters describe a model family: where its visual tokens are, how it numbers positions.

An adapter never knows which method runs. It turns the keyword arguments of a model call
into a :class:`Prepared` input: the full ``inputs_embeds`` with every visual feature spliced
in (exactly as the model itself would), the 2-D attention mask, the position ids of the full
sequence, and the :class:`Segment` list of every sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import InputError


@dataclass
class Segment:
    """One image or one video inside one sample.

    Attributes:
        sample: batch row.
        ordinal: index among the sample's segments (in sequence order).
        modality: ``"image"`` or ``"video"``.
        grid: ``(T, H, W)`` in tokens; ``M = H·W`` content tokens per frame. Irregular layouts
            (LLaVA-OneVision's base + high-resolution tiles) use ``(1, 1, M)``.
        positions: ``[T·M]`` int64 sequence positions of the content tokens, frame-major.
        structural: ``[S]`` int64 sequence positions of structural tokens (newlines); always kept.
        temporal_patch: raw frames per token frame (Qwen merges 2 frames into one).
        encoder_attention: optional ``[T, M]`` vision-encoder importance of each content token
            (e.g. SigLIP pooling-probe attention mapped onto the token grid); computed only when
            a method asks for it and the encoder has such a signal.
        encoder_received: optional ``[T, M]`` mean attention each content token receives in the
            vision tower's last used layer (heads and queries averaged), mapped onto the token
            grid like the features; computed with ``encoder_attention`` where the adapter can.
        encoded_frames: ``[K_t]`` ascending token frames the vision encoder saw when an encoder
            stage skipped the others (their tokens are zeros and never reach the language
            model); ``None``: every frame was encoded.
    """

    sample: int
    ordinal: int
    modality: str
    grid: tuple[int, int, int]
    positions: torch.Tensor
    structural: torch.Tensor
    temporal_patch: int = 1
    encoder_attention: torch.Tensor | None = None
    encoder_received: torch.Tensor | None = None
    encoded_frames: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return self.grid[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]


@dataclass
class Prepared:
    """A model call's inputs with the visual features spliced in, before any pruning.

    Shapes: ``inputs_embeds`` ``[B, L, D]``; ``attention_mask`` ``[B, L]`` int64;
    ``position_ids`` ``[B, L]`` (``style="1d"``) or ``[3, B, L]`` (``style="mrope"``).
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segments: list[list[Segment]]
    style: str
    rest: dict[str, Any] = field(default_factory=dict)
    encoder_signal: str = ""
    #: time spent computing the encoder signals (probe / received attention), ms
    signal_ms: float = 0.0
    #: time spent choosing the frames the encoder sees (signatures + choice), ms
    plan_ms: float = 0.0


@dataclass
class TowerLayout:
    """Where token merging runs in a vision tower (``Adapter.tower_layout``): a pre-norm ViT whose
    blocks compute ``x + Attn(norm1 x)`` then ``x + MLP(norm2 x)`` on ``[items, tokens, D]``.

    Attributes:
        blocks: the tower's blocks in order.
        last: index of the block whose output the projector reads.
        heads: attention heads of a block.
        tokens: tokens of one item (frame, tile) entering the blocks.
        names: attribute names in a block of ``(norm1, attention, norm2, mlp)`` and, in the
            attention module, of the key projection.
    """

    blocks: list[torch.nn.Module]
    last: int
    heads: int
    tokens: int
    names: tuple[str, str, str, str, str]
    attn_implementation: str


#: ``plan(signatures [T, F], tokens_per_frame) -> [K_t]`` ascending token frames to encode
FramePlan = Callable[[torch.Tensor, int], torch.Tensor]


def scatter_frames(encoded: torch.Tensor, kept: torch.Tensor, num_frames: int, per_frame: int) -> torch.Tensor:
    """Rows of the encoded frames ``[K_t·M, ...]`` placed at their frames in a zero ``[T·M, ...]``."""
    out = encoded.new_zeros((num_frames * per_frame, *encoded.shape[1:]))
    rows = (kept.to(encoded.device)[:, None] * per_frame + torch.arange(per_frame, device=encoded.device)).reshape(-1)
    out[rows] = encoded
    return out


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions counting only attended tokens (padding gets 0): ``[B, L]`` int64."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def split_placeholders(
    input_ids: torch.Tensor, token_id: int, lengths: list[int], what: str
) -> list[tuple[int, torch.Tensor]]:
    """Assign placeholder positions to visual items in the model's scatter order (row-major).

    Returns one ``(sample, positions[n_i])`` pair per item. Raises :class:`InputError` when
    the number of placeholders and features differ, or an item would straddle two samples.
    """
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
    total = int(sum(lengths))
    if rows.numel() != total:
        raise InputError(
            f"{what}: the input has {rows.numel()} placeholder tokens (id {token_id}) but the vision "
            f"encoder produced {total} features for {len(lengths)} item(s); the processor and the "
            "pixel inputs do not match (check the number of images/videos and their sizes)"
        )
    out: list[tuple[int, torch.Tensor]] = []
    start = 0
    for n in lengths:
        r = rows[start : start + n]
        if n > 0 and bool((r != r[0]).any()):
            raise InputError(f"{what}: a visual item's placeholder tokens span two samples of the batch")
        out.append((int(r[0]) if n > 0 else 0, cols[start : start + n]))
        start += n
    return out


def order_segments(per_sample: list[list[tuple[int, Segment]]]) -> list[list[Segment]]:
    """Sort each sample's ``(start, segment)`` pairs by position and number them 0, 1, …"""
    out: list[list[Segment]] = []
    for items in per_sample:
        items.sort(key=lambda it: it[0])
        for i, (_, seg) in enumerate(items):
            seg.ordinal = i
        out.append([seg for _, seg in items])
    return out


class Adapter:
    """Base class: subclasses set ``family``, ``classes``, ``style`` and implement :meth:`prepare`."""

    family: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    style: ClassVar[str] = "1d"
    #: keyword arguments consumed by :meth:`prepare` (not forwarded to the pruned call)
    visual_keys: ClassVar[tuple[str, ...]] = ()
    #: the encoder signal used when the encoder offers no summary-token attention
    #: (``None``: the family cannot give an encoder-attention signal at all)
    fallback_encoder_signal: ClassVar[str | None] = "frame-mean"
    #: why in-LLM methods cannot run on this family (``None``: they can)
    inllm_unsupported: ClassVar[str | None] = None
    #: the language-model argument that takes the visual-position mask ``[B, L]`` of the
    #: sequence it receives, for families whose :meth:`prepare` puts per-visual-token streams in
    #: ``Prepared.rest["visual_streams"]`` (name → list of ``[N_visual, D]``, rows in the
    #: row-major order of ``Prepared.rest["visual_rank"]``): the runtime gathers their kept rows
    #: and passes them to the language model's prefill under their names. ``None``: no streams.
    visual_mask_key: ClassVar[str | None] = None
    #: why an encoder stage (frames skipped before the vision tower) cannot run on this family
    #: (``None``: it can; the adapter's :meth:`prepare` honours ``frame_plan`` for videos)
    encoder_stage_unsupported: ClassVar[str | None] = None

    def special_ids(self, model: torch.nn.Module) -> set[int]:
        """Token ids that are never part of a question (placeholders, padding, BOS)."""
        cfg = model.config
        ids = {getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id", "vision_token_id")}
        text = getattr(cfg, "text_config", cfg)
        ids |= {getattr(text, "pad_token_id", None), getattr(text, "bos_token_id", None)}
        return {int(i) for i in ids if isinstance(i, int)}

    def end_ids(self, model: torch.nn.Module) -> set[int]:
        """End-of-turn token ids (the model's EOS ids), where a question stops."""
        found: set[int] = set()
        for cfg in (getattr(model, "generation_config", None), getattr(model.config, "text_config", None), model.config):
            eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
            if isinstance(eos, int):
                found.add(eos)
            elif isinstance(eos, (list, tuple)):
                found |= {int(e) for e in eos}
        return found

    def has_visual(self, kwargs: dict[str, Any]) -> bool:
        """Whether a call carries images or videos (pixels or precomputed encoder outputs)."""
        enc = kwargs.get("mm_encoder_outputs") or {}
        return (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or any(v is not None for v in enc.values())
        )

    @staticmethod
    def attention_mask(model: torch.nn.Module, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """The call's 2-D mask; without one, padding tokens (if the model has a pad id that
        occurs in the batch) are masked, as ``generate`` does."""
        mask = kwargs.get("attention_mask")
        if mask is None:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
            if isinstance(pad, int) and input_ids.shape[0] > 1 and bool((input_ids == pad).any()):
                mask = (input_ids != pad).long()
            else:
                mask = torch.ones_like(input_ids)
        return mask.long()

    def tower_layout(self, model: torch.nn.Module) -> TowerLayout | None:
        """Where token merging can run in this model's vision tower; ``None``: it cannot (yet)."""
        return None

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False,
                frame_plan: FramePlan | None = None) -> Prepared:
        """Full inputs and segments; with ``encoder_attention=True`` also the encoder's own
        summary-token attention per segment where the encoder has one. With ``frame_plan``, each
        video's vision encoder runs only on the token frames the plan returns for its pixel
        signatures (the other frames' features are zeros; ``Segment.encoded_frames`` says which)."""
        raise NotImplementedError

    def set_rope_deltas(self, model: torch.nn.Module, deltas: torch.Tensor) -> None:
        """Record decode-time position offsets where the model keeps them (M-RoPE models)."""

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``) the in-LLM
        runtime drives; the families supported today keep it at ``model.model.language_model``."""
        return model.model.language_model

    # -- cloud–device collaboration (tokensieve.collab): the tokens a device uplinks -----------

    def uplink_tokens(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """The vision encoder's output for the call's videos, before the projector: ``[V, N, C]``.

        These are what a device uplinks (CD-CCA, arXiv 2312.16279 §3.2) and what a cloud model
        sharing the vision encoder reads through its own projector
        (:meth:`embeds_from_uplink`)."""
        raise InputError(f"the cloud-device collaboration does not support {self.family or type(self).__name__} "
                         "models yet; it supports LlavaOnevisionForConditionalGeneration")

    def embeds_from_uplink(
        self, model: torch.nn.Module, input_ids: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, projected)``: the call's token embeddings with the videos' placeholders
        filled from uplinked encoder tokens ``[V, N, C]`` through this model's own projector (and
        whatever the model does after it), and the projector's output ``[V, N, D]``."""
        raise InputError(f"the cloud-device collaboration does not support {self.family or type(self).__name__} "
                         "models yet; it supports LlavaOnevisionForConditionalGeneration")

    def uplink_frames(self, model: torch.nn.Module, n_tokens: int) -> int:
        """How many frames ``n_tokens`` uplinked encoder tokens of one video hold."""
        raise InputError(f"the cloud-device collaboration does not support {self.family or type(self).__name__} "
                         "models yet; it supports LlavaOnevisionForConditionalGeneration")

    @staticmethod
    def require_ids(kwargs: dict[str, Any]) -> torch.Tensor:
        ids = kwargs.get("input_ids")
        if ids is None:
            raise InputError(
                "tokensieve needs input_ids (with the processor's image/video placeholder tokens) to locate "
                "visual tokens; inputs_embeds alone are not accepted together with pixel inputs"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise InputError("pass either input_ids or inputs_embeds, not both")
        return ids
