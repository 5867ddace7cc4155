"""Built-in model shapes for the speed benchmark, and synthetic inputs for them.

Each shape copies a published checkpoint's dimensions (language model and vision tower) and is
instantiated with random weights: speed does not depend on weight values, and nothing is
downloaded. ``tiny`` / ``tiny-qwen2-vl`` exist for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError

IMAGE_TOKEN, VIDEO_TOKEN, V_START, V_END = 900, 901, 902, 903


@dataclass(frozen=True)
class Arch:
    """A model shape. ``family`` is ``"llava-onevision"``, ``"qwen2-vl"``, ``"qwen2.5-vl"``, ``"qwen3-vl"``
    or ``"internvl"``."""

    name: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any]
    frame_size: int
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      image_size=384, patch_size=14)
#: Qwen3-VL (config.json of the Instruct checkpoints): Qwen3 decoders with interleaved M-RoPE,
#: 16-px patches, DeepStack levels from three ViT blocks
_QWEN3VL_ROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                 "rope_theta": 5000000.0}
_QWEN3VL_VIT_2B = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17])
_QWEN3VL_VIT_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24])
_QWEN2VL_VIT = dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)

ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("tiny", "llava-onevision",
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=4), 32, "test shape"),
        Arch("tiny-qwen2-vl", "qwen2-vl",
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
             dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2), 32, "test shape"),
        Arch("tiny-qwen3-vl", "qwen3-vl",
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1024),
             dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2]),
             32, "test shape"),
        Arch("llava-ov-0.5b", "llava-onevision",
             dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936),
             _SIGLIP_SO400M, 384, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        Arch("llava-ov-7b", "llava-onevision", _QWEN2_7B, _SIGLIP_SO400M, 384,
             "llava-hf/llava-onevision-qwen2-7b-ov-hf (also LLaVA-Video-7B-Qwen2)"),
        Arch("qwen2-vl-2b", "qwen2-vl",
             dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936),
             _QWEN2VL_VIT, 448, "Qwen/Qwen2-VL-2B-Instruct"),
        Arch("qwen2-vl-7b", "qwen2-vl", _QWEN2_7B, _QWEN2VL_VIT, 448, "Qwen/Qwen2-VL-7B-Instruct"),
        Arch("qwen2.5-vl-3b", "qwen2.5-vl",
             dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936),
             dict(hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31]), 448, "Qwen/Qwen2.5-VL-3B-Instruct"),
        Arch("qwen2.5-vl-7b", "qwen2.5-vl", _QWEN2_7B,
             dict(hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31]), 448, "Qwen/Qwen2.5-VL-7B-Instruct"),
        Arch("tiny-internvl", "internvl",
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=4), 32, "test shape"),
        Arch("internvl3.5-2b", "internvl",
             dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, model_type="qwen3"),
             dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=448, patch_size=14), 448, "OpenGVLab/InternVL3_5-2B-HF"),
        Arch("qwen3-vl-2b", "qwen3-vl",
             dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936),
             _QWEN3VL_VIT_2B, 448, "Qwen/Qwen3-VL-2B-Instruct"),
        Arch("qwen3-vl-8b", "qwen3-vl",
             dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936),
             _QWEN3VL_VIT_8B, 448, "Qwen/Qwen3-VL-8B-Instruct"),
    )
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise InputError(f"unknown arch {name!r}; built-in shapes: {', '.join(ARCHES)}") from None


def build_model(arch: Arch, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
                vision_layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of ``arch``'s shape (``vision_layers`` truncates the tower)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(arch.text, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(arch.vision)
    if arch.family == "llava-onevision":
        if vision_layers is not None:
            vision["num_hidden_layers"] = vision_layers
        cfg = LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
            text_config=dict(model_type="qwen2", **text),
            image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        )
        cls = LlavaOnevisionForConditionalGeneration
    elif arch.family == "internvl":
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        if vision_layers is not None:
            vision["num_hidden_layers"] = vision_layers
        size = vision.pop("image_size")
        patch = vision.pop("patch_size")
        text.setdefault("model_type", "qwen2")
        cfg = InternVLConfig(text_config=text, vision_config=dict(vision, image_size=[size, size],
                                                                  patch_size=[patch, patch]),
                             image_token_id=VIDEO_TOKEN, image_seq_length=(size // patch // 2) ** 2)
        cls = InternVLForConditionalGeneration
    elif arch.family == "qwen3-vl":
        text["rope_parameters"] = dict(_QWEN3VL_ROPE)
        if arch.name == "tiny-qwen3-vl":
            text["rope_parameters"]["mrope_section"] = [4, 2, 2]
        if vision_layers is not None:
            vision["depth"] = vision_layers
            vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < vision_layers]
        vision["out_hidden_size"] = text["hidden_size"]
        cfg = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                            video_token_id=VIDEO_TOKEN, vision_start_token_id=V_START, vision_end_token_id=V_END)
        cls = Qwen3VLForConditionalGeneration
    else:
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        q = head_dim // 2
        section = [q // 4, (q - q // 4) // 2, q - q // 4 - (q - q // 4) // 2]
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0}
        if vision_layers is not None:
            vision["depth"] = vision_layers
            if "fullatt_block_indexes" in vision:
                vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [0]
        common = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=V_START,
                      vision_end_token_id=V_END, text_config=text)
        if arch.family == "qwen2-vl":
            vision["hidden_size"] = text["hidden_size"]
            cfg, cls = Qwen2VLConfig(vision_config=vision, **common), Qwen2VLForConditionalGeneration
        else:
            cfg, cls = Qwen2_5_VLConfig(vision_config=vision, **common), Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = attn
    model = cls(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_inputs(model: torch.nn.Module, arch: Arch, frames: int, *, seed: int = 1,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, Any]:
    """One sample: a chat-like prompt with one video of ``frames`` frames and a 20-token question."""
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, 800, (14,), generator=g).tolist()
    question = torch.randint(10, 800, (20,), generator=g).tolist()
    suffix = torch.randint(10, 800, (5,), generator=g).tolist()
    kw: dict[str, Any] = {}
    if arch.family == "internvl":  # one tile per frame: "FrameK: <img> context × S </img>"
        size = arch.vision["image_size"]
        per = (size // arch.vision["patch_size"] // 2) ** 2
        kw["pixel_values"] = torch.randn(frames, 3, size, size, generator=g).to(dtype)
        ids = list(prefix)
        for k in range(frames):
            ids += [11, 12 + k % 10, 13, V_START] + [VIDEO_TOKEN] * per + [V_END]
        ids += question + suffix
    elif arch.family == "llava-onevision":
        size = arch.vision["image_size"]
        kw["pixel_values_videos"] = torch.randn(1, frames, 3, size, size, generator=g).to(dtype)
        side = size // arch.vision["patch_size"]
        n = frames * ((side + 1) // 2) ** 2 + 1
        ids = prefix + [VIDEO_TOKEN] * n + question + suffix
    else:
        cfg = model.config.vision_config
        ps, tp, merge = cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size
        t = max(1, (frames + tp - 1) // tp)
        hw = arch.frame_size // ps
        hw -= hw % merge
        kw["pixel_values_videos"] = torch.randn(t * hw * hw, 3 * tp * ps * ps, generator=g).to(dtype)
        kw["video_grid_thw"] = torch.tensor([[t, hw, hw]])
        n = t * hw * hw // merge**2
        if arch.family == "qwen3-vl":  # each temporal patch: "<x.x seconds>" <vs> pads <ve>
            per = n // t
            stamps = torch.randint(10, 800, (t, 4), generator=g).tolist()
            ids = prefix + [x for k in range(t) for x in stamps[k] + [V_START] + [VIDEO_TOKEN] * per + [V_END]]
            ids += question + suffix
        else:
            ids = prefix + [V_START] + [VIDEO_TOKEN] * n + [V_END] + question + suffix
        if arch.family == "qwen2.5-vl":
            kw["second_per_grid_ts"] = torch.tensor([1.0])
    input_ids = torch.tensor([ids])
    kw["input_ids"] = input_ids
    kw["attention_mask"] = torch.ones_like(input_ids)
    if arch.family not in ("llava-onevision", "internvl"):
        kw["mm_token_type_ids"] = (input_ids == VIDEO_TOKEN).to(torch.int32) * 2
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
