"""Adapter for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``.

Qwen3-VL (arXiv 2511.21631) keeps Qwen2.5-VL's vision layout — 2×2-merged patches, two frames
per temporal patch, raster order, frame-major — with two differences that matter here:

- **Video frames are separate runs.** Each temporal patch is written as
  ``<t seconds> <|vision_start|> <|video_pad|>×(h·w/4) <|vision_end|>``: the timestamps are text
  and stay. A video is still one segment, its positions spread over the runs.
- **DeepStack** (arXiv 2406.04334): the vision tower also hands the language model features from
  intermediate ViT blocks, added to the visual positions' hidden states after the first decoder
  layers (one level per layer). They belong to the visual tokens: :meth:`Qwen3VLAdapter.prepare`
  hands them over as per-visual-token streams, the runtime gathers the kept tokens' rows with
  the same keep indices and hands them to the language model with the new visual-position mask
  (``visual_mask_key``), injected into the
  prefill's language-model call, which the top-level forward would otherwise call without them
  when it is given ``inputs_embeds``.

Positions are interleaved M-RoPE ids from the model's own ``get_rope_index`` on the full
sequence (each frame a grid of its own; time lives in the timestamp text), gathered by the
runtime. In-LLM methods run too: their layer loop adds each DeepStack level after its layer to
the visual rows still present (a token pruned before a level's layer does not receive it; a
recycled SparseVLM token takes its cluster centre's row).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import FramePlan, Prepared, split_placeholders
from .qwen2_vl import ENCODED_KEY, PLAN_MS_KEY, Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3-vl"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    visual_mask_key = "visual_pos_masks"

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False,
                frame_plan: FramePlan | None = None) -> Prepared:
        input_ids = self.require_ids(kwargs)
        inner = model.model
        cfg = model.config
        enc = dict(kwargs.get("mm_encoder_outputs") or {})
        if enc.get("image") is None and kwargs.get("pixel_values") is not None:
            enc["image"] = inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"), return_dict=True)
        extra: dict[str, Any] = {}
        if enc.get("video") is None and kwargs.get("pixel_values_videos") is not None:
            enc["video"], kept, plan_ms = self.encode_videos(model, kwargs, frame_plan)
            extra = {ENCODED_KEY: kept, PLAN_MS_KEY: plan_ms}
        prepared = super().prepare(model, {**kwargs, "mm_encoder_outputs": enc, **extra}, encoder_attention)
        # DeepStack levels of every visual token, in the row-major order of the visual positions
        # (images and videos together), as the model's own forward orders them
        visual = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
        rank = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        rank[visual] = torch.arange(int(visual.sum()), device=input_ids.device)
        levels: list[torch.Tensor] | None = None
        for modality, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
            out = enc.get(modality)
            stacks = getattr(out, "deepstack_features", None) if out is not None else None
            if not stacks:
                continue
            sizes = [int(f.shape[0]) for f in stacks[0]]
            placed = split_placeholders(input_ids, token_id, sizes, f"{modality}s")
            if levels is None:
                D = int(stacks[0][0].shape[-1])
                levels = [prepared.inputs_embeds.new_zeros(int(visual.sum()), D) for _ in stacks]
            for j, level in enumerate(stacks):
                for f, (b, pos) in zip(level, placed):
                    levels[j][rank[b, pos]] = f.to(levels[j].device, levels[j].dtype)
        if levels is not None:
            prepared.rest["visual_streams"] = {"deepstack_visual_embeds": levels}
            prepared.rest["visual_rank"] = rank
        return prepared


class Qwen3_5Adapter(Qwen3VLAdapter):
    """``Qwen3_5ForConditionalGeneration`` (and its MoE variant): Qwen3-VL's layout, processor and
    ``get_rope_index``, no DeepStack, and a hybrid decoder — Gated-DeltaNet linear-attention
    layers with a full-attention layer every fourth (``config.text_config.layer_types``).

    Pre-LLM methods remove tokens before the language model, so the linear layers' recurrent
    state sees only the kept tokens, in order, as it would a shorter prompt. In-LLM methods rank
    tokens by attention rows, which only the full-attention layers have: their ranking layers
    must be full-attention ones (``compress`` names them otherwise); after a prune point every
    later layer, linear ones included, runs on the kept tokens only. DyCoke's decode-time stage
    is refused (it hides keys, which the linear layers do not have).
    """

    family = "qwen3.5"
    classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    visual_mask_key = None
