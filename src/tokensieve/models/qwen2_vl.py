"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Visual features come from the model's own ``get_image_features`` / ``get_video_features``
(ViT + 2×2 patch merger): each image or video is a ``(t, h/2, w/2)`` grid in raster order,
frame-major, where one token frame is one *temporal patch* (2 raw video frames).
The ViT has neither a [CLS] token nor a pooling head, so methods that ask for encoder
attention get the frame-mean query stand-in (``specs/lftr.md`` §3.5.1).
Positions are M-RoPE 3-D ids computed by the model's ``get_rope_index`` on the full,
unpruned sequence; the runtime gathers them, so kept tokens keep their ``(t, h, w)`` ids.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, Prepared, Segment, order_segments, split_placeholders


class Qwen2VLAdapter(Adapter):
    family = "qwen2-vl"
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    style = "mrope"
    visual_keys = (
        "pixel_values",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
        "mm_token_type_ids",
        "second_per_grid_ts",
        "mm_encoder_outputs",
    )

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False) -> Prepared:
        input_ids = self.require_ids(kwargs)
        inner = model.model
        cfg = model.config
        merge = int(cfg.vision_config.spatial_merge_size)
        temporal_patch = int(getattr(cfg.vision_config, "temporal_patch_size", 1) or 1)
        attention_mask = self.attention_mask(model, kwargs, input_ids)
        enc = dict(kwargs.get("mm_encoder_outputs") or {})
        image_grid = kwargs.get("image_grid_thw")
        video_grid = kwargs.get("video_grid_thw")
        per_sample: list[list[tuple[int, Segment]]] = [[] for _ in range(input_ids.shape[0])]

        if enc.get("image") is None and kwargs.get("pixel_values") is not None:
            enc["image"] = inner.get_image_features(kwargs["pixel_values"], image_grid, return_dict=True)
        if enc.get("video") is None and kwargs.get("pixel_values_videos") is not None:
            enc["video"] = inner.get_video_features(kwargs["pixel_values_videos"], video_grid, return_dict=True)
        # token embeddings after the vision encoder: they are not held while it peaks
        embeds = inner.get_input_embeddings()(input_ids)

        for modality, key, token_id, grids in (
            ("image", "image", cfg.image_token_id, image_grid),
            ("video", "video", cfg.video_token_id, video_grid),
        ):
            if enc.get(key) is None:
                continue
            feats = [f.to(embeds.device, embeds.dtype) for f in enc[key].pooler_output]
            placed = split_placeholders(input_ids, token_id, [f.shape[0] for f in feats], f"{modality}s")
            for i, (f, (b, pos)) in enumerate(zip(feats, placed)):
                embeds[b, pos] = f
                t, h, w = (int(v) for v in grids[i].tolist())
                grid = (t, h // merge, w // merge)
                seg = Segment(
                    b,
                    0,
                    modality,
                    grid,
                    pos,
                    pos.new_zeros(0),
                    temporal_patch=temporal_patch if modality == "video" else 1,
                )
                per_sample[b].append((int(pos[0]), seg))

        mm_types = kwargs.get("mm_token_type_ids")
        if mm_types is None:
            mm_types = torch.zeros_like(input_ids, dtype=torch.int32)
            mm_types[input_ids == cfg.image_token_id] = 1
            mm_types[input_ids == cfg.video_token_id] = 2
        rope_kwargs: dict[str, Any] = {}
        if kwargs.get("second_per_grid_ts") is not None:
            rope_kwargs["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        position_ids, _ = inner.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=image_grid,
            video_grid_thw=video_grid,
            attention_mask=attention_mask,
            **rope_kwargs,
        )

        segments = order_segments(per_sample)
        return Prepared(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            segments=segments,
            style=self.style,
            encoder_signal="frame-mean" if encoder_attention else "",
        )

    def set_rope_deltas(self, model: torch.nn.Module, deltas: torch.Tensor) -> None:
        model.model.rope_deltas = deltas
