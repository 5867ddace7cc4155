"""Tests of tokensieve.video: decoding, uniform sampling, error messages, array video processor."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tokensieve.errors import InputError, TokensieveError
from tokensieve.processing import ArrayVideoProcessor
from tokensieve.video import (
    load_image,
    load_video,
    read_video,
    sample_indices,
)

SIZE = 32
STEP = 12  # grey level step between consecutive frames: frame i has level i * STEP


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: Path, num_frames: int, size: int = SIZE, container_format: str | None = None) -> Path:
    """Write ``num_frames`` flat grey frames; frame ``i`` has grey level ``i * STEP``."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(_codec(), rate=10)
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * STEP, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index(image: Image.Image) -> int:
    """Recover the frame index from its grey level."""
    return int(round(float(np.asarray(image, dtype=np.float32).mean()) / STEP))


@pytest.fixture(scope="module")
def video20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "twenty.mp4", 20)


def test_sample_indices_uniform() -> None:
    assert sample_indices(20, 4) == [0, 6, 13, 19]
    assert sample_indices(20, 1) == [0]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(0, 3) == []
    with pytest.raises(InputError):
        sample_indices(10, 0)


def test_load_video_samples_uniformly(video20: Path) -> None:
    frames = load_video(video20, num_frames=4)
    assert len(frames) == 4
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" and f.size == (SIZE, SIZE) for f in frames)
    assert [frame_index(f) for f in frames] == [0, 6, 13, 19]


def test_read_video_metadata(video20: Path) -> None:
    clip = read_video(str(video20), num_frames=5)
    assert clip.total_frames == 20
    assert clip.indices == sample_indices(20, 5)
    assert [frame_index(f) for f in clip.frames] == clip.indices
    assert clip.fps == pytest.approx(10.0)
    meta = clip.metadata()
    assert meta["total_num_frames"] == 20
    assert meta["frames_indices"] == clip.indices
    assert meta["duration"] == pytest.approx(2.0)
    assert (meta["height"], meta["width"]) == (SIZE, SIZE)


def test_fewer_frames_than_asked_returns_all(video20: Path) -> None:
    frames = load_video(video20, num_frames=50)
    assert [frame_index(f) for f in frames] == list(range(20))


def test_container_without_frame_count(tmp_path: Path) -> None:
    # MPEG-TS does not declare a frame count, so the video is counted by decoding.
    path = write_video(tmp_path / "clip.ts", 9, container_format="mpegts")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    clip = read_video(path, num_frames=3)
    assert clip.total_frames == 9
    assert [frame_index(f) for f in clip.frames] == [0, 4, 8]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(InputError, match="video file not found") as info:
        load_video(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TokensieveError)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a file"):
        load_video(tmp_path)


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "random.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as info:
        load_video(bad)
    message = str(info.value)
    assert str(bad) in message and "could not decode" in message
    assert "expected" in message  # says what is accepted


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="could not decode"):
        load_video(empty)


@pytest.mark.parametrize("name", ["zero.mp4", "zero.mkv"])
def test_video_with_zero_frames(tmp_path: Path, name: str) -> None:
    # A container written with a video stream but no frame at all.
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(_codec(), rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    assert path.is_file()
    with pytest.raises(InputError, match="no decodable frames|no video stream|could not decode") as info:
        load_video(path)
    assert str(path) in str(info.value)


def test_file_without_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(InputError, match="no video stream"):
        load_video(path)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_frames(video20: Path, bad: object) -> None:
    with pytest.raises(InputError, match="num_frames must be an integer >= 1"):
        load_video(video20, num_frames=bad)  # type: ignore[arg-type]


def test_load_image(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (7, 5), 90).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    with pytest.raises(InputError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="could not read image"):
        load_image(text)


def _qwen_config() -> dict[str, object]:
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def test_array_processor_qwen_layout() -> None:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    out = ArrayVideoProcessor(_qwen_config())([video], return_tensors="np")
    # 3 frames are padded to 4 (a multiple of temporal_patch_size): grid (2, 4, 4).
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    values = out["pixel_values_videos"]
    assert values.shape == (2 * 4 * 4, 3 * 2 * 14 * 14)
    # The first patch is the top-left 14x14 block of frames 0 and 1, channel-major then time.
    norm = (video.astype(np.float32) / 255 - 0.5) / 0.5
    expected = norm[0:2, :14, :14, :].transpose(3, 0, 1, 2).reshape(-1)
    np.testing.assert_allclose(values[0], expected, atol=1e-5)
    # Patches are grouped by 2x2 merge blocks: the second patch is the block to the right.
    expected_right = norm[0:2, :14, 14:28, :].transpose(3, 0, 1, 2).reshape(-1)
    np.testing.assert_allclose(values[1], expected_right, atol=1e-5)
    # The padded time step repeats the last frame.
    last = norm[2:3, :14, :14, :].repeat(2, axis=0).transpose(3, 0, 1, 2).reshape(-1)
    np.testing.assert_allclose(values[16], last, atol=1e-5)


def test_array_processor_llava_layout_and_metadata() -> None:
    config = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 16, "width": 16}}
    frames = [Image.new("RGB", (40, 30), (i * 20, 0, 0)) for i in range(3)]
    meta = {"total_num_frames": 30, "fps": 15.0, "frames_indices": [0, 14, 29]}
    out = ArrayVideoProcessor(config)([frames], return_tensors="pt", return_metadata=True, video_metadata=[meta])
    assert tuple(out["pixel_values_videos"].shape) == (1, 3, 3, 16, 16)
    assert out["video_metadata"][0].sampled_fps == pytest.approx(1.5)
    assert ArrayVideoProcessor(config).to_dict() == config


def test_a_clip_is_sampled_inside_its_window_with_indices_from_the_start(tmp_path: Path) -> None:
    """``start``/``end`` in seconds: frame i is at i / fps; the sampled frames are the rendered ones."""
    from tokensieve.eval.synth_task import write_video
    from tokensieve.zoo import synthvid

    frames = synthvid.make_example(3).frames  # 16 frames, written at 8 fps: 2 s
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    clip = read_video(path, 4, start=0.5, end=1.5)  # frames 4 .. 12
    assert clip.indices == [4, 7, 9, 12]
    for i, image in zip(clip.indices, clip.frames):
        assert np.array_equal(np.asarray(image), frames[i])
    meta = clip.metadata()
    assert meta["frames_indices"] == [4, 7, 9, 12] and meta["total_num_frames"] == 16 and meta["fps"] == 8.0
    assert read_video(path, 32, start=1.0).indices == list(range(8, 16))  # to the end; fewer frames than asked
    assert read_video(path, 2, end=0.25).indices == [0, 2]
    for kwargs, message in (({"start": 1.0, "end": 1.0}, "must come after its start"),
                            ({"start": -1.0}, "seconds >= 0"),
                            ({"start": 5.0}, "holds no frame")):
        with pytest.raises(InputError, match=message):
            read_video(path, 4, **kwargs)
