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

import time
from typing import Any

import torch

from .base import Adapter, FramePlan, Prepared, Segment, order_segments, scatter_frames, split_placeholders

#: internal keywords: a subclass that encoded the videos itself hands :meth:`Qwen2VLAdapter.prepare`
#: the kept temporal patches per video and the time their choice took
ENCODED_KEY = "_tokensieve_encoded_frames"
PLAN_MS_KEY = "_tokensieve_plan_ms"


def _patch_area(model: torch.nn.Module) -> int:
    """Pixels of one patch side squared: a ``pixel_values_videos`` row is ``[C, tp, p, p]`` flat."""
    p = int(model.config.vision_config.patch_size)
    return p * p


def _scatter_level(level: Any, kept_frames: list[torch.Tensor], sizes: list[tuple[int, int]]) -> Any:
    """One DeepStack level of the kept temporal patches (one tensor, or one per video) at full size."""
    if isinstance(level, torch.Tensor):
        parts = torch.split(level, [k.numel() * m for k, (_, m) in zip(kept_frames, sizes)])
        return torch.cat([scatter_frames(f, k, t, m) for f, k, (t, m) in zip(parts, kept_frames, sizes)])
    return [scatter_frames(f, k, t, m) for f, k, (t, m) in zip(level, kept_frames, sizes)]


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

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False,
                frame_plan: FramePlan | None = None) -> Prepared:
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
        kept_frames: list[torch.Tensor] | None = kwargs.get(ENCODED_KEY)
        plan_ms = float(kwargs.get(PLAN_MS_KEY, 0.0))
        if enc.get("video") is None and kwargs.get("pixel_values_videos") is not None:
            enc["video"], kept_frames, plan_ms = self.encode_videos(model, kwargs, frame_plan)
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
                if modality == "video" and kept_frames is not None:
                    seg.encoded_frames = kept_frames[i]
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
            plan_ms=plan_ms,
        )

    def encode_videos(self, model: torch.nn.Module, kwargs: dict[str, Any],
                      frame_plan: FramePlan | None) -> tuple[Any, list[torch.Tensor] | None, float]:
        """``(get_video_features output, kept temporal patches per video or None, plan ms)``.

        With ``frame_plan`` the ViT runs on the kept temporal patches only: their rows of
        ``pixel_values_videos`` (tp-major, ``h·w`` rows each) with the grid ``(K_t, h, w)``; it
        attends within a temporal patch (``cu_seqlens``) and its rotary and window layout are
        per temporal patch, so the kept patches' features equal the full run's. The skipped
        patches' features (and DeepStack levels) are zeros at their places; positions are still
        computed from the full grid, so kept tokens keep their ``(t, h, w)`` ids."""
        inner = model.model
        pixels, grid = kwargs["pixel_values_videos"], kwargs.get("video_grid_thw")
        if frame_plan is None or grid is None:
            return inner.get_video_features(pixels, grid, return_dict=True), None, 0.0
        began = time.perf_counter()
        merge = int(model.config.vision_config.spatial_merge_size)
        area = _patch_area(model)
        rows, kept_frames, sub_grid, start = [], [], [], 0
        for t, h, w in (tuple(int(v) for v in g) for g in grid.tolist()):
            n = h * w
            video = pixels[start : start + t * n]
            start += t * n
            with torch.no_grad():  # a temporal patch's signature: each patch's mean per channel and frame
                signature = video.float().reshape(t, n * video.shape[-1] // area, area).mean(-1)
            kept = frame_plan(signature, n // merge**2)
            kept_frames.append(kept)
            rows.append(video.reshape(t, n, -1)[kept.to(video.device)].reshape(-1, video.shape[-1]))
            sub_grid.append([int(kept.numel()), h, w])
        plan_ms = (time.perf_counter() - began) * 1000.0
        out = inner.get_video_features(torch.cat(rows), torch.tensor(sub_grid, dtype=grid.dtype, device=grid.device),
                                       return_dict=True)
        sizes = [(int(g[0]), int(g[1]) * int(g[2]) // merge**2) for g in grid.tolist()]
        out.pooler_output = [scatter_frames(f, kept, t, m)
                             for f, kept, (t, m) in zip(out.pooler_output, kept_frames, sizes)]
        stacks = getattr(out, "deepstack_features", None)
        if stacks:
            out.deepstack_features = [_scatter_level(level, kept_frames, sizes) for level in stacks]
        return out, kept_frames, plan_ms

    def set_rope_deltas(self, model: torch.nn.Module, deltas: torch.Tensor) -> None:
        model.model.rope_deltas = deltas
