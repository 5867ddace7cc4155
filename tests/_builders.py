"""Tiny randomly initialised VLMs and hand-built batches for the runtime tests (no downloads).

Each architecture is built from a config written here; inputs are token ids with the
model's own placeholder tokens, sized by asking the model's own feature functions how many
features each image/video produces.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import (
    DynamicCache,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

#: every family; the first three also run the in-LLM matrix of test_inllm (the others have their
#: in-LLM references in test_qwen3_vl.py and test_internvl.py: DeepStack, hybrid layers)
ARCHS = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "internvl")
CLASSIC_ARCHS = ARCHS[:3]
#: families with 3-D (M-RoPE) position ids
MROPE_ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5")
#: tokens per InternVL tile (16-px tiles, 4-px patches, pixel shuffle 0.5)
INTERNVL_TILE = 4
VOCAB = 128
PAD, EOS = 0, 1
IMAGE, VIDEO, V_START, V_END = 120, 121, 122, 123
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=PAD,
    bos_token_id=EOS,
    eos_token_id=EOS,
)


def build(arch: str, attn: str = "sdpa", seed: int = 0, siglip_head: bool = False, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    TEXT["num_hidden_layers"] = layers
    if arch == "internvl":
        cfg = InternVLConfig(
            text_config=dict(model_type="qwen2", **TEXT),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=[16, 16], patch_size=[4, 4]),
            image_token_id=IMAGE, image_seq_length=INTERNVL_TILE,
        )
        cfg._attn_implementation = attn
        model = InternVLForConditionalGeneration(cfg)
    elif arch in ("qwen3-vl", "qwen3.5"):
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"], num_position_embeddings=16)
        ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
        if arch == "qwen3-vl":
            text = dict(TEXT, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                          "rope_theta": 10000.0})
            cfg = Qwen3VLConfig(text_config=text, vision_config=dict(vision, deepstack_visual_indexes=[0]), **ids)
            cls = Qwen3VLForConditionalGeneration
        else:  # a linear-attention (Gated DeltaNet) layer, then a full-attention one
            text = dict(TEXT, head_dim=32, layer_types=["linear_attention", "full_attention"] * (layers // 2),
                        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4,
                        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.25})
            cfg = Qwen3_5Config(text_config=text, vision_config=vision, **ids)
            cls = Qwen3_5ForConditionalGeneration
        cfg._attn_implementation = attn
        model = cls(cfg)
        with torch.no_grad():  # a real pad embedding (the padding_idx row starts at zero)
            model.model.language_model.embed_tokens.weight[PAD].normal_()
    elif arch == "llava-onevision":
        cfg = LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=4,
                vision_use_head=siglip_head,
            ),
            text_config=dict(model_type="qwen2", **TEXT),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
            vision_aspect_ratio="anyres_max_9",
        )
        cfg._attn_implementation = attn
        model = LlavaOnevisionForConditionalGeneration(cfg)
        with torch.no_grad():  # a visible newline vector (random init may leave it tiny)
            model.model.image_newline.normal_()
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
        common = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                      vision_end_token_id=V_END, text_config=text)
        if arch == "qwen2-vl":
            cfg = Qwen2VLConfig(vision_config=vision, **common)
            cls = Qwen2VLForConditionalGeneration
        else:
            vision = dict(vision, intermediate_size=64, out_hidden_size=64, window_size=8, fullatt_block_indexes=[0])
            vision.pop("embed_dim")
            vision["hidden_size"] = 32
            cfg = Qwen2_5_VLConfig(vision_config=vision, **common)
            cls = Qwen2_5_VLForConditionalGeneration
        cfg._attn_implementation = attn
        model = cls(cfg)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.do_sample = False
    return model


def _llava_items(model, items: list[tuple[str, Any]], frames: int, g: torch.Generator):
    """Pixel inputs for LLaVA-OV; returns kwargs and the feature count of each item."""
    images = [it for it in items if it[0] == "image"]
    videos = [it for it in items if it[0] == "video"]
    kw: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {"image": [], "video": []}
    if images:
        sizes = torch.tensor([list(it[1]) for it in images])
        pv = torch.randn(len(images), 5, 3, 32, 32, generator=g)
        kw.update(pixel_values=pv, image_sizes=sizes)
        with torch.no_grad():
            out = model.model.get_image_features(pv, sizes, return_dict=True)
        lengths["image"] = [f.shape[0] for f in out.pooler_output]
    if videos:
        pvv = torch.randn(len(videos), frames, 3, 32, 32, generator=g)
        # make frame 1 of each video distinctive so FCA has something to find
        pvv[:, 1] += 2.0
        kw["pixel_values_videos"] = pvv
        side = 32 // 4
        per_frame = ((side + 1) // 2) ** 2
        lengths["video"] = [frames * per_frame + 1] * len(videos)
    return kw, lengths


def _qwen_items(model, items, frames: int, g: torch.Generator):
    cfg = model.config.vision_config
    ps, tp = cfg.patch_size, cfg.temporal_patch_size
    dim = cfg.in_channels * tp * ps * ps
    kw: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {"image": [], "video": []}
    img_grids = [(1, it[1][0], it[1][1]) for it in items if it[0] == "image"]
    vid_grids = [(frames // tp, 8, 8) for it in items if it[0] == "video"]
    if img_grids:
        n = sum(t * h * w for t, h, w in img_grids)
        kw.update(pixel_values=torch.randn(n, dim, generator=g), image_grid_thw=torch.tensor(img_grids))
        lengths["image"] = [t * h * w // 4 for t, h, w in img_grids]
    if vid_grids:
        n = sum(t * h * w for t, h, w in vid_grids)
        pvv = torch.randn(n, dim, generator=g)
        kw.update(pixel_values_videos=pvv, video_grid_thw=torch.tensor(vid_grids))
        if model.config.model_type == "qwen2_5_vl":  # temporal spacing of M-RoPE ids
            kw["second_per_grid_ts"] = torch.tensor([0.5 + i for i in range(len(vid_grids))])
        lengths["video"] = [t * h * w // 4 for t, h, w in vid_grids]
    return kw, lengths


def _internvl_tiles(item: tuple[str, Any], frames: int) -> int:
    """InternVL tiles of an item: an image ``(h, w)`` has 2 or 3 (tiles and thumbnail), a video one per frame."""
    if item[0] == "video":
        return frames
    h, w = item[1]
    return 3 if h < w else 2


def make_batch(model, arch: str, samples: list[list[tuple[str, Any]]], frames: int = 4, seed: int = 1,
               padding_side: str = "left") -> dict[str, Any]:
    """Build a padded batch. ``samples[b]`` lists items ``("video", None)`` or ``("image", (h, w))``.

    LLaVA image sizes are pixel sizes (anyres tiling); Qwen image sizes are patch grids (even).
    """
    g = torch.Generator().manual_seed(seed)
    flat = [it for s in samples for it in s]
    if arch == "llava-onevision":
        kw, lengths = _llava_items(model, flat, frames, g)
        if any(it[0] == "image" for it in flat):
            kw["batch_num_images"] = torch.tensor([sum(it[0] == "image" for it in s) for s in samples])
            if any(int(n) > 1 for n in kw["batch_num_images"]):
                with torch.no_grad():
                    out = model.model.get_image_features(kw["pixel_values"], kw["image_sizes"],
                                                         batch_num_images=kw["batch_num_images"], return_dict=True)
                lengths["image"] = [f.shape[0] for f in out.pooler_output]
    elif arch == "internvl":
        n = sum(_internvl_tiles(it, frames) for it in flat)
        kw, lengths = {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}, {"image": [], "video": []}
    else:
        kw, lengths = _qwen_items(model, flat, frames, g)
    counters = {"image": 0, "video": 0}
    rows = []
    for b, items in enumerate(samples):
        ids = torch.randint(2, 100, (3 + b,), generator=g).tolist()
        for item in items:
            modality = item[0]
            if arch == "internvl":  # <img> context × tiles </img>; frames: "Frame k:" before each
                if modality == "image":
                    ids += [V_START] + [IMAGE] * (INTERNVL_TILE * _internvl_tiles(item, frames)) + [V_END]
                else:
                    for k in range(frames):
                        ids += [101, 102 + k, 103, V_START] + [IMAGE] * INTERNVL_TILE + [V_END]
                ids += torch.randint(2, 100, (16,), generator=g).tolist()  # a caption keeps items apart
                continue
            n = lengths[modality][counters[modality]]
            counters[modality] += 1
            tok = IMAGE if modality == "image" else VIDEO
            if arch in ("qwen3-vl", "qwen3.5") and modality == "video":  # per frame: timestamp, start, pads, end
                t = int(kw["video_grid_thw"][counters[modality] - 1][0])
                for _ in range(t):
                    ids += torch.randint(2, 100, (2,), generator=g).tolist() + [V_START] + [tok] * (n // t) + [V_END]
            elif arch != "llava-onevision":
                ids += [V_START] + [tok] * n + [V_END]
            else:
                ids += [tok] * n
            ids += torch.randint(2, 100, (2,), generator=g).tolist()
        ids += torch.randint(2, 100, (4 + 2 * b,), generator=g).tolist()
        rows.append(ids)
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    kw.update(input_ids=input_ids, attention_mask=mask)
    if arch in MROPE_ARCHS:
        mm = torch.zeros_like(input_ids, dtype=torch.int32)
        mm[input_ids == IMAGE] = 1
        mm[input_ids == VIDEO] = 2
        kw["mm_token_type_ids"] = mm
    return kw


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left padded into ``(input_ids, attention_mask)``, both ``[B, L]``."""
    L = max(map(len, rows))
    input_ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    return input_ids, mask


def capture_lm_inputs(model, kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the *unpatched* model once and capture what it feeds its language model."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        if kwargs.get("position_ids") is not None:
            seen["position_ids"] = kwargs["position_ids"].detach().clone()
        if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL's DeepStack
            seen["visual_pos_masks"] = kwargs["visual_pos_masks"].detach().clone()
            seen["deepstack_visual_embeds"] = [d.detach().clone() for d in kwargs["deepstack_visual_embeds"]]

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        h.remove()
    return seen


def gather_by_hand(full_embeds, full_pos, mask, keep: list[torch.Tensor], positions: str, mrope: bool):
    """Gather kept tokens per row and left-pad, independently of the runtime."""
    B = full_embeds.shape[0]
    n = [int(k.numel()) for k in keep]
    Lp = max(n)
    D = full_embeds.shape[-1]
    emb = torch.zeros(B, Lp, D, dtype=full_embeds.dtype)
    m = torch.zeros(B, Lp, dtype=torch.long)
    pos = torch.zeros((3, B, Lp) if mrope else (B, Lp), dtype=torch.long)
    for b in range(B):
        sl = slice(Lp - n[b], Lp)
        emb[b, sl] = full_embeds[b, keep[b]]
        m[b, sl] = 1
        if positions == "compact":
            ar = torch.arange(n[b])
            if mrope:
                pos[:, b, sl] = ar
            else:
                pos[b, sl] = ar
        elif mrope:
            pos[:, b, sl] = full_pos[:, b, keep[b]]
        else:
            pos[b, sl] = full_pos[b, keep[b]]
    return emb, m, pos


def apply_replaced(emb, st, keep):
    """Write merged features over their kept tokens in a hand-gathered, left-padded batch."""
    Lp = emb.shape[1]
    for b, items in enumerate(st.replaced):
        for positions, feats in items:
            slot = torch.searchsorted(keep[b], positions)
            assert torch.equal(keep[b][slot], positions)  # merged tokens sit at kept positions
            emb[b, Lp - keep[b].numel() + slot] = feats.to(emb.dtype)
    return emb


def full_positions_1d(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def lm_inputs_positions(pos: torch.Tensor, mask: torch.Tensor, mrope: bool) -> torch.Tensor:
    if not mrope:
        return pos
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return torch.cat([text[None], pos], 0)


def cache_kw(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache under the name ``module.forward`` takes (``cache`` since transformers 5.24)."""
    params = inspect.signature(module.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def gather_deepstack(seen: dict[str, Any], keep: list[torch.Tensor], width: int) -> dict[str, Any]:
    """The kept tokens' DeepStack rows and visual mask (left padded to ``width``), by hand:
    ``deepstack_visual_embeds[j]`` rows follow the row-major order of the unpatched visual mask."""
    if "visual_pos_masks" not in seen:
        return {}
    vis = seen["visual_pos_masks"]
    rank = torch.full(vis.shape, -1, dtype=torch.long)
    rank[vis] = torch.arange(int(vis.sum()))
    mask = torch.zeros(len(keep), width, dtype=torch.bool)
    rows = []
    for b, k in enumerate(keep):
        mask[b, width - k.numel():] = vis[b, k]
        rows.append(rank[b, k][vis[b, k]])
    index = torch.cat(rows)
    return {"visual_pos_masks": mask, "deepstack_visual_embeds": [d[index] for d in seen["deepstack_visual_embeds"]]}


@torch.no_grad()
def reference_greedy(model, embeds, mask, pos, n_new: int, mrope: bool, extras: dict[str, Any] | None = None):
    """Greedy decoding with the unpatched language model, by hand. Returns tokens and per-step logits.
    ``extras`` go to the prefill only (Qwen3-VL's DeepStack rows and visual mask)."""
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    p = lm_inputs_positions(pos, mask, mrope)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=p, use_cache=True, **cache_kw(lm, cache),
             **(extras or {}))
    prefill_logits = model.lm_head(out.last_hidden_state)
    logits = prefill_logits[:, -1]
    tokens, steps = [], [logits]
    for i in range(n_new):
        tok = logits.argmax(-1)
        tokens.append(tok)
        if i == n_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
        p = p[..., -1:] + 1
        e = lm.embed_tokens(tok)[:, None]
        out = lm(inputs_embeds=e, attention_mask=mask, position_ids=p, use_cache=True, **cache_kw(lm, cache))
        logits = model.lm_head(out.last_hidden_state[:, -1])
        steps.append(logits)
    return torch.stack(tokens, 1), prefill_logits, steps
