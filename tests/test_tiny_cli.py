"""Tests of tokensieve.tiny (offline tiny models) and the ``tokensieve`` command line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tokensieve.cli import main
from tokensieve.tiny import ARCHS as ALL_ARCHS
from tokensieve.tiny import FRAME_SIZE, NEEDS_TORCHVISION, build_tokenizer, tiny_config
from tokensieve.processing import has_torchvision, load_processor

#: the tiny architectures this environment can build (Qwen3-VL's processor needs torchvision)
ARCHS = tuple(a for a in ALL_ARCHS if has_torchvision() or a not in NEEDS_TORCHVISION)

QUESTION = "what is shown"
Capsys = pytest.CaptureFixture[str]
Models = dict[str, Path]
Videos = dict[int, Path]


def _write_video(path: Path, num_frames: int, size: int) -> Path:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            level = (i * 23) % 256
            array = np.zeros((size, size, 3), np.uint8)
            array[: size // 2] = level
            array[size // 2 :, :, 2] = 255 - level
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_cli")


@pytest.fixture(scope="module")
def tiny_models(workdir: Path) -> dict[str, Path]:
    """One tiny model per architecture, written through ``tokensieve make-tiny``."""
    paths = {}
    for arch in ARCHS:
        path = workdir / f"tiny-{arch}"
        assert main(["make-tiny", str(path), "--arch", arch, "--seed", "0"]) == 0
        paths[arch] = path
    return paths


@pytest.fixture(scope="module")
def videos(workdir: Path) -> dict[int, Path]:
    return {size: _write_video(workdir / f"clip{size}.mp4", 12, size) for size in sorted(set(FRAME_SIZE.values()))}


def _run_json(capsys: Capsys, argv: list[str]) -> dict[str, Any]:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_covers_text_and_specials(arch: str) -> None:
    tokenizer = build_tokenizer(arch)
    ids = tokenizer("What is shown in this video? Zyxwv, 42!")["input_ids"]
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "What is shown in this video? Zyxwv, 42!"
    placeholder = {"llava-onevision": "<video>", "internvl": "<IMG_CONTEXT>"}.get(arch, "<|video_pad|>")
    pad_ids = tokenizer(placeholder * 5)["input_ids"]
    assert pad_ids == [tokenizer.convert_tokens_to_ids(placeholder)] * 5
    config = tiny_config(arch, tokenizer)
    visual_id = config.image_token_id if arch == "internvl" else config.video_token_id  # InternVL: frames are tiles
    assert visual_id == tokenizer.convert_tokens_to_ids(placeholder)
    assert config.get_text_config().vocab_size == len(tokenizer)


def test_qwen_mrope_sections_fit_head_dim() -> None:
    for arch in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        text = tiny_config(arch).get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_reloads_offline_and_generates(arch: str, tiny_models: Models) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_models[arch]
    if has_torchvision():
        processor = AutoProcessor.from_pretrained(path)
    else:
        processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    size = FRAME_SIZE[arch]
    frames = [Image.new("RGB", (size, size), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("assistant\n")
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
    visual_id = model.config.image_token_id if arch == "internvl" else model.config.video_token_id
    placeholders = int((inputs["input_ids"] == visual_id).sum())
    if arch == "internvl":
        # one 32x32 tile per frame: 8x8 patches, pixel shuffle 0.5 -> 4x4 tokens
        assert placeholders == 4 * 16
    elif arch == "llava-onevision":
        # 8x8 patches pooled to 4x4 per frame, plus one newline token for the video.
        assert placeholders == 4 * 16 + 1
    else:
        # 4 frames of 56x56 (Qwen3-VL: 64x64, 16-px patches): 2 temporal patches x 4x4 patches, merged 2x2.
        assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
        assert placeholders == 2 * 4 * 4 // 4
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_run_video_json(arch: str, tiny_models: Models, videos: Videos, capsys: Capsys) -> None:
    video = videos[FRAME_SIZE[arch]]
    result = _run_json(
        capsys,
        ["run", "--model", str(tiny_models[arch]), "--video", str(video), "--question", QUESTION,
         "--method", "vidcom2", "--retain", "0.5", "--frames", "4", "--max-new-tokens", "3", "--json"],
    )
    assert result["method"] == "vidcom2" and result["retain"] == 0.5
    assert result["input"] == {"kind": "video", "path": str(video), "frames": 4, "frame_indices": [0, 4, 7, 11]}
    assert result["question"] == QUESTION
    assert isinstance(result["answer"], str)
    assert result["new_tokens"] <= 3
    assert 0 < result["tokens_after"] < result["tokens_before"]
    assert result["tokens_after"] == round(0.5 * result["tokens_before"])
    assert result["prefill_ms"] > 0 and result["total_ms"] > 0
    assert result["positions"] in ("preserve", "compact")
    assert result["stats"]["tokens_after"] == result["tokens_after"]


def test_run_image_qwen2_vl(tiny_models: Models, workdir: Path, capsys: Capsys) -> None:
    image = workdir / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 84, 3), dtype=np.uint8)).save(image)
    result = _run_json(
        capsys,
        ["run", "--model", str(tiny_models["qwen2-vl"]), "--image", str(image), "--question", QUESTION,
         "--method", "uniform", "--retain", "0.5", "--max-new-tokens", "2", "--positions", "compact", "--json"],
    )
    assert result["input"]["kind"] == "image"
    assert result["positions"] == "compact"
    assert 0 < result["tokens_after"] < result["tokens_before"]


def test_run_text_output_and_no_compression(tiny_models: Models, videos: Videos, capsys: Capsys) -> None:
    argv = ["run", "--model", str(tiny_models["qwen2-vl"]), "--video", str(videos[56]), "--question", QUESTION,
            "--frames", "4", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "random", "--retain", "0.25", "--attn", "eager"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer:")
    assert "visual tokens: 8 -> 2" in out and "prefill:" in out and "total:" in out
    result = _run_json(capsys, [*argv, "--method", "none", "--json"])
    assert result["tokens_before"] == result["tokens_after"] == 8
    assert result["stats"] is None


# ---------------------------------------------------------------------------------------------
# methods, make-tiny, python -m
# ---------------------------------------------------------------------------------------------


def test_methods_table_and_json(capsys: Capsys) -> None:
    assert main(["methods"]) == 0
    table = capsys.readouterr().out
    for name in ("vidcom2", "random", "uniform"):
        assert name in table
    assert "NAME" in table and "STAGE" in table
    from tokensieve.cli import ENCODER_OPTIONS
    from tokensieve.methods.encoder import STAGE_OPTIONS

    assert set(ENCODER_OPTIONS) == set(STAGE_OPTIONS)
    for name in STAGE_OPTIONS:
        assert f"  {name}: " in table
    assert main(["methods", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    names = {s["name"] for s in specs}
    assert {"vidcom2", "random", "uniform"} <= names
    for spec in specs:
        assert spec["stage"] in ("pre-encoder", "pre-llm", "in-llm")
        assert isinstance(spec["options"], dict) and isinstance(spec["budget_policies"], list)
        assert "factory" not in spec


def test_make_tiny_writes_loadable_directory(tiny_models: Models) -> None:
    files = {p.name for p in tiny_models["llava-onevision"].iterdir()}
    expected = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"}
    assert expected <= files


def test_make_tiny_rejects_file_target(workdir: Path, capsys: Capsys) -> None:
    target = workdir / "a_file"
    target.write_text("x")
    assert main(["make-tiny", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_python_dash_m() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "tokensieve", "methods", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vidcom2" in done.stdout


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_missing_model_path(tmp_path: Path, videos: Videos, capsys: Capsys) -> None:
    missing = tmp_path / "no-model"
    code = main(["run", "--model", str(missing), "--video", str(videos[32]), "--question", QUESTION])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: could not load model '{missing}'")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_model_directory_without_config(tmp_path: Path, videos: Videos, capsys: Capsys) -> None:
    code = main(["run", "--model", str(tmp_path), "--video", str(videos[32]), "--question", QUESTION])
    assert code == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("retain", ["0", "1.5", "-0.1", "half"])
def test_bad_retain_is_an_argument_error(retain: str, capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "x", "--video", "v.mp4", "--question", "q", "--retain", retain])
    assert info.value.code == 2
    assert "--retain" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--frames", "--max-new-tokens"])
def test_bad_counts_are_argument_errors(option: str, capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "x", "--video", "v.mp4", "--question", "q", option, "0"])
    assert info.value.code == 2
    assert "must be an integer >= 1" in capsys.readouterr().err


def test_video_and_image_are_exclusive(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "x", "--video", "a.mp4", "--image", "b.png", "--question", "q"])
    assert info.value.code == 2


def test_missing_video_file(tiny_models: Models, tmp_path: Path, capsys: Capsys) -> None:
    missing = tmp_path / "absent.mp4"
    code = main(["run", "--model", str(tiny_models["qwen2-vl"]), "--video", str(missing), "--question", QUESTION])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: video file not found: {missing}"


def test_unknown_method(tiny_models: Models, videos: Videos, capsys: Capsys) -> None:
    code = main(["run", "--model", str(tiny_models["qwen2-vl"]), "--video", str(videos[56]), "--question", QUESTION,
                 "--method", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'nosuch'" in err and "vidcom2" in err


@pytest.mark.parametrize(
    "method_args",
    [
        ["--method", "lftr", "--temporal", "similarity", "--spatial", "text", "--temporal-rate", "0.5",
         "--spatial-rate", "0.5"],
        ["--method", "lftr", "--temporal", "differential", "--spatial", "topic", "--budget", "fca"],
        ["--method", "visionzip", "--budget", "fca"],
        ["--method", "dycoke"],
        ["--method", "random", "-o", "seed=3", "--budget", "fca"],
        ["--method", "vidcom2", "-o", "exact=false"],
    ],
)
def test_run_accepts_every_method_and_its_options(method_args: list[str], tiny_models: Models, videos: Videos,
                                                  capsys: Capsys) -> None:
    video = videos[sorted(videos)[-1]]
    data = _run_json(capsys, ["run", "--model", str(tiny_models["llava-onevision"]), "--video", str(video),
                              "--question", "what is shown", "--frames", "4", "--max-new-tokens", "2", "--json",
                              *method_args])
    assert data["method"] == method_args[1]
    assert 0 < data["tokens_after"] < data["tokens_before"]
    if method_args[1] == "lftr" and "text" in method_args:
        assert data["question_tokens"] and data["question_tokens"] > 0
        assert data["options"]["temporal_ratio"] == 0.5


def test_run_rejects_unknown_method_options_before_loading(tmp_path: Path, videos: Videos, capsys: Capsys) -> None:
    code = main(["run", "--model", str(tmp_path / "nowhere"), "--video", str(videos[sorted(videos)[-1]]),
                 "--question", "q", "--method", "vidcom2", "-o", "bogus=1"])
    assert code == 2
    assert "does not accept option(s) bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method_args",
    [
        ["--method", "sparsevlm", "-o", "pruning_layers=[0]", "-o", "equivalent=output"],
        ["--method", "fastv", "-o", "layer=1", "-o", "equivalent=keep"],
        ["--method", "vidcom2"],
        ["--method", "dycoke"],
    ],
)
def test_run_takes_positions_as_an_option_for_every_method(method_args: list[str], tiny_models: Models,
                                                          videos: Videos, capsys: Capsys) -> None:
    """``-o positions=...`` means ``--positions`` for every method (SparseVLM once had an option of
    that name, and the two collided in a TypeError)."""
    video = videos[sorted(videos)[-1]]
    base = ["run", "--model", str(tiny_models["llava-onevision"]), "--video", str(video), "--question", "what is shown",
            "--frames", "4", "--max-new-tokens", "2", "--json", "--retain", "0.5", *method_args]
    for mode in ("preserve", "compact"):
        data = _run_json(capsys, [*base, "-o", f"positions={mode}"])
        assert data["positions"] == mode
    code = main([*base, "-o", "positions=preserve", "--positions", "compact"])
    err = capsys.readouterr().err
    assert code == 2 and "positions given twice" in err and len(err.strip().splitlines()) == 1
    code = main([*base, "-o", "positions=original"])
    err = capsys.readouterr().err
    assert code == 2 and "-o positions must be one of preserve, compact" in err


@pytest.mark.parametrize(
    ("method_args", "pattern"),
    [
        (["--method", "vidcom2", "-o", "tau=1e-300"], "vidcom2 option tau must be"),
        (["--method", "random", "-o", "seed=100000000000000000000000"], "random option seed must be"),
        (["--method", "pdrop", "-o", "layers=abc"], "pdrop option layers must be a list of integers"),
        (["--method", "dycoke", "-o", "dp=true", "-o", "dp_threshold=abc"], "dycoke option dp_threshold"),
    ],
)
def test_bad_option_values_are_one_line_errors(method_args: list[str], pattern: str, tmp_path: Path,
                                               videos: Videos, capsys: Capsys) -> None:
    code = main(["run", "--model", str(tmp_path / "never-loaded"), "--video", str(videos[sorted(videos)[-1]]),
                 "--question", "q", *method_args])
    err = capsys.readouterr().err
    assert code == 2 and pattern in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--out", "/proc/forbidden"],
        ["make-tiny", "/proc/forbidden"],
        ["bench", "speed", "--arch", "llava-ov-0.5b", "--out", "/proc/forbidden"],
        ["bench", "quality", "--out", "/proc/forbidden"],
    ],
)
def test_unwritable_output_directories_fail_before_any_work(argv: list[str], capsys: Capsys) -> None:
    import time

    start = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written to" in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 5.0  # refused up front, not after the work


def test_bench_speed_refuses_a_negative_thread_count(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "speed", "--arch", "llava-ov-0.5b", "--threads", "-5"])
    assert exc.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err


def test_run_timings_share_one_clock_and_counts_agree(tiny_models: Models, videos: Videos, capsys: Capsys) -> None:
    video = videos[sorted(videos)[-1]]
    base = ["run", "--model", str(tiny_models["llava-onevision"]), "--video", str(video), "--question", "what is shown",
            "--frames", "4", "--max-new-tokens", "3", "--json"]
    plain = _run_json(capsys, [*base, "--method", "none"])
    full = _run_json(capsys, [*base, "--method", "uniform", "--retain", "1.0"])
    assert plain["tokens_before"] == plain["tokens_after"] == full["tokens_before"] == full["tokens_after"]
    for data in (plain, full):
        assert 0 < data["prefill_ms"] <= data["total_ms"]


@pytest.mark.skipif(has_torchvision(), reason="checks the message shown without torchvision")
def test_make_tiny_qwen3_vl_without_torchvision_is_a_clear_error(tmp_path: Path, capsys: Capsys) -> None:
    assert main(["make-tiny", str(tmp_path / "q3"), "--arch", "qwen3-vl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs torchvision" in err
