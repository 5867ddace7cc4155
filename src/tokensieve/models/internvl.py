"""Adapter for ``InternVLForConditionalGeneration`` (InternVL3 / InternVL3.5, transformers-native).

InternVL (arXiv 2504.10479 §2) encodes every 448-px tile with InternViT, drops the class token,
folds each 2×2 block of patches into one token (pixel shuffle) and projects it: a tile is a
16×16 raster of tokens (``image_seq_length`` = 256). The processor writes

- an image as ``<img>`` ``<IMG_CONTEXT>`` × 256·n ``</img>``: its n tiles (1–12, row-major)
  and, when there is more than one, a thumbnail last;
- a video as ``Frame1: <img>…</img>\\nFrame2: <img>…</img>…``: one tile per frame.

The model input keeps no image/video type: every visual token is ``<IMG_CONTEXT>`` and all tiles
and frames come in one ``pixel_values`` in prompt order. This adapter reads the layout from the
runs of context tokens:

- a run of one tile followed, within :data:`FRAME_GAP` tokens, by another run of one tile starts
  a **video**: consecutive such runs are its frames, a ``(T, 16, 16)`` segment (the processor
  puts only ``</img>\\nFrameK: <img>`` between frames);
- any other run is an **image**: one tile is a ``(1, 16, 16)`` segment, several tiles (with
  their thumbnail) one ``(1, 1, 256·n)`` segment, as irregular layouts are described elsewhere.

Two one-tile images written next to each other with almost no text between them would read as a
two-frame video; put a caption between them (as the chat template does for separate turns).

Positions are 1-D (RoPE over the attended tokens); the decoder is a Qwen2 (InternVL3) or Qwen3
(InternVL3.5) model at ``model.model.language_model``. The tower has a class token, but its
attention is not kept by the transformers model, so encoder-attention methods use the
frame-mean stand-in.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..errors import InputError
from .base import Adapter, FramePlan, Prepared, Segment, mask_positions, order_segments, scatter_frames

#: at most this many tokens between two one-tile runs for them to be frames of one video
#: (``</img>\nFrame12: <img>`` is 6–9 tokens in the InternVL tokenizers)
FRAME_GAP = 12


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Split ascending positions into runs of consecutive ones."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero(as_tuple=True)[0] + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


class InternVLAdapter(Adapter):
    family = "internvl"
    classes = ("InternVLForConditionalGeneration",)
    style = "1d"
    visual_keys = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "mm_encoder_outputs")

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False,
                frame_plan: FramePlan | None = None) -> Prepared:
        input_ids = self.require_ids(kwargs)
        inner = model.model
        cfg = model.config
        attention_mask = self.attention_mask(model, kwargs, input_ids)
        enc = dict(kwargs.get("mm_encoder_outputs") or {})
        encoded: dict[tuple[int, int], torch.Tensor] = {}  # (sample, video start) → frames the tower saw
        plan_ms = 0.0
        if enc.get("image") is None and kwargs.get("pixel_values") is not None:
            layer = kwargs.get("vision_feature_layer")
            strategy = kwargs.get("vision_feature_select_strategy")
            pixels = kwargs["pixel_values"]
            kept_tiles = None
            if frame_plan is not None:
                began = time.perf_counter()
                kept_tiles, encoded = self._plan_tiles(model, input_ids, pixels, frame_plan)
                pixels = pixels[kept_tiles.to(pixels.device)]
                plan_ms = (time.perf_counter() - began) * 1000.0
            enc["image"] = inner.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=cfg.vision_feature_layer if layer is None else layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy if strategy is None else strategy,
                return_dict=True,
            )
            if kept_tiles is not None:  # the skipped frames' tiles are zeros; the runtime drops them
                enc["image"].pooler_output = scatter_frames(enc["image"].pooler_output, kept_tiles,
                                                            int(kwargs["pixel_values"].shape[0]), 1)
        embeds = inner.get_input_embeddings()(input_ids)
        per_sample: list[list[tuple[int, Segment]]] = [[] for _ in range(input_ids.shape[0])]
        if enc.get("image") is not None:
            tiles = enc["image"].pooler_output  # [N_tiles, S, D], in prompt order over the batch
            n_tiles, S = int(tiles.shape[0]), int(tiles.shape[1])
            side = math.isqrt(S)
            is_ctx = input_ids == cfg.image_token_id
            if int(is_ctx.sum()) != n_tiles * S:
                raise InputError(
                    f"images: the input has {int(is_ctx.sum())} context tokens (id {cfg.image_token_id}) but the "
                    f"vision encoder produced {n_tiles} tiles of {S} tokens; the processor and the pixel inputs do "
                    "not match"
                )
            flat = tiles.reshape(-1, tiles.shape[-1]).to(embeds.device, embeds.dtype)
            used = 0
            for b in range(input_ids.shape[0]):
                runs = _runs(is_ctx[b].nonzero(as_tuple=True)[0])
                for run in runs:
                    if run.numel() % S:
                        raise InputError(f"a run of {run.numel()} context tokens is not whole tiles of {S}")
                    embeds[b, run] = flat[used : used + run.numel()]
                    used += run.numel()
                for start, group in self._group(runs, S):
                    if len(group) > 1:
                        seg = Segment(b, 0, "video", (len(group), side, side), torch.cat(group), group[0].new_zeros(0))
                        seg.encoded_frames = encoded.get((b, start))
                    elif group[0].numel() == S:
                        seg = Segment(b, 0, "image", (1, side, side), group[0], group[0].new_zeros(0))
                    else:
                        seg = Segment(b, 0, "image", (1, 1, group[0].numel()), group[0], group[0].new_zeros(0))
                    per_sample[b].append((start, seg))
        return Prepared(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=mask_positions(attention_mask),
            segments=order_segments(per_sample),
            style=self.style,
            encoder_signal="frame-mean" if encoder_attention else "",
            plan_ms=plan_ms,
        )

    def _plan_tiles(self, model: torch.nn.Module, input_ids: torch.Tensor, pixels: torch.Tensor,
                    plan: FramePlan) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
        """The tiles to encode: every image tile, and of each video (one tile per frame, read from
        the runs of context tokens as :meth:`prepare` reads them) the frames ``plan`` keeps from
        their signatures (patch-mean colours). Returns the kept tile indices of ``pixel_values``
        and, per ``(sample, video start)``, the kept frames."""
        cfg = model.config
        S = int(cfg.image_seq_length)
        is_ctx = input_ids == cfg.image_token_id
        patch = cfg.vision_config.patch_size
        with torch.no_grad():
            small = torch.nn.functional.avg_pool2d(pixels.float(), patch)
        signatures = small.flatten(1)
        keep: list[torch.Tensor] = []
        encoded: dict[tuple[int, int], torch.Tensor] = {}
        tile = 0
        for b in range(input_ids.shape[0]):
            for start, group in self._group(_runs(is_ctx[b].nonzero(as_tuple=True)[0]), S):
                n = sum(int(run.numel()) // S for run in group)
                if len(group) > 1:  # a video: one tile per frame
                    kept = plan(signatures[tile : tile + n], S)
                    encoded[(b, start)] = kept
                    keep.append(kept + tile)
                else:
                    keep.append(torch.arange(tile, tile + n))
                tile += n
        if tile != pixels.shape[0]:
            raise InputError(f"images: the input's context tokens make {tile} tiles of {S} tokens but pixel_values "
                             f"holds {pixels.shape[0]} tiles; the processor and the pixel inputs do not match")
        return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long), encoded

    @staticmethod
    def _group(runs: list[torch.Tensor], S: int) -> list[tuple[int, list[torch.Tensor]]]:
        """Runs → segments: consecutive one-tile runs at most :data:`FRAME_GAP` apart are one video."""
        out: list[tuple[int, list[torch.Tensor]]] = []
        for run in runs:
            one_tile = run.numel() == S
            if out and one_tile:
                start, group = out[-1]
                last = group[-1]
                if last.numel() == S and int(run[0]) - int(last[-1]) - 1 <= FRAME_GAP:
                    group.append(run)
                    continue
            out.append((int(run[0]), [run]))
        return out
