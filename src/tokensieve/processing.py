"""A torchvision-free video preprocessor, and loading processors with or without torchvision.

The video processors shipped with ``transformers`` (``LlavaOnevisionVideoProcessor``,
``Qwen2VLVideoProcessor``) require ``torchvision``, and without it the multimodal processor
classes of LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL cannot even be built. When
``torchvision`` is missing, :func:`load_processor` and :func:`assemble_processor` build the
ordinary processor class around an :class:`ArrayVideoProcessor` instead, so the rest of the
pipeline (chat template, placeholder expansion, ``mm_token_type_ids``, ...) is still the
library's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from transformers.utils import PushToHubMixin

from tokensieve.errors import InputError

__all__ = ["ArrayVideoProcessor", "assemble_processor", "has_torchvision", "load_processor"]


def has_torchvision() -> bool:
    """Whether ``transformers`` can use torchvision (needed by its own video processors)."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


_PIL_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
                 3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


def _fit_to_grid(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area within ``[min_pixels, max_pixels]``.

    Keeps the aspect ratio as closely as the grid allows (the sizing rule of Qwen2-VL).
    """
    import math

    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


@dataclass
class _FrameMeta:
    """Minimal video metadata with the ``sampled_fps`` that Qwen2.5-VL's processor reads."""

    total_num_frames: int
    fps: float | None = None
    frames_indices: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sampled_fps(self) -> float:
        """Rate of the sampled frames (24 when the source rate is unknown)."""
        if self.fps is None:
            return 24.0
        if not self.frames_indices or not self.total_num_frames:
            return float(self.fps)
        return len(self.frames_indices) / self.total_num_frames * float(self.fps)


def _video_to_array(video: Any) -> np.ndarray:
    """One video (list of frames or ``[T, H, W, C]`` / ``[T, C, H, W]`` array) as uint8 ``[T, H, W, 3]``."""
    if isinstance(video, (list, tuple)):
        frames = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in video]
        array = np.stack(frames)
    else:
        array = np.asarray(video.detach().cpu().numpy() if hasattr(video, "detach") else video)
    if array.ndim != 4:
        raise InputError(f"a video must have 4 dimensions [frames, height, width, channels], got shape {array.shape}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return array


def _split_videos(videos: Any) -> list[Any]:
    """Normalise the ``videos`` argument to a list of single videos."""
    if isinstance(videos, np.ndarray) or hasattr(videos, "detach"):
        return [videos] if videos.ndim == 4 else list(videos)
    if isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], Image.Image):
        return [list(videos)]
    return list(videos)


class ArrayVideoProcessor(PushToHubMixin):
    """A numpy/Pillow stand-in for the video processors of the supported model families.

    It reproduces the output layout the model expects:

    * ``qwen2-vl`` family (``Qwen2VLVideoProcessor``): frames resized to a multiple of
      ``patch_size * merge_size`` within the ``size`` pixel bounds, padded to a multiple of
      ``temporal_patch_size`` by repeating the last frame, and flattened into
      ``pixel_values_videos`` of shape ``[patches, C * temporal_patch_size * patch_size**2]``
      plus ``video_grid_thw``.
    * ``llava-onevision`` family (``LlavaOnevisionVideoProcessor``): frames resized to
      ``size["height"] x size["width"]``, giving ``pixel_values_videos`` ``[videos, T, C, H, W]``.

    Resizing uses Pillow, so values can differ slightly from the torchvision path. Frame sampling
    options (``do_sample_frames``, ``fps``, ``num_frames``) are ignored: pass already-sampled frames
    (e.g. from :func:`load_video`). The configuration is the same dictionary the library saves
    for its own video processor, so a saved model loads either way.
    """

    valid_kwargs = None
    _auto_class = None

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        kind = str(self.config.get("video_processor_type", ""))
        self.family = "qwen2-vl" if ("Qwen" in kind or "temporal_patch_size" in self.config) else "llava-onevision"
        self.size: dict[str, int] = dict(self.config.get("size") or {})
        self.image_mean = np.asarray(self.config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.image_std = np.asarray(self.config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.rescale_factor = float(self.config.get("rescale_factor", 1 / 255))
        self.do_resize = bool(self.config.get("do_resize", True))
        self.do_rescale = bool(self.config.get("do_rescale", True))
        self.do_normalize = bool(self.config.get("do_normalize", True))
        self.resample = _PIL_RESAMPLE.get(int(self.config.get("resample", 3)), Image.Resampling.BICUBIC)
        self.patch_size = int(self.config.get("patch_size", 14))
        self.temporal_patch_size = int(self.config.get("temporal_patch_size", 2))
        self.merge_size = int(self.config.get("merge_size", 2))
        self.return_metadata = bool(self.config.get("return_metadata", False))

    # -- library-facing protocol ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The configuration, as saved under ``video_processor`` in ``processor_config.json``."""
        return dict(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.config, sort_keys=True)})"

    def __call__(self, videos: Any, **kwargs: Any) -> Any:
        """Preprocess ``videos`` (one video or a list of videos) into model tensors."""
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        *,
        video_metadata: Sequence[Any] | dict[str, Any] | None = None,
        return_metadata: bool | None = None,
        return_tensors: str | None = "pt",
        **_: Any,
    ) -> Any:
        """See the class docstring; unknown keyword arguments are accepted and ignored."""
        from transformers import BatchFeature

        arrays = [_video_to_array(v) for v in _split_videos(videos)]
        if not arrays:
            raise InputError("no video given: expected at least one video with at least one frame")
        for array in arrays:
            if array.shape[0] == 0:
                raise InputError("a video has no frames: expected at least one frame per video")
        metas = self._metadata(arrays, video_metadata)
        if self.family == "qwen2-vl":
            data = self._qwen(arrays)
        else:
            data = self._llava(arrays)
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if self.return_metadata if return_metadata is None else return_metadata:
            out["video_metadata"] = metas
        return out

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _metadata(arrays: list[np.ndarray], given: Sequence[Any] | dict[str, Any] | None) -> list[_FrameMeta]:
        if given is None:
            given_list: list[Any] = [None] * len(arrays)
        elif isinstance(given, dict) or not isinstance(given, (list, tuple)):
            given_list = [given]
        else:
            given_list = list(given)
        if len(given_list) != len(arrays):
            raise InputError(
                f"got {len(arrays)} videos but {len(given_list)} video_metadata entries; pass one per video"
            )
        metas = []
        for array, meta in zip(arrays, given_list):
            if meta is None:
                metas.append(_FrameMeta(total_num_frames=len(array), frames_indices=list(range(len(array)))))
                continue
            get = meta.get if isinstance(meta, dict) else (lambda k, d=None, m=meta: getattr(m, k, d))
            metas.append(
                _FrameMeta(
                    total_num_frames=int(get("total_num_frames", len(array)) or len(array)),
                    fps=get("fps", None),
                    frames_indices=list(get("frames_indices", None) or range(len(array))),
                )
            )
        return metas

    def _normalise(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` -> float32 ``[T, 3, H, W]`` rescaled and normalised."""
        out = frames.astype(np.float32)
        if self.do_rescale:
            out = out * self.rescale_factor
        if self.do_normalize:
            out = (out - self.image_mean) / self.image_std
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

    def _resize(self, frames: np.ndarray, height: int, width: int) -> np.ndarray:
        if frames.shape[1] == height and frames.shape[2] == width:
            return frames
        return np.stack([np.asarray(Image.fromarray(f).resize((width, height), self.resample)) for f in frames])

    def _qwen(self, arrays: list[np.ndarray]) -> dict[str, Any]:
        ps, tp, ms = self.patch_size, self.temporal_patch_size, self.merge_size
        factor = ps * ms
        min_pixels = int(self.size.get("shortest_edge", 56 * 56))
        max_pixels = int(self.size.get("longest_edge", 28 * 28 * 768))
        patches_all, grids = [], []
        for frames in arrays:
            height, width = frames.shape[1:3]
            if self.do_resize:
                height, width = _fit_to_grid(height, width, factor, min_pixels, max_pixels)
                frames = self._resize(frames, height, width)
            if height % factor or width % factor:
                raise InputError(
                    f"video frames of {height}x{width} do not fit a {factor}-pixel grid; enable resizing "
                    f"or pass frames whose sides are multiples of {factor}"
                )
            video = self._normalise(frames)
            if pad := -len(video) % tp:
                video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
            channels = video.shape[1]
            grid_t, grid_h, grid_w = len(video) // tp, height // ps, width // ps
            blocks = video.reshape(grid_t, tp, channels, grid_h // ms, ms, ps, grid_w // ms, ms, ps)
            # -> (t, block_row, block_col, row_in_block, col_in_block, channel, time_in_patch, py, px)
            blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            patches_all.append(blocks.reshape(grid_t * grid_h * grid_w, channels * tp * ps * ps))
            grids.append([grid_t, grid_h, grid_w])
        return {
            "pixel_values_videos": np.concatenate(patches_all, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }

    def _llava(self, arrays: list[np.ndarray]) -> dict[str, Any]:
        height = int(self.size.get("height", self.size.get("shortest_edge", 384)))
        width = int(self.size.get("width", self.size.get("shortest_edge", 384)))
        videos = [self._normalise(self._resize(f, height, width) if self.do_resize else f) for f in arrays]
        if len({v.shape for v in videos}) != 1:
            raise InputError("videos in one batch must have the same number of frames and the same frame size")
        return {"pixel_values_videos": np.stack(videos)}


def _lenient_processor_class(processor_cls: type) -> type:
    """``processor_cls`` with its argument type check relaxed for an :class:`ArrayVideoProcessor`.

    The subclass keeps the original name so that saving writes the real ``processor_class``.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if isinstance(argument, ArrayVideoProcessor):
            return ArrayVideoProcessor
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_cls.__name__,
        (processor_cls,),
        {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__module__": processor_cls.__module__,
            "__doc__": processor_cls.__doc__,
        },
    )


def _video_processor_from_config(config: dict[str, Any]) -> Any:
    """The library's own video processor when torchvision is present, else an :class:`ArrayVideoProcessor`."""
    if has_torchvision():
        import transformers

        kind = config.get("video_processor_type")
        cls = getattr(transformers, str(kind), None) if kind else None
        if cls is not None:
            kwargs = {k: v for k, v in config.items() if k != "video_processor_type"}
            return cls(**kwargs)
    return ArrayVideoProcessor(config)


def assemble_processor(
    processor_cls: type,
    *,
    tokenizer: Any,
    image_processor: Any,
    video_processor_config: dict[str, Any],
    chat_template: str | None = None,
    **init_kwargs: Any,
) -> Any:
    """Build ``processor_cls`` (e.g. ``Qwen2VLProcessor``) with or without torchvision.

    With torchvision the video processor is the library's class named by
    ``video_processor_config["video_processor_type"]``; without it, an
    :class:`ArrayVideoProcessor` configured by the same dictionary.
    """
    video_processor = _video_processor_from_config(video_processor_config)
    cls = processor_cls
    if isinstance(video_processor, ArrayVideoProcessor):
        cls = _lenient_processor_class(processor_cls)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
        **init_kwargs,
    )


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def load_processor(name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a model's processor, falling back to a torchvision-free build when needed.

    First tries ``AutoProcessor.from_pretrained``. When that fails and torchvision is missing,
    the processor class named in the model's ``processor_config.json`` is rebuilt around an
    :class:`ArrayVideoProcessor`: the video processor settings come from the nested
    ``video_processor`` section of ``processor_config.json`` or from the older separate
    ``video_preprocessor_config.json``; tokenizer and image processor load as usual. This works
    for local directories and for hub ids (cached or downloadable).

    ``OSError`` from the library (missing path, unreachable hub) propagates unchanged.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except OSError:
        raise
    except Exception as exc:
        if has_torchvision():
            raise
        return _load_processor_without_torchvision(str(name_or_path), exc, **kwargs)


def _optional_file(name: str, filename: str, **kwargs: Any) -> Path | None:
    """Local path of ``filename`` in a model directory or hub repo, ``None`` when absent."""
    local = Path(name) / filename
    if Path(name).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        name,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **kwargs,
    )
    return Path(found) if found else None


def _load_processor_without_torchvision(name: str, cause: BaseException, **kwargs: Any) -> Any:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cause_text = str(cause).strip()
    cause_line = cause_text.splitlines()[0] if cause_text else type(cause).__name__

    def fail(reason: str) -> InputError:
        return InputError(
            f"could not build the processor of '{name}' without torchvision: {reason} "
            f"(the library reported: {cause_line})"
        )

    config_file = _optional_file(name, "processor_config.json", **kwargs)
    if config_file is None:
        raise fail("no processor_config.json found (expected a saved multimodal processor)")
    processor_dict = _read_json(config_file)
    class_name = str(processor_dict.get("processor_class", ""))
    processor_cls = getattr(transformers, class_name, None) if class_name else None
    if processor_cls is None:
        raise fail(f"unknown processor class {class_name!r} in processor_config.json")
    video_config = processor_dict.get("video_processor")
    if not isinstance(video_config, dict):
        legacy = _optional_file(name, "video_preprocessor_config.json", **kwargs)
        video_config = _read_json(legacy) if legacy is not None else {}
    if not video_config:
        raise fail("no video processor settings found (processor_config.json or video_preprocessor_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    template_file = _optional_file(name, "chat_template.jinja", **kwargs)
    if template_file is not None:
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        legacy_template = _optional_file(name, "chat_template.json", **kwargs)
        chat_template = _read_json(legacy_template).get("chat_template") if legacy_template is not None else None
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    init_names = set(_init_parameter_names(processor_cls))
    init_kwargs = {
        key: value
        for key, value in processor_dict.items()
        if key in init_names and key not in {"image_processor", "tokenizer", "video_processor", "chat_template"}
    }
    return assemble_processor(
        processor_cls,
        tokenizer=tokenizer,
        image_processor=image_processor,
        video_processor_config=video_config,
        chat_template=chat_template,
        **init_kwargs,
    )


def _init_parameter_names(cls: type) -> Iterable[str]:
    import inspect

    return [name for name in inspect.signature(cls.__init__).parameters if name not in {"self", "kwargs"}]
