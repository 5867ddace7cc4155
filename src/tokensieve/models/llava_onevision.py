"""Adapter for ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision and LLaVA-Video).

Layout of the visual features the model splices in:

* video: ``T`` frames of ``h·w`` pooled tokens, frame-major, then one ``image_newline``
  after the whole video (structural);
* image: the base tile's tokens followed by the high-resolution tiles, whose rows each end
  with an ``image_newline`` (structural); the content tokens form one flat segment
  ``(1, 1, M)``. A single-tile image (several images per sample) is its base grid plus one
  trailing newline.

Encoder attention (for methods that ask): the SigLIP attention-pooling probe's attention
when the tower keeps its head and the projector reads the last layer (videos); otherwise —
as for LLaVA-OneVision's own headless tower, and for images — the frame-mean query stand-in.

Newline tokens are found by equality with the model's ``image_newline`` parameter, which the
model copies verbatim, so the adapter follows whatever tiling the model uses.
Positions are 1-D.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..errors import InputError
from .base import (
    Adapter,
    FramePlan,
    Prepared,
    Segment,
    TowerLayout,
    mask_positions,
    order_segments,
    scatter_frames,
    split_placeholders,
)


class LlavaOnevisionAdapter(Adapter):
    family = "llava-onevision"
    classes = ("LlavaOnevisionForConditionalGeneration",)
    style = "1d"
    visual_keys = (
        "pixel_values",
        "image_sizes",
        "pixel_values_videos",
        "image_sizes_videos",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "batch_num_images",
        "mm_encoder_outputs",
    )

    def prepare(self, model: torch.nn.Module, kwargs: dict[str, Any], encoder_attention: bool = False,
                frame_plan: FramePlan | None = None) -> Prepared:
        input_ids = self.require_ids(kwargs)
        inner = model.model
        cfg = model.config
        attention_mask = self.attention_mask(model, kwargs, input_ids)
        enc = dict(kwargs.get("mm_encoder_outputs") or {})
        feat_kwargs = {
            "vision_feature_layer": kwargs.get("vision_feature_layer"),
            "vision_feature_select_strategy": kwargs.get("vision_feature_select_strategy"),
        }
        newline = inner.image_newline.detach()
        per_sample: list[list[tuple[int, Segment]]] = [[] for _ in range(input_ids.shape[0])]

        if enc.get("image") is None and kwargs.get("pixel_values") is not None:
            enc["image"] = inner.get_image_features(
                kwargs["pixel_values"],
                kwargs.get("image_sizes"),
                batch_num_images=kwargs.get("batch_num_images"),
                return_dict=True,
                **feat_kwargs,
            )
        received_input: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        signal_ms = plan_ms = 0.0
        kept_frames: list[torch.Tensor] | None = None  # per video: the frames the tower saw
        video_kwargs = kwargs
        if enc.get("video") is None and kwargs.get("pixel_values_videos") is not None and frame_plan is not None:
            began = time.perf_counter()
            kept_frames = _plan_frames(model, kwargs["pixel_values_videos"], frame_plan)
            pv = kwargs["pixel_values_videos"]
            video_kwargs = {**kwargs, "pixel_values_videos": torch.stack(
                [pv[v, kept.to(pv.device)] for v, kept in enumerate(kept_frames)])}
            plan_ms = (time.perf_counter() - began) * 1000.0
        if enc.get("video") is None and kwargs.get("pixel_values_videos") is not None:
            block = _feature_block(inner, feat_kwargs["vision_feature_layer"]) if encoder_attention else None
            caught: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
            hooks = ([getattr(block.self_attn, f"{n}_proj").register_forward_hook(
                          lambda _m, _a, out, n=n: caught[n].append(out.detach()))
                      for n in ("q", "k")] if block is not None else [])
            try:
                enc["video"] = inner.get_video_features(video_kwargs["pixel_values_videos"], return_dict=True,
                                                        **feat_kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
            if block is not None and len(caught["q"]) == 1 and len(caught["k"]) == 1:
                received_input = (block.self_attn, caught["q"][0], caught["k"][0])  # the layer's own queries and keys
        # token embeddings after the vision encoder: they are not held while it peaks
        embeds = inner.get_input_embeddings()(input_ids)
        if enc.get("image") is not None:
            feats = [f.to(embeds.device, embeds.dtype) for f in enc["image"].pooler_output]
            placed = split_placeholders(input_ids, cfg.image_token_id, [f.shape[0] for f in feats], "images")
            for f, (b, pos) in zip(feats, placed):
                embeds[b, pos] = f
                is_nl = (f == newline.to(f.dtype)).all(-1)
                content, structural = pos[~is_nl], pos[is_nl]
                n = content.numel()
                if n == 0:
                    raise InputError("an image has no content tokens (only newlines)")
                side = math.isqrt(n)
                grid = (1, side, side) if side * side == n and structural.numel() <= 1 else (1, 1, n)
                per_sample[b].append((int(pos[0]), Segment(b, 0, "image", grid, content, structural)))

        probe_maps: list[torch.Tensor | None] = []
        received_maps: list[torch.Tensor | None] = []
        if enc.get("video") is not None:
            pooled = enc["video"].pooler_output  # [V, T*M + 1, D]
            if encoder_attention:
                began = time.perf_counter()
                probe_maps = _video_probe_attention(inner, enc["video"], video_kwargs, pooled.shape[0])
                received_maps = _video_received_attention(inner, received_input, video_kwargs, pooled.shape[0])
                signal_ms = (time.perf_counter() - began) * 1000.0
            pv = kwargs.get("pixel_values_videos")
            frames = int(pv.shape[1]) if pv is not None else None
            feats = [pooled[i].to(embeds.device, embeds.dtype) for i in range(pooled.shape[0])]
            if kept_frames is not None:  # the skipped frames' tokens are zeros; the runtime drops them
                M = (pooled.shape[1] - 1) // kept_frames[0].numel()
                feats = [torch.cat([scatter_frames(f[:-1], kept, frames, M), f[-1:]]) for f, kept in zip(feats, kept_frames)]
                probe_maps = [None if m is None else scatter_frames(m, kept, frames, M)
                              for m, kept in zip(probe_maps, kept_frames)]
                received_maps = [None if m is None else scatter_frames(m, kept, frames, M)
                                 for m, kept in zip(received_maps, kept_frames)]
            placed = split_placeholders(input_ids, cfg.video_token_id, [f.shape[0] for f in feats], "videos")
            per_sample_videos: list[Segment] = []
            for f, (b, pos) in zip(feats, placed):
                embeds[b, pos] = f
                n_content = f.shape[0] - 1
                T = frames if frames is not None else _infer_frames(n_content, cfg)
                if T < 1 or n_content % T:
                    raise InputError(f"a video's {n_content} tokens do not split into {T} equal frames")
                M = n_content // T
                side = math.isqrt(M)
                grid = (T, side, side) if side * side == M else (T, 1, M)
                seg = Segment(b, 0, "video", grid, pos[:-1], pos[-1:])
                if kept_frames is not None:
                    seg.encoded_frames = kept_frames[len(per_sample_videos)]
                if probe_maps and probe_maps[len(per_sample_videos)] is not None:
                    seg.encoder_attention = probe_maps[len(per_sample_videos)].reshape(T, M)
                if received_maps and received_maps[len(per_sample_videos)] is not None:
                    seg.encoder_received = received_maps[len(per_sample_videos)].reshape(T, M)
                per_sample_videos.append(seg)
                per_sample[b].append((int(pos[0]), seg))

        segments = order_segments(per_sample)
        return Prepared(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=mask_positions(attention_mask),
            segments=segments,
            style=self.style,
            encoder_signal=("siglip-probe" if any(m is not None for m in probe_maps) else "frame-mean")
            + ("+siglip-received" if any(m is not None for m in received_maps) else "")
            if encoder_attention
            else "",
            signal_ms=signal_ms,
            plan_ms=plan_ms,
        )


    def tower_layout(self, model: torch.nn.Module) -> TowerLayout | None:
        """SigLIP's encoder: its layers are pre-norm blocks (``layer_norm1``, ``self_attn``,
        ``layer_norm2``, ``mlp``); the projector reads ``vision_feature_layer``'s output."""
        inner = model.model
        tower = getattr(inner, "vision_tower", None)
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        block = _feature_block(inner, None)
        if encoder is None or block is None:
            return None
        blocks = list(encoder.layers)
        attn = block.self_attn
        vc = model.config.vision_config
        return TowerLayout(blocks=blocks, last=blocks.index(block), heads=int(attn.num_heads),
                           tokens=(vc.image_size // vc.patch_size) ** 2,
                           names=("layer_norm1", "self_attn", "layer_norm2", "mlp", "k_proj"),
                           attn_implementation=str(tower.config._attn_implementation))

    # -- cloud–device collaboration ---------------------------------------------------------

    def _patches(self, model: torch.nn.Module) -> int:
        vc = model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def _check_uplink_config(self, model: torch.nn.Module) -> None:
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "full":
            raise InputError("uplinked tokens are the last vision-encoder layer with every patch; this model selects "
                             f"layer {cfg.vision_feature_layer!r} with strategy {cfg.vision_feature_select_strategy!r}")

    def uplink_tokens(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        self._check_uplink_config(model)
        pixels = kwargs.get("pixel_values_videos")
        if pixels is None or pixels.dim() != 5:
            raise InputError("uplink tokens are taken from videos: pass pixel_values_videos [V, T, 3, H, W]")
        v, t = pixels.shape[:2]
        out = model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[model.config.vision_feature_layer]  # [V*T, P, C]
        return feats.reshape(v, t * feats.shape[1], feats.shape[-1])

    def uplink_frames(self, model: torch.nn.Module, n_tokens: int) -> int:
        p = self._patches(model)
        if n_tokens < p or n_tokens % p:
            raise InputError(f"{n_tokens} uplinked tokens are not whole frames of {p} patches")
        return n_tokens // p

    def embeds_from_uplink(
        self, model: torch.nn.Module, input_ids: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_uplink_config(model)
        inner = model.model
        if tokens.dim() != 3:
            raise InputError(f"uplinked tokens must be [V, N, C], got shape {tuple(tokens.shape)}")
        v, n, c = tokens.shape
        expected = int(model.config.vision_config.hidden_size)
        if c != expected:
            raise InputError(f"uplinked tokens have {c} channels; this model's vision encoder gives {expected}")
        weight = next(inner.multi_modal_projector.parameters())
        tokens = tokens.to(weight.device, weight.dtype)
        frames = self.uplink_frames(model, n)
        projected = inner.multi_modal_projector(tokens.reshape(v * frames, n // frames, c))  # as get_video_features
        pooled = inner.apply_pooling(projected).reshape(v, -1, projected.shape[-1])
        newline = inner.image_newline[None, None, :].expand(v, 1, -1).to(pooled.dtype)
        video = torch.cat([pooled, newline], dim=1)
        embeds = inner.get_input_embeddings()(input_ids)
        placed = split_placeholders(input_ids, model.config.video_token_id, [video.shape[1]] * v, "videos")
        out = embeds.clone()
        for i, (b, pos) in enumerate(placed):
            out[b, pos] = video[i].to(out.dtype)
        return out, projected.reshape(v, n, -1)


def _video_probe_attention(inner: Any, outputs: Any, kwargs: dict[str, Any], num_videos: int) -> list[Any]:
    """SigLIP attention-pooling probe attention of every video frame, on the pooled token grid.

    Only where the tower keeps its pooling head and the projector reads the last layer, so the
    head's input (``post_layernorm`` of the features) is the tower's ``last_hidden_state``:
    ``a[m] = mean_h softmax_m(q_h · k_{h,m} / √d_h)`` with ``q`` the head's probe, ``k`` its
    key projection. The 2-D map is then resized like the features (bilinear to ⌈side/2⌉).
    Returns one ``[T, M]`` map per video, or ``None`` entries when the signal is unavailable.
    """
    tower = getattr(inner, "vision_tower", None)
    head = getattr(tower, "head", None) or getattr(getattr(tower, "vision_model", None), "head", None)
    layer = kwargs.get("vision_feature_layer")
    if layer is None:
        layer = inner.config.vision_feature_layer
    hidden = getattr(outputs, "last_hidden_state", None)
    if head is None or layer != -1 or hidden is None or kwargs.get("pixel_values_videos") is None:
        return [None] * num_videos
    attn = head.attention
    D = hidden.shape[-1]
    H = attn.num_heads
    w_q, w_k, _ = attn.in_proj_weight.split(D, dim=0)
    b_q, b_k, _ = (attn.in_proj_bias.split(D) if attn.in_proj_bias is not None else (None, None, None))
    with torch.no_grad():
        q = torch.nn.functional.linear(head.probe.reshape(1, D).float(), w_q.float(), None if b_q is None else b_q.float())
        k = torch.nn.functional.linear(hidden.float(), w_k.float(), None if b_k is None else b_k.float())
        q = q.view(H, D // H)
        k = k.view(hidden.shape[0], hidden.shape[1], H, D // H)
        logits = torch.einsum("hd,fnhd->fhn", q, k) / math.sqrt(D // H)
        amap = logits.softmax(-1).mean(1)  # [frames, N]
    return _pooled_per_video(amap, num_videos)


def _pooled_per_video(amap: torch.Tensor, num_videos: int) -> list[torch.Tensor]:
    """A per-frame patch map ``[frames, side²]`` resized like the features (bilinear to
    ``⌈side/2⌉``, as ``apply_pooling``), one ``[T·M]`` map per video."""
    side = math.isqrt(amap.shape[-1])
    amap = amap.view(-1, 1, side, side)
    amap = torch.nn.functional.interpolate(amap, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    amap = amap.flatten(1)
    return list(amap.view(num_videos, -1, amap.shape[-1]).unbind(0))


#: frames per chunk when recomputing a tower layer's attention (bounds the [f, H, N, N] maps)
RECEIVED_CHUNK = 4


def _feature_block(inner: Any, layer: Any) -> Any:
    """The SigLIP encoder layer whose output is the selected feature layer (``None`` if there is
    no single one: a list of feature layers, or the embeddings themselves)."""
    if layer is None:
        layer = inner.config.vision_feature_layer
    tower = getattr(inner, "vision_tower", None)
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not isinstance(layer, int) or isinstance(layer, bool):
        return None
    idx = layer % (len(layers) + 1)  # hidden state idx is the output of layer idx - 1
    return layers[idx - 1] if idx > 0 else None


def _video_received_attention(inner: Any, captured: tuple[Any, torch.Tensor, torch.Tensor] | None,
                              kwargs: dict[str, Any], num_videos: int) -> list[Any]:
    """Mean attention each patch receives in the vision tower's feature layer, per video frame,
    on the pooled token grid (``specs/sota.md``'s U3, read by FlashVID and HoliTom).

    ``captured`` is that layer's attention module with the queries and keys its projections
    produced while the tower ran (forward hooks); only the probabilities are computed again,
    ``a[m] = mean_{h, i} softmax_j(q_{h,i}·k_{h,j}·scale)[m]``, a few frames at a time (fp32).
    Returns one ``[T·M]`` map per video, or ``None`` entries when nothing was captured (features
    given by the caller, a list of feature layers): methods then use their documented stand-in.
    """
    if captured is None or kwargs.get("pixel_values_videos") is None:
        return [None] * num_videos
    attn, q_all, k_all = captured
    H, d = attn.num_heads, attn.head_dim
    maps = []
    with torch.no_grad():
        for q, k in zip(q_all.split(RECEIVED_CHUNK), k_all.split(RECEIVED_CHUNK)):
            f, N, _ = q.shape
            q = (q.float() * attn.scale).view(f, N, H, d).transpose(1, 2).reshape(f * H, N, d)
            k = k.float().view(f, N, H, d).transpose(1, 2).reshape(f * H, N, d)
            probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # [f·H, N, N]
            maps.append(probs.sum(1).view(f, H, N).mean(1) / N)
    amap = torch.cat(maps)
    strategy = kwargs.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    if strategy == "default":
        amap = amap[:, 1:]
    if math.isqrt(amap.shape[-1]) ** 2 != amap.shape[-1]:
        return [None] * num_videos
    return _pooled_per_video(amap, num_videos)


def _plan_frames(model: torch.nn.Module, pixels: torch.Tensor, plan: FramePlan) -> list[torch.Tensor]:
    """The frames of each video ``[V, T, 3, H, W]`` the tower is to encode: ``plan`` reads each
    frame's signature, its patch-mean colours (``[T, 3·s²]``, ``s`` patches a side, the grid
    SigLIP embeds), and the pooled tokens per frame. Every video of a call has ``T`` frames, so
    all keep the same number (a function of ``T``, ``M`` and the options alone)."""
    if pixels.dim() != 5:
        raise InputError(f"pixel_values_videos must be [videos, frames, 3, H, W], got shape {tuple(pixels.shape)}")
    vc = model.config.vision_config
    V, T = pixels.shape[:2]
    M = _pooled_per_frame(model.config)
    with torch.no_grad():
        small = torch.nn.functional.avg_pool2d(pixels.flatten(0, 1).float(), vc.patch_size)
    signatures = small.reshape(V, T, -1)
    kept = [plan(signatures[v], M) for v in range(V)]
    if len({k.numel() for k in kept}) > 1:
        raise RuntimeError("the frame plan kept different numbers of frames for videos with the same grid")
    return kept


def _pooled_per_frame(cfg: Any) -> int:
    """Tokens of one video frame after ``apply_pooling``'s bilinear 2× reduction of the patch grid."""
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return math.ceil(side / 2) ** 2


def _infer_frames(n_content: int, cfg: Any) -> int:
    return max(1, n_content // _pooled_per_frame(cfg))
