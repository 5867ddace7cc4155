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
    "EMBEDDED_DIR",
    "SIZES",
    "TEACHER_DIR",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "embedded_config",
    "load_embedded",
    "load_teacher",
    "load_model",
    "prompt_for",
    "save_model",
]

#: Directory of the shipped model inside the package.
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

FRAME = synthvid.SIZE
PATCH = 8

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "[UNK]"]
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
#: Model sizes :func:`build_model` knows: the device (the embedded model) and the cloud teacher.
SIZES = {"device": TEXT, "teacher": TEACHER_TEXT}

#: Directory of the shipped cloud teacher inside the package.
TEACHER_DIR = Path(__file__).resolve().parent / "teacher"


def _chat_template() -> str:
    """ChatML: the video placeholder first, then the question, then the assistant turn."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
        "{%- elif item['type'] == 'video' -%}{{ '<video>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast``: one id per word of the synthetic data, ``[UNK]`` otherwise."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _SPECIALS + _CHAT_WORDS + [w for w in synthvid.vocabulary() if w not in _CHAT_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _chat_template()
    return tokenizer


def _image_processor() -> Any:
    from tokensieve.processing import has_torchvision

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


def build_processor(tokenizer: Any | None = None) -> Any:
    """The ``LlavaOnevisionProcessor`` of the embedded model (64×64 frames, 16 tokens per frame)."""
    from transformers import LlavaOnevisionProcessor

    from tokensieve.processing import assemble_processor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
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


def embedded_config(tokenizer: Any | None = None, size: str = "device") -> Any:
    """The ``LlavaOnevisionConfig`` of the embedded model (``size="device"``) or of the cloud
    teacher (``"teacher"``, see :data:`TEACHER_TEXT`)."""
    from transformers import LlavaOnevisionConfig

    if size not in SIZES:
        raise InputError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    pad_id = int(tokenizer.pad_token_id)
    eos_id = int(tokenizer.eos_token_id)
    text = dict(SIZES[size], vocab_size=len(tokenizer), bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
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


def build_model(seed: int = 0, tokenizer: Any | None = None, size: str = "device") -> Any:
    """A freshly initialised (untrained) model of ``size`` (:data:`SIZES`), float32, eval mode."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = embedded_config(tokenizer, size)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
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


def load_embedded(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The shipped, trained model and its processor."""
    if not (EMBEDDED_DIR / "config.json").is_file():
        raise InputError(
            f"the embedded model is missing from {EMBEDDED_DIR}; train it with `python -m tokensieve.zoo.train`"
        )
    return load_model(EMBEDDED_DIR, attn_implementation)


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
