"""``lmms-eval --model tokensieve``: any supported checkpoint, compressed by any method, batch > 1.

Usage (after ``pip install "tokensieve[eval]"``)::

    lmms-eval --model tokensieve \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,method=vidcom2,retain=0.25 \\
        --tasks videomme --batch_size 4 --log_samples --output_path runs/

``--model_args`` take the model's own loading arguments (``device``, ``device_map``, ``dtype``,
``attn_implementation``), the video sampling (``max_num_frames``, ``fps``, ``min_pixels``,
``max_pixels``), ``method`` (``none``: uncompressed), ``retain``, ``positions``, ``stats_path``
and the method's own options by name (``tokensieve methods`` lists them), e.g.
``method=fastv,retain=0.25,layer=2`` or ``method=sparsevlm,equivalent=output``. Values in
brackets are read as JSON (``layers=[2,8]``). Everything is checked before the model loads.

The model class is this project's own (lmms-eval's wrappers import packages it does not
install and several assume batch 1). Requests are grouped by task and generation settings,
batched ``batch_size`` at a time with left padding, and returned in the order they came;
greedy answers do not depend on the batch size.

Per-request compression statistics go three ways: ``token_counts.input_tokens`` in the logged
samples (the sequence length the language model received), ``avg_tokensieve_*`` in the
results' ``throughput`` section, and, with ``stats_path=FILE``, one JSON line per request
(``task``, ``split``, ``doc_id`` join it with the samples).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages

import tokensieve
from tokensieve.errors import InputError, first_line

__all__ = ["TokensieveLMM", "coerce_options"]

_DTYPES = ("auto", "bfloat16", "float16", "float32")
#: generation settings this class honours (others given by a task are an error)
_GEN_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "until",
             "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size"}


def _text_value(value: Any) -> Any:
    """A ``--model_args`` value lmms-eval left as a string: ``none``/``null`` → None, brackets,
    quotes and numbers read as JSON, anything else kept."""
    if not isinstance(value, str):
        return value
    from tokensieve._argtypes import key_value

    return key_value(f"v={value}")[1]


def coerce_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Method options from ``--model_args`` (values as lmms-eval parsed them), validated by the
    method; unknown names raise :class:`InputError` listing the accepted ones."""
    spec = tokensieve.methods.get(method)
    out = {key: _text_value(value) for key, value in options.items()}
    from tokensieve.methods.encoder import STAGE_OPTIONS, method_options_only

    unknown = sorted(set(out) - set(spec.options) - set(STAGE_OPTIONS))
    if unknown:
        accepted = sorted(set(spec.options) | set(_OWN_ARGS) | set(STAGE_OPTIONS))
        raise InputError(
            f"unknown --model_args for method {method!r}: {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    spec.create(**method_options_only(out))  # invalid values fail here, naming the option and what it takes
    return out


_OWN_ARGS = ("pretrained", "method", "retain", "positions", "batch_size", "max_batch_size", "device",
             "device_map", "dtype", "attn_implementation", "max_num_frames", "fps", "min_pixels",
             "max_pixels", "stats_path", "trust_remote_code", "revision")


def _positive_int(name: str, value: Any) -> int:
    value = _text_value(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _gen_settings(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``generate`` keyword arguments and the ``until`` stop strings of a request's settings."""
    unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
    if unknown:
        raise InputError(f"generation settings {', '.join(unknown)} are not supported; "
                         f"supported: {', '.join(sorted(_GEN_KEYS))}")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    out: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)),
        "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
        "do_sample": sample,
    }
    if sample:
        out["temperature"] = temperature if temperature > 0 else 1.0
        for key in ("top_p", "top_k"):
            if gen_kwargs.get(key) is not None:
                out[key] = gen_kwargs[key]
    for key in ("repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size"):
        if gen_kwargs.get(key) is not None:
            out[key] = gen_kwargs[key]
    return out, [u for u in until if isinstance(u, str) and u]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text


class TokensieveLMM(lmms):
    """An lmms-eval chat model: a Hugging Face image/video LLM compressed by tokensieve.

    Args:
        pretrained: a model directory or hub id (``AutoModelForImageTextToText``).
        method: a tokensieve method (``tokensieve methods``) or ``"none"`` (uncompressed).
        retain: fraction of visual tokens kept, in (0, 1] (1 with ``method=none``).
        positions: ``preserve`` or ``compact`` (default: the method's default on this family).
        batch_size: requests per ``generate`` call (an integer; ``auto`` is not supported).
        max_batch_size: accepted for lmms-eval's command line; unused.
        device: ``cuda``, ``cuda:N``, ``cpu`` or ``mps`` (under ``accelerate launch``: this
            process's GPU).
        device_map: given to ``from_pretrained`` instead of ``device`` (e.g. ``auto``).
        dtype: ``bfloat16`` (default), ``float16``, ``float32`` or ``auto``.
        attn_implementation: ``sdpa`` (default), ``flash_attention_2``, ``eager``, ...
        max_num_frames: frames sampled uniformly per video (first and last included).
        fps: sample at this rate instead (at most ``max_num_frames``); ``None``: uniform.
        min_pixels, max_pixels: Qwen-family frame size bounds (``None``: the checkpoint's).
        stats_path: write one JSON line of compression statistics per request here.
        **options: the method's options by name.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        retain: float = 1.0,
        positions: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str = "cuda",
        device_map: str | None = None,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        max_num_frames: int = 32,
        fps: float | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        stats_path: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        # -- everything is checked before anything loads ---------------------------------------
        if not isinstance(pretrained, str) or not pretrained:
            raise InputError("pretrained must name a model directory or hub id (pretrained=PATH)")
        method = str(method)
        if method.lower() == "none":
            method = "none"
            if options:
                raise InputError(f"method options were given with method=none: {', '.join(sorted(options))}; "
                                 f"accepted without a method: {', '.join(_OWN_ARGS)}")
            if _text_value(retain) != 1:
                raise InputError(f"retain={retain} needs a method (method=none keeps every token)")
            if _text_value(positions) is not None:
                raise InputError(f"positions={positions} needs a method (method=none changes no position)")
            self.options: dict[str, Any] = {}
        else:
            self.options = coerce_options(method, options)
        from tokensieve.methods.budget import check_retain
        from tokensieve.runtime import POSITION_MODES

        self.retain = check_retain(_text_value(retain)) if method != "none" else 1.0
        positions = _text_value(positions)
        if positions is not None and positions not in POSITION_MODES:
            raise InputError(f"positions must be one of {', '.join(POSITION_MODES)} (or none), got {positions!r}")
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            raise InputError("batch_size=auto is not supported: give an integer (--batch_size 4)")
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        dtype = str(dtype)
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.max_num_frames = _positive_int("max_num_frames", max_num_frames)
        fps = _text_value(fps)
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise InputError(f"fps must be a number > 0 (or none), got {fps!r}")
        self.fps = float(fps) if fps is not None else None
        self.min_pixels = _positive_int("min_pixels", min_pixels) if _text_value(min_pixels) is not None else None
        self.max_pixels = _positive_int("max_pixels", max_pixels) if _text_value(max_pixels) is not None else None
        device_map = _text_value(device_map)

        # -- placement (one process, or one GPU per process under accelerate) -----------------
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            device = f"cuda:{self.accelerator.local_process_index}"
        if device_map is None:
            try:
                self._device = torch.device(str(device))
            except RuntimeError:
                raise InputError(f"device must be cuda, cuda:N, cpu or mps, got {device!r}") from None
            if self._device.type == "cuda" and not torch.cuda.is_available():
                raise InputError("device=cuda but this machine has no CUDA device; pass device=cpu in --model_args")
        self.stats_path = None
        if stats_path:
            path = Path(str(stats_path)).expanduser()
            if self._world_size > 1:
                path = path.with_name(f"{path.name}.rank{self._rank}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")  # a fresh file per run
            self.stats_path = path

        # -- load -------------------------------------------------------------------------------
        from transformers import AutoModelForImageTextToText

        from tokensieve.processing import load_processor

        load_kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
        if revision:
            load_kwargs["revision"] = str(revision)
        try:
            self.processor = load_processor(pretrained, **load_kwargs)
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"could not load the processor of {pretrained!r}: {first_line(exc)}") from exc
        self._set_frame_size()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise InputError(f"{pretrained}: the processor has no tokenizer or chat template; "
                             "expected an instruction-tuned image/video LLM")
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                pretrained,
                dtype="auto" if dtype == "auto" else getattr(torch, dtype),
                attn_implementation=str(attn_implementation),
                device_map=device_map,
                **load_kwargs,
            )
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise InputError(f"could not load {pretrained!r}: {first_line(exc)}") from exc
        if device_map is None:
            model = model.to(self._device)
        model.eval()
        self.model = model
        self.method = method
        self.handle = None
        if method != "none":
            self.handle = tokensieve.compress(model, method, retain=self.retain, positions=positions, **self.options)
        self.positions = self.handle.positions if self.handle is not None else None
        self._placeholders = {
            int(v) for v in (getattr(model.config, k, None) for k in
                             ("image_token_id", "video_token_id", "image_token_index", "video_token_index"))
            if isinstance(v, int)
        }

    # -- lmms-eval's interface ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("tokensieve's lmms-eval model answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokensieve's lmms-eval model answers single-round generate_until tasks only")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        groups: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs, task = request.args[2], request.args[4]
            key = (str(task), json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        totals = {"seconds": 0.0, "new": 0, "requests": 0, "visual_before": 0.0, "visual_after": 0.0,
                  "seq_before": 0.0, "seq_after": 0.0, "score_ms": 0.0}
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokensieve ({self.method})") as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[2]
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    for i, result in zip(chunk, self._answer([requests[i] for i in chunk], gen_kwargs, totals)):
                        results[i] = result
                    bar.update(len(chunk))
        n = max(totals["requests"], 1)
        log_metrics(
            total_elapsed_time=totals["seconds"],
            total_gen_tokens=int(totals["new"]),
            avg_speed=totals["new"] / totals["seconds"] if totals["seconds"] > 0 else 0.0,
            additional_metrics={
                "tokensieve_seq_before": totals["seq_before"] / n,
                "tokensieve_seq_after": totals["seq_after"] / n,
                "tokensieve_visual_before": totals["visual_before"] / n,
                "tokensieve_visual_after": totals["visual_after"] / n,
                "tokensieve_score_ms": totals["score_ms"] / n,
            },
        )
        return results  # type: ignore[return-value]

    # -- one batch ------------------------------------------------------------------------------

    def _answer(self, requests: list[Instance], gen_kwargs: dict[str, Any], totals: dict[str, float]) -> list[GenerationResult]:
        settings, until = _gen_settings(dict(gen_kwargs))
        prompts, images, videos, metadata, frames = [], [], [], [], []
        for request in requests:
            _ctx, doc_to_messages, _gen, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            chat = ChatMessages(messages=doc_to_messages(doc))
            prompt, sample_images, sample_videos = self._render(chat)
            prompts.append(prompt)
            images.extend(sample_images)
            for clip in sample_videos:
                videos.append(clip.frames)
                metadata.append(clip.metadata())
            frames.append([len(c.frames) for c in sample_videos])
        call: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if images:
            call["images"] = images
        if videos:
            call["videos"] = videos
            call["video_metadata"] = metadata
            call["do_sample_frames"] = False  # the frames are already sampled (max_num_frames / fps)
        inputs = self.processor(**call).to(self.model.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.model.dtype)
        ids = inputs["input_ids"]
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        began = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**inputs, pad_token_id=pad, **settings)
        seconds = time.perf_counter() - began
        stats = tokensieve.stats(self.model) if self.handle is not None else None
        new = output[:, ids.shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ends = self._end_ids()
        seq = inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * len(requests)
        placeholders = [int(sum(int((row == p).sum()) for p in self._placeholders)) for row in ids]
        samples = stats.as_dict()["samples"] if stats is not None else None  # once per batch
        results, lines = [], []
        for j, request in enumerate(requests):
            row = new[j].tolist()
            n_new = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
            sample = samples[j] if samples is not None else None
            seq_after = int(sample["sequence_after"]) if sample is not None else int(seq[j])
            if sample is not None:
                visual_before = sum(s["tokens_before"] for s in sample["segments"])
                visual_after = sum(s["tokens_after"] for s in sample["segments"])
                per_layer = sample.get("visual_per_layer_out")
                if per_layer:
                    visual_after = int(per_layer[-1])
                score_ms = sum(s["score_ms"] for s in sample["segments"])
            else:
                visual_before = visual_after = None
                score_ms = 0.0
            results.append(GenerationResult(text=_cut(texts[j], until),
                                            token_counts=TokenCounts(input_tokens=seq_after, output_tokens=n_new)))
            totals["new"] += n_new
            totals["requests"] += 1
            totals["seq_before"] += int(seq[j])
            totals["seq_after"] += seq_after
            totals["visual_before"] += visual_before if visual_before is not None else placeholders[j]
            totals["visual_after"] += visual_after if visual_after is not None else placeholders[j]
            totals["score_ms"] += score_ms
            _ctx, _dtm, _gen, doc_id, task, split = request.args
            line: dict[str, Any] = {
                "task": task, "split": split, "doc_id": doc_id, "method": self.method, "retain": self.retain,
                "positions": self.positions, "options": self.options, "batch_size": len(requests),
                "sequence_before": int(seq[j]), "sequence_after": seq_after,
                "visual_placeholders": placeholders[j],
                "visual_before": visual_before, "visual_after": visual_after,
                "frames": frames[j], "score_ms": round(score_ms, 4), "new_tokens": n_new,
                "generate_ms": round(1000.0 * seconds, 3),
            }
            if sample is not None:
                line["frame_counts"] = [s["frame_counts"] for s in sample["segments"]]
                if sample.get("equivalent_tokens") is not None:
                    line["equivalent_tokens"] = sample["equivalent_tokens"]
            lines.append(line)
        totals["seconds"] += seconds
        if self.stats_path is not None:
            with open(self.stats_path, "a", encoding="utf-8") as handle:
                for line in lines:
                    handle.write(json.dumps(line, default=str) + "\n")
        return results

    def _end_ids(self) -> set[int]:
        ends: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ends.add(value)
            elif isinstance(value, (list, tuple)):
                ends.update(int(v) for v in value)
        return ends

    def _render(self, chat: ChatMessages) -> tuple[str, list[Any], list[Any]]:
        """The chat prompt of one request, its images and its decoded videos (in order)."""
        from tokensieve.video import load_image

        messages, images, videos = [], [], []
        for message in chat.messages:
            content = []
            for item in message.content:
                if item.type == "text":
                    content.append({"type": "text", "text": item.text})
                elif item.type == "image":
                    clip = self._gif_as_video(item.url)
                    if clip is not None:
                        videos.append(clip)
                        content.append({"type": "video"})
                    else:
                        images.append(item.url.convert("RGB") if hasattr(item.url, "convert") else load_image(item.url))
                        content.append({"type": "image"})
                elif item.type == "video":
                    videos.append(self._read_video(item.url, item.start_time, item.end_time))
                    content.append({"type": "video"})
                else:
                    raise InputError(f"tokensieve's lmms-eval model takes text, images and videos; got {item.type!r}")
            messages.append({"role": message.role, "content": content})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (prompt[0] if isinstance(prompt, list) else prompt), images, videos

    def _gif_as_video(self, url: Any) -> Any:
        """A multi-frame ``.gif`` given as an image (lmms-eval types ``.gif`` paths as images)."""
        if not (isinstance(url, str) and url.lower().endswith(".gif")):
            return None
        from PIL import Image

        with Image.open(url) as image:
            if getattr(image, "n_frames", 1) <= 1:
                return None
        return self._read_video(url, None, None)

    def _read_video(self, url: Any, start: float | None, end: float | None) -> Any:
        from tokensieve.video import probe, read_video

        if isinstance(url, dict):
            start = url.get("video_start", start)
            end = url.get("video_end", end)
            url = url.get("path") or url.get("url") or url.get("video")
        if not isinstance(url, (str, os.PathLike)):
            raise InputError(f"a video must be given as a file path, got {type(url).__name__}")
        start = float(start) if start is not None else None
        end = float(end) if end is not None else None
        frames = self.max_num_frames
        if self.fps is not None:
            total, rate = probe(url)
            if total and rate:
                seconds = (end if end is not None else total / rate) - (start or 0.0)
                frames = max(1, min(self.max_num_frames, int(math.ceil(seconds * self.fps))))
        return read_video(url, frames, start=start, end=end)

    def _set_frame_size(self) -> None:
        """Apply ``min_pixels`` / ``max_pixels`` to Qwen-family image and video processors."""
        if self.min_pixels is None and self.max_pixels is None:
            return
        touched = False
        for name in ("image_processor", "video_processor"):
            sub = getattr(self.processor, name, None)
            size = getattr(sub, "size", None)
            if isinstance(size, dict) and {"shortest_edge", "longest_edge"} <= set(size):
                size = dict(size)
                if self.min_pixels is not None:
                    size["shortest_edge"] = self.min_pixels
                if self.max_pixels is not None:
                    size["longest_edge"] = self.max_pixels
                sub.size = size
                for attr, value in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)):
                    if value is not None and hasattr(sub, attr):
                        setattr(sub, attr, value)
                touched = True
        if not touched:
            raise InputError("min_pixels/max_pixels apply to processors that size frames by pixel count "
                             "(Qwen2-VL, Qwen2.5-VL); this checkpoint's processor does not")

