"""Reading videos and images, and turning them into model inputs.

Decoding uses PyAV. :func:`load_video` returns a list of RGB ``PIL.Image.Image`` frames,
sampled uniformly over the whole video; :func:`read_video` returns the same frames together
with the sampled indices and the frame rate, which processors such as Qwen2.5-VL's use to
space video positions in time (see :meth:`VideoClip.metadata`).

Processors (including one that works without torchvision) live in :mod:`tokensieve.processing`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokensieve.errors import InputError

__all__ = ["VideoClip", "load_image", "load_video", "probe", "read_video", "sample_indices"]

_VIDEO_FORMATS = "a container PyAV/FFmpeg can decode (e.g. .mp4, .mkv, .webm, .avi, .mov)"
_IMAGE_FORMATS = "an image Pillow can open (e.g. .png, .jpg, .webp, .bmp)"


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """Frames sampled from a video file.

    Attributes:
        frames: the sampled frames, RGB, in temporal order.
        indices: index of each sampled frame among all decoded frames of the video.
        total_frames: number of frames the video has (as decoded).
        fps: the video stream's average frame rate, or ``None`` when the container does not say.
        path: the file the frames came from.
    """

    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    fps: float | None
    path: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames."""
        width, height = self.frames[0].size
        return height, width

    def metadata(self) -> dict[str, Any]:
        """Video metadata in the form ``transformers`` processors accept as ``video_metadata``.

        Passing it along (``processor(..., videos=[clip.frames], video_metadata=[clip.metadata()])``)
        lets processors that place video tokens in time (Qwen2.5-VL) use the real sampling rate
        instead of a default one.
        """
        height, width = self.size
        duration = self.total_frames / self.fps if self.fps else None
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "duration": duration,
            "frames_indices": list(self.indices),
            "height": height,
            "width": width,
        }


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``total`` frames.

    The first and last frames are always included; indices are ``linspace(0, total - 1)``
    rounded to the nearest integer. When ``num_frames >= total`` every index is returned once.
    """
    if num_frames < 1:
        raise InputError(f"num_frames must be an integer >= 1, got {num_frames}")
    if total <= 0:
        return []
    if num_frames >= total:
        return list(range(total))
    points = np.linspace(0, total - 1, num_frames)
    return [int(i) for i in np.round(points).astype(np.int64)]


def _check_num_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise InputError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if num_frames < 1:
        raise InputError(f"num_frames must be an integer >= 1, got {num_frames}")
    return int(num_frames)


def _check_file(path: str | os.PathLike[str], kind: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise InputError(f"{kind} file not found: {file}")
    if not file.is_file():
        accepted = _VIDEO_FORMATS if kind == "video" else _IMAGE_FORMATS
        raise InputError(f"{kind} path is not a file: {file} (expected {accepted})")
    return file


def _decode_frames(file: Path, wanted: set[int] | None) -> tuple[dict[int, Image.Image], int, float | None]:
    """Decode ``file`` once; keep frames whose index is in ``wanted`` (all when ``None``)."""
    import av

    kept: dict[int, Image.Image] = {}
    count = 0
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise InputError(
                    f"could not decode video {file}: it contains no video stream "
                    f"(expected {_VIDEO_FORMATS})"
                )
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept[count] = frame.to_image().convert("RGB")
                count += 1
    except InputError:
        raise
    except Exception as exc:  # PyAV raises many FFmpeg error types; all mean "cannot decode".
        reason = str(exc).strip() or type(exc).__name__
        raise InputError(
            f"could not decode video {file}: {reason} (expected {_VIDEO_FORMATS})"
        ) from exc
    return kept, count, fps


def probe(path: str | os.PathLike[str]) -> tuple[int, float | None]:
    """``(frame count, average frame rate)`` the container declares for its first video stream,
    without decoding: ``0`` / ``None`` when unknown (or unreadable: decoding reports why)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return 0, None
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            return int(stream.frames or 0), rate
    except Exception:
        return 0, None  # the decoding pass reports the real problem with a full message


def _window(total: int, fps: float | None, start: float | None, end: float | None, file: Path) -> tuple[int, int]:
    """First and last frame index of the clip ``[start, end]`` seconds (frame ``i`` is at ``i / fps``)."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise InputError(f"video clip {name} must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and end <= start:
        raise InputError(f"video clip end ({end} s) must come after its start ({start} s)")
    if not fps:
        raise InputError(f"{file}: the video declares no frame rate, so a clip in seconds cannot be located")
    first = 0 if start is None else math.ceil(start * fps - 1e-9)
    last = total - 1 if end is None else min(total - 1, math.floor(end * fps + 1e-9))
    if first > last:
        raise InputError(f"{file}: the clip [{start}, {end}] s holds no frame of this {total / fps:.2f} s video")
    return first, last


def read_video(path: str | os.PathLike[str], num_frames: int = 32, *, start: float | None = None,
               end: float | None = None) -> VideoClip:
    """Decode ``path`` and sample ``num_frames`` frames uniformly over the whole video, or over the
    clip from ``start`` to ``end`` seconds when either is given.

    Sampling follows :func:`sample_indices`: ``linspace(0, n - 1, num_frames)`` rounded, so the
    first and last frames are included. A video with fewer than ``num_frames`` frames yields
    all of its frames (so the result can be shorter than asked). When the container does not
    declare a frame count, or declares a wrong one, the video is decoded in full to count its
    frames and then sampled. The indices (and :meth:`VideoClip.metadata`) count from the start
    of the video, so processors that place frames in time see their real times.

    Raises:
        InputError: the file is missing, cannot be decoded, has no video stream or no decodable
            frames, ``num_frames`` is not an integer >= 1, or the clip is not a window of the video.
    """
    num_frames = _check_num_frames(num_frames)
    file = _check_file(path, "video")
    if start is not None or end is not None:
        _, total, fps = _decode_frames(file, set())
        first, last = _window(total, fps, start, end, file)
        indices = [first + i for i in sample_indices(last - first + 1, num_frames)]
        kept, total, fps = _decode_frames(file, set(indices))
        indices = [i for i in indices if i in kept]
        if not indices:
            raise InputError(f"could not decode the clip [{start}, {end}] s of video {file}")
        return VideoClip(frames=[kept[i] for i in indices], indices=indices, total_frames=total, fps=fps,
                         path=str(file))
    declared, _ = probe(file)
    if declared > 0:
        indices = sample_indices(declared, num_frames)
        kept, total, fps = _decode_frames(file, set(indices))
        if total != declared:
            # The declared count was wrong: resample over the real count.
            indices = sample_indices(total, num_frames)
            if not set(indices) <= kept.keys():
                kept, total, fps = _decode_frames(file, set(indices))
    else:
        # Unknown length: count the frames first, then keep the sampled ones.
        _, total, _ = _decode_frames(file, set())
        indices = sample_indices(total, num_frames)
        kept, total, fps = _decode_frames(file, set(indices))
    if total == 0 or not kept:
        raise InputError(
            f"could not decode video {file}: it has no decodable frames (expected {_VIDEO_FORMATS} "
            "with at least one video frame)"
        )
    indices = [i for i in indices if i in kept]
    return VideoClip(frames=[kept[i] for i in indices], indices=indices, total_frames=total, fps=fps, path=str(file))


def load_video(path: str | os.PathLike[str], num_frames: int = 32) -> list[Image.Image]:
    """Decode ``path`` and return ``num_frames`` RGB frames sampled uniformly over the video.

    The frames are ``PIL.Image.Image`` objects in temporal order. A video with fewer frames
    than ``num_frames`` yields all of its frames. See :func:`read_video` for the sampled
    indices and the frame rate.

    Raises:
        InputError: the file is missing or not a decodable video, the video has no decodable
            frames, or ``num_frames`` < 1.
    """
    return read_video(path, num_frames).frames


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file and return it as an RGB ``PIL.Image.Image``.

    Raises:
        InputError: the file is missing or Pillow cannot read it.
    """
    file = _check_file(path, "image")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise InputError(f"could not read image {file}: {reason} (expected {_IMAGE_FORMATS})") from exc
