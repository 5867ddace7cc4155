"""The embedded video model: a tiny LLaVA-OneVision trained on :mod:`tokensieve.zoo.synthvid`.

Architecture: the real ``LlavaOnevisionForConditionalGeneration`` with a small SigLIP vision
tower (64×64 frames, 8-pixel patches → 8×8 patches, pooled by the model to 4×4 = 16 tokens per
frame, so a 16-frame clip is 256 visual tokens plus one newline) and a small Qwen2 decoder.
The tokenizer is word-level (one token per word of the synthetic questions and answers) with a
ChatML chat template; the processor is the ordinary ``LlavaOnevisionProcessor``.

The trained weights ship in ``tokensieve/zoo/embedded/`` and load with the ordinary
``from_pretrained``:

>>> from tokensieve.zoo.model import load_embedded
>>> model, processor = load_embedded()                     # doctest: +SKIP

A second architecture, ``arch="qwen2-vl"`` (every builder here takes ``arch=``; the default is
``"llava-onevision"``), is the real ``Qwen2VLForConditionalGeneration`` with the same decoder
(:data:`TEXT`, with multimodal rotary positions, M-RoPE) and a small Qwen2-VL vision tower
(:data:`QWEN_VISION`: 8-pixel patches, two frames per temporal patch, 2×2 patches merged into one
token). A 64×64 frame stays 64×64, so a pair of frames is an 8×8 patch grid merged to 4×4 = 16
tokens, each covering exactly one 16-pixel cell of :mod:`~tokensieve.zoo.synthvid` over both
frames: a 16-frame clip is 128 visual tokens and no newline. Its weights go to
``tokensieve/zoo/embedded-qwen2-vl/`` (:data:`EMBEDDED_QWEN_DIR`;
``python -m tokensieve.zoo.train --arch qwen2-vl``) and load with ``load_embedded(arch="qwen2-vl")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokensieve.errors import InputError

from ..tiny import CLIP_MEAN as _CLIP_MEAN
from ..tiny import CLIP_STD as _CLIP_STD
from ..tiny import video_processor_config
from . import synthvid

__all__ = [
    "ARCHS",
    "DEVICE_DIR",
    "EMBEDDED_DIR",
    "EMBEDDED_DIRS",
    "EMBEDDED_NAMES",
    "FRAMES_PER_TOKEN",
    "EMBEDDED_QWEN_DIR",
    "QWEN_VISION",
    "SIZES",
    "TEACHER_DIR",
    "arch_of",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "embedded_config",
    "load_device",
    "load_embedded",
    "load_teacher",
    "load_model",
    "prompt_for",
    "save_model",
    "structural_video_tokens",
    "video_token_of",
]

#: Architectures of the embedded model: LLaVA-OneVision (the default, shipped) and Qwen2-VL.
ARCHS: tuple[str, ...] = ("llava-onevision", "qwen2-vl")

#: Directory of the shipped LLaVA-OneVision quality instrument (16-layer decoder) in the package:
#: what ``tokensieve demo`` and ``tokensieve bench quality`` run.
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
#: Directory of the shipped Qwen2-VL quality instrument (16-layer decoder, M-RoPE).
EMBEDDED_QWEN_DIR = Path(__file__).resolve().parent / "embedded-qwen2-vl"
#: Directory of the shipped 4-layer LLaVA-OneVision: the on-device model of ``tokensieve collab``,
#: the donor the cloud teacher and the 16-layer instrument were grown from.
DEVICE_DIR = Path(__file__).resolve().parent / "device"
#: Where each architecture's embedded model (the quality instrument) lives.
EMBEDDED_DIRS: dict[str, Path] = {"llava-onevision": EMBEDDED_DIR, "qwen2-vl": EMBEDDED_QWEN_DIR}

FRAME = synthvid.SIZE
PATCH = 8

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "[UNK]"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
_CHAT_WORDS = ["system", "user", "assistant"]

VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": FRAME,
    "patch_size": PATCH,
    "vision_use_head": False,
}
TEXT = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}
#: The cloud teacher's decoder (``tokensieve collab``): the device's, twice as deep. It shares
#: the device's vision tower, so it reads the very tokens a device uplinks, and has its own
#: projector. It is grown from the device (``python -m tokensieve.zoo.train --teacher``): the
#: first four layers, embeddings, projector and head start as the device's, the four new layers
#: as the identity.
TEACHER_TEXT = dict(TEXT, num_hidden_layers=8)
#: The quality instrument's decoder (``tokensieve demo``, ``tokensieve bench quality``): the
#: device's, four times as deep, so that in-LLM methods (FastV, PDrop, SparseVLM), whose layers are
#: published for 28–32-layer models, have room to prune at their depth fractions and still meet
#: low equivalent-token budgets. Grown from the device like the teacher.
DEEP_TEXT = dict(TEXT, num_hidden_layers=16)
#: Model sizes :func:`build_model` knows: the collaboration device, the cloud teacher and the
#: deep quality instrument.
SIZES = {"device": TEXT, "teacher": TEACHER_TEXT, "deep": DEEP_TEXT}

#: The Qwen2-VL vision tower, about the size of :data:`VISION`: 8-pixel patches over two frames
#: (a 3-D convolution), 2 blocks of width 96, and the merger that turns each 2×2 group of patches
#: into one token of the decoder's width.
QWEN_VISION = {
    "depth": 2,
    "embed_dim": 96,
    "num_heads": 4,
    "mlp_ratio": 2,
    "patch_size": PATCH,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "hidden_size": TEXT["hidden_size"],
}
#: How M-RoPE splits the decoder's 16 rotary frequencies (head_dim 32) between time, height and
#: width: Qwen2-VL's 16/24/24 of 64, scaled to 16.
MROPE_SECTION = [4, 6, 6]
#: Pixels of one frame, the Qwen processor's lower and upper bound alike: frames stay 64×64.
QWEN_PIXELS = FRAME * FRAME

#: Directory of the shipped cloud teacher inside the package.
TEACHER_DIR = Path(__file__).resolve().parent / "teacher"


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return arch


def arch_of(obj: Any) -> str:
    """The architecture (:data:`ARCHS`) of a model, a config or a processor of this module."""
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        return "qwen2-vl" if str(model_type).startswith("qwen2_vl") else "llava-onevision"
    return "qwen2-vl" if type(obj).__name__.startswith("Qwen2VL") else "llava-onevision"


#: Names of the shipped quality instruments, as ``--model`` takes them.
EMBEDDED_NAMES: dict[str, str] = {"embedded": "llava-onevision", "embedded-qwen2-vl": "qwen2-vl"}


def video_token_of(model: Any) -> int:
    """The id of the video placeholder token of a model of this module (either architecture)."""
    config = getattr(model, "config", model)
    value = getattr(config, "video_token_index", None)
    if value is None:
        value = getattr(config, "video_token_id", None)
    if value is None:
        raise InputError(f"{type(model).__name__} has no video token id in its config")
    return int(value)


def structural_video_tokens(model: Any) -> int:
    """Video placeholder tokens per clip that are structure, not content: LLaVA-OneVision's
    trailing newline (1); Qwen2-VL has none (0)."""
    return 1 if arch_of(model) == "llava-onevision" else 0


#: Frames one visual token covers: LLaVA-OneVision pools each frame on its own, Qwen2-VL's
#: temporal patches span two.
FRAMES_PER_TOKEN = {"llava-onevision": 1, "qwen2-vl": 2}


def _chat_template(arch: str = "llava-onevision") -> str:
    """ChatML: the video placeholder first, then the question, then the assistant turn.

    LLaVA-OneVision's placeholder is ``<video>`` and a line break; Qwen2-VL's is
    ``<|vision_start|><|video_pad|><|vision_end|>`` (as its own template writes it).
    """
    if arch == "qwen2-vl":
        image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    else:
        image, video = "<image>\\n", "<video>\\n"
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif item['type'] == 'video' -%}{{ '" + video + "' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def build_tokenizer(*, arch: str = "llava-onevision") -> Any:
    """A word-level ``PreTrainedTokenizerFast``: one id per word of the synthetic data, ``[UNK]`` otherwise.

    The special tokens are those of ``arch``'s processor (``<image>``/``<video>``, or Qwen2-VL's
    ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    specials = _QWEN_SPECIALS if arch == "qwen2-vl" else _SPECIALS
    words = specials + _CHAT_WORDS + [w for w in synthvid.vocabulary() if w not in _CHAT_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if arch == "qwen2-vl":
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    else:
        extra = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        extra_special_tokens=extra,
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _chat_template(arch)
    return tokenizer


def _image_processor(arch: str = "llava-onevision") -> Any:
    from tokensieve.processing import has_torchvision

    if arch == "qwen2-vl":
        qwen: dict[str, Any] = {
            "size": {"shortest_edge": QWEN_PIXELS, "longest_edge": QWEN_PIXELS},
            "patch_size": PATCH,
            "temporal_patch_size": QWEN_VISION["temporal_patch_size"],
            "merge_size": QWEN_VISION["spatial_merge_size"],
            "image_mean": list(_CLIP_MEAN),
            "image_std": list(_CLIP_STD),
        }
        if has_torchvision():
            from transformers import Qwen2VLImageProcessor as qwen_cls
        else:
            from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil as qwen_cls
        return qwen_cls(**qwen)
    kwargs: dict[str, Any] = {
        "size": {"height": FRAME, "width": FRAME},
        "image_grid_pinpoints": [[FRAME, FRAME], [FRAME, 2 * FRAME], [2 * FRAME, FRAME], [2 * FRAME, 2 * FRAME]],
        "image_mean": list(_CLIP_MEAN),
        "image_std": list(_CLIP_STD),
        "do_pad": True,
    }
    if has_torchvision():
        from transformers import LlavaOnevisionImageProcessor as cls
    else:
        from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil as cls
    return cls(**kwargs)


def build_processor(tokenizer: Any | None = None, *, arch: str = "llava-onevision") -> Any:
    """The processor of the embedded model: ``LlavaOnevisionProcessor`` (64×64 frames, 16 tokens
    per frame) or, for ``arch="qwen2-vl"``, ``Qwen2VLProcessor`` (64×64 frames, 16 tokens per
    pair of frames)."""
    from tokensieve.processing import assemble_processor

    _check_arch(arch)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch=arch)
    if arch == "qwen2-vl":
        from transformers import Qwen2VLProcessor

        qwen_video = dict(
            video_processor_config("qwen2-vl"),
            size={"shortest_edge": QWEN_PIXELS, "longest_edge": QWEN_PIXELS},
            patch_size=PATCH,
            temporal_patch_size=QWEN_VISION["temporal_patch_size"],
            merge_size=QWEN_VISION["spatial_merge_size"],
        )
        return assemble_processor(
            Qwen2VLProcessor,
            tokenizer=tokenizer,
            image_processor=_image_processor(arch),
            video_processor_config=qwen_video,
            chat_template=tokenizer.chat_template,
        )
    from transformers import LlavaOnevisionProcessor

    video_config = dict(video_processor_config("llava-onevision"), size={"height": FRAME, "width": FRAME})
    return assemble_processor(
        LlavaOnevisionProcessor,
        tokenizer=tokenizer,
        image_processor=_image_processor(),
        video_processor_config=video_config,
        chat_template=tokenizer.chat_template,
        num_image_tokens=(FRAME // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def embedded_config(tokenizer: Any | None = None, size: str = "device", *, arch: str = "llava-onevision") -> Any:
    """The config of the embedded model (``size="device"``) or of the cloud teacher
    (``"teacher"``, see :data:`TEACHER_TEXT`): a ``LlavaOnevisionConfig``, or for
    ``arch="qwen2-vl"`` a ``Qwen2VLConfig`` (same decoder with :data:`MROPE_SECTION`, vision
    tower :data:`QWEN_VISION`)."""
    _check_arch(arch)
    if size not in SIZES:
        raise InputError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch=arch)
    pad_id = int(tokenizer.pad_token_id)
    eos_id = int(tokenizer.eos_token_id)
    text = dict(SIZES[size], vocab_size=len(tokenizer), bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if arch == "qwen2-vl":
        from transformers import Qwen2VLConfig

        text.pop("model_type")
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=list(MROPE_SECTION))
        ids = {name: int(tokenizer.convert_tokens_to_ids(token)) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        return Qwen2VLConfig(text_config=text, vision_config=dict(QWEN_VISION), tie_word_embeddings=False, **ids)
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config=dict(VISION),
        text_config=text,
        image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),
        video_token_index=int(tokenizer.convert_tokens_to_ids("<video>")),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[FRAME, FRAME], [FRAME, 2 * FRAME], [2 * FRAME, FRAME], [2 * FRAME, 2 * FRAME]],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def build_model(seed: int = 0, tokenizer: Any | None = None, size: str = "device", *,
                arch: str = "llava-onevision") -> Any:
    """A freshly initialised (untrained) model of ``size`` (:data:`SIZES`) and ``arch``
    (:data:`ARCHS`), float32, eval mode."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

    _check_arch(arch)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch=arch)
    config = embedded_config(tokenizer, size, arch=arch)
    cls = Qwen2VLForConditionalGeneration if arch == "qwen2-vl" else LlavaOnevisionForConditionalGeneration
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    _generation_defaults(model, tokenizer)
    return model.eval()


def _generation_defaults(model: Any, tokenizer: Any) -> None:
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    generation.max_new_tokens = 4


def save_model(model: Any, processor: Any, path: str | os.PathLike[str], half: bool = True) -> Path:
    """Save ``model`` (fp16 safetensors when ``half``) and ``processor`` with ``save_pretrained``."""
    import copy

    import torch

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    out = copy.deepcopy(model)
    if half:
        out = out.to(torch.float16)
    out.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def load_model(path: str | os.PathLike[str], attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a directory with ``from_pretrained`` (weights as float32)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tokensieve.processing import load_processor

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise InputError(f"no model at {directory}: expected a directory with config.json (written by save_pretrained)")
    processor = load_processor(str(directory))
    model = AutoModelForImageTextToText.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    return model, processor


def load_embedded(attn_implementation: str = "sdpa", *, arch: str = "llava-onevision") -> tuple[Any, Any]:
    """The shipped, trained model of ``arch`` (:data:`ARCHS`) and its processor."""
    directory = EMBEDDED_DIRS[_check_arch(arch)]
    if not (directory / "config.json").is_file():
        which, command = "embedded model", "python -m tokensieve.zoo.train --deep"
        if arch != "llava-onevision":
            which, command = f"embedded {arch} model", f"{command} --arch {arch} --grow-from PATH"
        raise InputError(f"the {which} is missing from {directory}; train it with `{command}`")
    return load_model(directory, attn_implementation)


def load_device(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The shipped 4-layer LLaVA-OneVision (the collaboration's device model) and its processor."""
    if not (DEVICE_DIR / "config.json").is_file():
        raise InputError(f"the device model is missing from {DEVICE_DIR}; train it with `python -m tokensieve.zoo.train`")
    return load_model(DEVICE_DIR, attn_implementation)


def load_teacher(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The shipped cloud teacher and its processor (same tokenizer and vision tower as the device)."""
    if not (TEACHER_DIR / "config.json").is_file():
        raise InputError(
            f"the cloud teacher is missing from {TEACHER_DIR}; train it with "
            "`python -m tokensieve.zoo.train --teacher`"
        )
    return load_model(TEACHER_DIR, attn_implementation)


def prompt_for(processor: Any, question: str) -> str:
    """The chat prompt (video placeholder + question + assistant turn) for ``question``."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt[0] if isinstance(prompt, list) else prompt
