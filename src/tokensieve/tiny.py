"""Tiny, randomly initialised video LLMs for tests and demos, built fully offline.

Each supported architecture gets a model a few hundred kilobytes in size and a matching
processor (tokenizer with chat template, image processor, video processor) that round-trip
through the ordinary ``save_pretrained`` / ``from_pretrained``:

>>> from tokensieve.tiny import make_tiny
>>> make_tiny("qwen2-vl", "/tmp/tiny-qwen2-vl")          # doctest: +SKIP

Sizes are chosen so that small inputs work: LLaVA-OneVision expects 32x32 frames (8x8 patches,
pooled to 4x4 = 16 tokens per video frame), Qwen2-VL / Qwen2.5-VL take 56x56 frames (4 merged
tokens per pair of frames) up to 112x112.

The tokenizer is a byte-level BPE trained in memory on a small English word list, so any text
tokenizes (rare words are split into pieces); its special tokens are those each processor needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokensieve.errors import InputError

__all__ = [
    "ARCHS",
    "build_processor",
    "build_tiny",
    "build_tokenizer",
    "make_tiny",
    "tiny_config",
]

ARCHS: tuple[str, ...] = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "internvl")
#: architectures whose processor needs torchvision (transformers has no other Qwen3-VL video processor)
NEEDS_TORCHVISION: tuple[str, ...] = ("qwen3-vl", "qwen3.5", "internvl")

#: Side of the square frames the tiny models are sized for.
FRAME_SIZE: dict[str, int] = {"llava-onevision": 32, "qwen2-vl": 56, "qwen2.5-vl": 56, "qwen3-vl": 64, "qwen3.5": 64,
                              "internvl": 32}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Text model shared by all architectures (a Qwen2-style decoder).
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
# head_dim = 64 / 4 = 16, so the multimodal rotary sections must add up to 8.
_MROPE_SECTION = [2, 3, 3]

# LLaVA-OneVision vision tower (SigLIP).
_LLAVA_IMAGE = 32
_LLAVA_PATCH = 4
_LLAVA_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

# Qwen pixel budgets: 56x56 is the smallest frame (4x4 patches), 112x112 the largest.
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 112 * 112

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
#: InternVL: one 32-px tile → 8×8 patches → 4×4 tokens after the pixel shuffle
_INTERNVL_TILE = 32

# Words the tokenizer learns whole; anything else is split into smaller byte-level pieces.
_WORDS = """
the a an of to and in on at for with from by as is are was were be been being it this that these
those there here what which who whom whose when where why how not no yes do does did done can could
will would shall should may might must have has had i you he she we they me him her us them my your
his its our their one two three four five six seven eight nine ten first second last next many
much more most some any all each every few other same different new old big small large little
long short high low left right top bottom front back up down over under before after during while
again video image picture frame frames scene clip camera shot person people man woman child boy
girl dog cat bird car bus train road street house room door window table chair bed water sky sun
tree grass light dark color colour red green blue yellow black white orange purple pink brown gray
shown show shows see seen look looks happen happens happening doing play playing run running walk
walking hold holding wear wearing sit sitting stand standing move moving open close describe
detail details answer question please briefly summary summarize count number time second seconds
minute begin beginning end ending start middle object objects thing things kind type main event
events action actions appear appears visible between near far inside outside around behind
""".split()
_PUNCTUATION = list(".,?!:;'\"()-/")


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHS)}")
    return arch


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _chat_template(arch: str) -> str:
    """A ChatML chat template placing each image/video item where the processor expects it."""
    if arch == "llava-onevision":
        image, video = "<image>\n", "<video>\n"
    elif arch == "internvl":
        image, video = "<IMG_CONTEXT>\n", "<video>\n"
    else:
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        video = "<|vision_start|><|video_pad|><|vision_end|>"
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '" + image.replace("\n", "\\n") + "' }}"
        "{%- elif item['type'] == 'video' -%}{{ '" + video.replace("\n", "\\n") + "' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def build_tokenizer(arch: str) -> Any:
    """A small byte-level BPE tokenizer (``PreTrainedTokenizerFast``) for ``arch``.

    Trained in memory on a fixed English word list (deterministic, no download). Holds the
    special tokens the processor of ``arch`` needs, uses ``<|endoftext|>`` as pad token and
    ``<|im_end|>`` as end of turn, and carries a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    specials = {"llava-onevision": _LLAVA_SPECIALS, "internvl": _INTERNVL_SPECIALS}.get(arch, _QWEN_SPECIALS)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_WORDS), " ".join(" " + w for w in _WORDS), " ".join(_PUNCTUATION)]
    # Repeat so that whole words win the merges over incidental pairs.
    core.train_from_iterator(corpus * 4, trainer=trainer)
    extra: dict[str, Any] = {}
    if arch == "llava-onevision":
        extra = {"image_token": "<image>", "video_token": "<video>"}
    elif arch == "internvl":
        extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in specials if t not in {"<|im_end|>", "<|endoftext|>"}],
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": extra} if extra else {}),
    )
    tokenizer.chat_template = _chat_template(arch)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def _token_ids(tokenizer: Any, *tokens: str) -> list[int]:
    found = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    missing = [t for t, i in zip(tokens, found) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise InputError(f"tokenizer lacks special tokens: {missing}")
    return [int(i) for i in found]


def tiny_config(arch: str, tokenizer: Any | None = None) -> Any:
    """The ``transformers`` configuration of the tiny model for ``arch``.

    ``tokenizer`` (default: :func:`build_tokenizer`) fixes the vocabulary size and the
    image/video/special token ids, so the config matches the processor.
    """
    _check_arch(arch)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch)
    vocab = len(tokenizer)
    pad_id, eos_id = _token_ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    text = dict(_TEXT, vocab_size=vocab, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)

    if arch == "llava-onevision":
        from transformers import LlavaOnevisionConfig

        image_id, video_id = _token_ids(tokenizer, "<image>", "<video>")
        return LlavaOnevisionConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": _LLAVA_IMAGE,
                "patch_size": _LLAVA_PATCH,
                "vision_use_head": False,
            },
            text_config=dict(text, model_type="qwen2", tie_word_embeddings=False),
            image_token_index=image_id,
            video_token_index=video_id,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[list(p) for p in _LLAVA_PINPOINTS],
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )

    if arch == "internvl":
        from transformers import InternVLConfig

        (context_id,) = _token_ids(tokenizer, "<IMG_CONTEXT>")
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": [_INTERNVL_TILE, _INTERNVL_TILE], "patch_size": [4, 4]}
        return InternVLConfig(text_config=dict(text, model_type="qwen2", tie_word_embeddings=False),
                              vision_config=vision, image_token_id=context_id,
                              image_seq_length=(_INTERNVL_TILE // 4 // 2) ** 2, tie_word_embeddings=False)
    image_id, video_id, start_id, end_id = _token_ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": list(_MROPE_SECTION)}
    ids = {
        "image_token_id": image_id,
        "video_token_id": video_id,
        "vision_start_token_id": start_id,
        "vision_end_token_id": end_id,
        "tie_word_embeddings": False,
    }
    # Qwen3-VL's and Qwen3.5's vision tower (16-px patches, learnt 4×4 position grid)
    qwen3_vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                    "out_hidden_size": _TEXT["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
                    "temporal_patch_size": 2, "num_position_embeddings": 16}
    if arch == "qwen3.5":
        from transformers import Qwen3_5Config

        # 4 layers: three Gated-DeltaNet linear-attention layers, then a full-attention one
        hybrid = dict(text, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4,
                      rope_parameters=dict(rope, mrope_section=[2, 1, 1], mrope_interleaved=True,
                                           partial_rotary_factor=0.25))
        return Qwen3_5Config(text_config=hybrid, vision_config=qwen3_vision, **ids)
    if arch == "qwen3-vl":
        from transformers import Qwen3VLConfig

        vision = dict(qwen3_vision, deepstack_visual_indexes=[0, 1])
        rope3 = dict(rope, mrope_section=[4, 2, 2], mrope_interleaved=True)
        return Qwen3VLConfig(text_config=dict(text, head_dim=16, rope_parameters=rope3), vision_config=vision, **ids)
    if arch == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": _TEXT["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen2VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **ids)

    from transformers import Qwen2_5_VLConfig

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": _TEXT["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=vision, **ids)


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------


def video_processor_config(arch: str) -> dict[str, Any]:
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    if arch == "llava-onevision":
        return dict(
            common,
            video_processor_type="LlavaOnevisionVideoProcessor",
            size={"height": _LLAVA_IMAGE, "width": _LLAVA_IMAGE},
            default_to_square=False,
        )
    return dict(
        common,
        video_processor_type="Qwen2VLVideoProcessor",
        size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_frames=1,
        max_frames=64,
        cap_pixels_per_frame=False,
    )


def build_processor(arch: str, tokenizer: Any | None = None) -> Any:
    """The processor for the tiny ``arch`` model (``LlavaOnevisionProcessor``, ``Qwen2VLProcessor``,
    ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor`` or ``InternVLProcessor``).

    Image and video sizes match :func:`tiny_config`. The first three work without torchvision:
    the video processor is then a :class:`tokensieve.processing.ArrayVideoProcessor` saved under
    the library's own video processor type (see :func:`tokensieve.processing.assemble_processor`);
    the families in :data:`NEEDS_TORCHVISION` need it, and say so.
    """
    from tokensieve.processing import assemble_processor

    _check_arch(arch)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch)
    template = tokenizer.chat_template
    if arch == "llava-onevision":
        from transformers import LlavaOnevisionProcessor

        image_processor = _image_processor("llava-onevision")
        return assemble_processor(
            LlavaOnevisionProcessor,
            tokenizer=tokenizer,
            image_processor=image_processor,
            video_processor_config=video_processor_config(arch),
            chat_template=template,
            num_image_tokens=(_LLAVA_IMAGE // _LLAVA_PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    if arch in NEEDS_TORCHVISION:
        from tokensieve.processing import has_torchvision

        if not has_torchvision():
            raise InputError(f"the tiny {arch} model needs torchvision for its family's video processor "
                             "(pip install torch==2.14.1 torchvision==0.29.1, or the eval extra's set-up)")
    if arch in ("qwen3-vl", "qwen3.5"):
        return _qwen3_processor(tokenizer, template)
    if arch == "internvl":
        return _internvl_processor(tokenizer, template)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2VLProcessor if arch == "qwen2-vl" else Qwen2_5_VLProcessor
    return assemble_processor(
        cls,
        tokenizer=tokenizer,
        image_processor=_image_processor(arch),
        video_processor_config=video_processor_config(arch),
        chat_template=template,
    )


def _qwen3_processor(tokenizer: Any, template: str) -> Any:
    """Qwen3-VL's own processor, also Qwen3.5's (its video processor writes per-frame timestamps;
    it needs torchvision)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    video_size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128 * 32}  # the video's total pixel budget
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=image_size, patch_size=16, temporal_patch_size=2, merge_size=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(size=video_size, patch_size=16, temporal_patch_size=2, merge_size=2,
                                              do_sample_frames=False, cap_pixels_per_frame=True,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        chat_template=template,
    )


def _internvl_processor(tokenizer: Any, template: str) -> Any:
    """InternVL's own processor: 32-px tiles (up to 4 and a thumbnail per image), one tile per frame."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": _INTERNVL_TILE, "width": _INTERNVL_TILE}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=(_INTERNVL_TILE // 4 // 2) ** 2,
        chat_template=template,
    )


def _image_processor(arch: str) -> Any:
    """The image processor, using the torchvision class when available and the Pillow one otherwise."""
    from tokensieve.processing import has_torchvision

    if arch == "llava-onevision":
        kwargs: dict[str, Any] = {
            "size": {"height": _LLAVA_IMAGE, "width": _LLAVA_IMAGE},
            "image_grid_pinpoints": [list(p) for p in _LLAVA_PINPOINTS],
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "do_pad": True,
        }
        if has_torchvision():
            from transformers import LlavaOnevisionImageProcessor as cls
        else:
            from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil as cls
        return cls(**kwargs)
    kwargs = {
        "size": {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    if has_torchvision():
        from transformers import Qwen2VLImageProcessor as cls
    else:
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil as cls
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_tiny(arch: str, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """A randomly initialised tiny ``(model, processor)`` pair for ``arch``.

    The weights depend only on ``seed``. The model is in eval mode, float32, on CPU, with its
    generation config set to stop at ``<|im_end|>`` and pad with ``<|endoftext|>``.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    _check_arch(arch)
    tokenizer = build_tokenizer(arch)
    config = tiny_config(arch, tokenizer)
    processor = build_processor(arch, tokenizer)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    return model, processor


def make_tiny(arch: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny ``arch`` model and save model and processor into ``path``.

    The directory loads back offline with ``AutoProcessor`` /
    ``AutoModelForImageTextToText.from_pretrained`` (or, without torchvision, with
    :func:`tokensieve.processing.load_processor`). Returns the directory.
    """
    target = Path(path)
    model, processor = build_tiny(arch, seed=seed)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
