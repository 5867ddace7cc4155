"""The lmms-eval plugin through the real ``lmms-eval`` command line, offline, on the embedded models.

The reference is the quality bench's own code path (``tokensieve.bench.quality.evaluate_configs``:
prompts from ``zoo.model.prompt_for``, frames straight from ``synthvid``, batches of 25), run
in this process on the same questions; the plugin reads the clips back from the task's files,
builds its prompts from lmms-eval's chat messages and batches as lmms-eval hands it requests.
Skipped where lmms-eval is not installed (``pip install -e ".[eval]"``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from tokensieve.errors import InputError  # noqa: E402
from tokensieve.eval import synth_task  # noqa: E402
from tokensieve.zoo.model import EMBEDDED_DIRS  # noqa: E402

N = 20


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_task.write(tmp_path_factory.mktemp("task"), N).parent


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


def lmms_eval_run(task_dir: Path, hf_home: Path, out: Path, model_args: str, batch_size: int) -> dict:
    """One ``python -m lmms_eval`` run; returns its results, per-doc answers and stats lines."""
    stats = out / "stats.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "tokensieve",
        "--model_args", f"{model_args},device=cpu,dtype=float32,stats_path={stats}",
        "--tasks", synth_task.TASK_NAME, "--include_path", str(task_dir), "--batch_size", str(batch_size),
        "--log_samples", "--output_path", str(out / "lmms"),
        "--verbosity", "DEBUG",  # without it lmms-eval exits 0 on any error
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = sorted((out / "lmms").rglob("*_results.json"))
    samples = sorted((out / "lmms").rglob(f"*_samples_{synth_task.TASK_NAME}.jsonl"))
    assert len(results) == 1 and len(samples) == 1, sorted(p.name for p in (out / "lmms").rglob("*"))
    docs = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    by_doc = {int(d["doc_id"]): d for d in docs}
    lines = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    return {"results": json.loads(results[0].read_text()), "docs": by_doc, "stats": lines}


def answer_of(doc: dict) -> str:
    resps = doc["filtered_resps"] if "filtered_resps" in doc else doc["resps"]
    while isinstance(resps, list):
        resps = resps[0]
    return str(resps)


@pytest.fixture(scope="module")
def bench(task_dir: Path) -> dict:
    """The quality bench's answers to the task's questions, per model and config."""
    from tokensieve.bench.quality import evaluate_configs
    from tokensieve.zoo import synthvid
    from tokensieve.zoo.model import load_model

    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(N, 0)]
    out = {}
    for arch, configs in (("llava-onevision", [("none", 1.0), ("vidcom2", 0.25), ("fastv:depth=scaled", 0.25)]),
                          ("qwen2-vl", [("vidcom2", 0.25)])):
        model, processor = load_model(EMBEDDED_DIRS[arch])
        for row in evaluate_configs(model, processor, examples, configs):
            out[(arch, row["method"])] = row
    return out


def test_manifest_resolves_to_the_chat_class() -> None:
    from lmms_eval.models import get_model

    from tokensieve.eval.lmms_model import TokensieveLMM

    assert get_model("tokensieve") is TokensieveLMM
    assert get_model("visiontrim") is TokensieveLMM
    assert TokensieveLMM.is_simple is False


def test_written_task_round_trips_the_frames(task_dir: Path) -> None:
    import numpy as np

    from tokensieve.video import read_video
    from tokensieve.zoo import synthvid

    docs = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == list(synthvid.heldout_seeds(N, 0))
    for doc in docs[:5]:
        clip = read_video(doc["video"], 32)
        frames = np.stack([np.asarray(f) for f in clip.frames])
        assert np.array_equal(frames, synthvid.make_example(doc["id"]).frames)


@pytest.mark.parametrize(
    ("arch", "method", "model_args"),
    [
        ("llava-onevision", "none", "method=none"),
        ("llava-onevision", "vidcom2", "method=vidcom2,retain=0.25"),
        ("llava-onevision", "fastv:depth=scaled", "method=fastv,retain=0.25,depth=scaled"),
        ("qwen2-vl", "vidcom2", "method=vidcom2,retain=0.25"),
    ],
)
def test_offline_task_equals_the_quality_bench(
    arch: str, method: str, model_args: str, task_dir: Path, hf_home: Path, bench: dict, tmp_path: Path
) -> None:
    run = lmms_eval_run(task_dir, hf_home, tmp_path, f"pretrained={EMBEDDED_DIRS[arch]},{model_args}", 4)
    row = bench[(arch, method)]
    answers = [answer_of(run["docs"][i]) for i in range(N)]
    assert [a.strip() for a in answers] == row["answers"]
    accuracy = run["results"]["results"][synth_task.TASK_NAME]["accuracy,none"]
    assert accuracy == pytest.approx(row["scores"]["accuracy"])
    assert len(run["stats"]) == N
    if method == "none":
        assert all(line["visual_before"] is None for line in run["stats"])
        assert row["scores"]["accuracy"] >= 0.8
    elif method == "vidcom2":
        for line in run["stats"]:
            assert line["visual_after"] == round(0.25 * line["visual_before"])
            assert line["sequence_after"] < line["sequence_before"]
    # the sequence the language model received lands in lmms-eval's logged samples
    inputs = [run["docs"][i]["token_counts"][0]["input_tokens"] for i in range(N)]
    by_doc = {line["doc_id"]: line for line in run["stats"]}
    assert inputs == [by_doc[i]["sequence_after"] for i in range(N)]


def test_batch_1_and_batch_4_answer_alike(task_dir: Path, hf_home: Path, tmp_path: Path) -> None:
    args = f"pretrained={EMBEDDED_DIRS['llava-onevision']},method=vidcom2,retain=0.25"
    one = lmms_eval_run(task_dir, hf_home, tmp_path / "bs1", args, 1)
    four = lmms_eval_run(task_dir, hf_home, tmp_path / "bs4", args, 4)
    assert [answer_of(one["docs"][i]) for i in range(N)] == [answer_of(four["docs"][i]) for i in range(N)]
    assert {line["batch_size"] for line in one["stats"]} == {1}
    assert {line["batch_size"] for line in four["stats"]} == {4}

    def kept(run: dict) -> dict:
        return {line["doc_id"]: (line["visual_after"], line["frame_counts"]) for line in run["stats"]}

    assert kept(one) == kept(four)


def test_a_failing_run_fails_the_command(task_dir: Path, hf_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home)}
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "tokensieve",
         "--model_args", f"pretrained={EMBEDDED_DIRS['llava-onevision']},method=vidcom2,retain=2,device=cpu",
         "--tasks", synth_task.TASK_NAME, "--include_path", str(task_dir), "--output_path", str(tmp_path),
         "--verbosity", "DEBUG"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode != 0
    assert "retain" in done.stderr


# -- argument checks, before anything loads ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "vidcom2", "retain": 0.25, "layer": 2}, "unknown --model_args for method 'vidcom2': layer; accepted:"),
        ({"method": "nosuch"}, "nosuch"),
        ({"method": "none", "retain": 0.5}, "retain=0.5 needs a method"),
        ({"method": "none", "layer": 2}, "method options were given with method=none"),
        ({"method": "vidcom2", "retain": 0.25, "batch_size": "auto"}, "batch_size=auto is not supported"),
        ({"method": "vidcom2", "retain": 0.25, "batch_size": "0"}, "batch_size must be an integer >= 1"),
        ({"method": "vidcom2", "retain": 0.25, "positions": "middle"}, "positions must be one of"),
        ({"method": "vidcom2", "retain": 1.5}, "retain"),
        ({"method": "vidcom2", "retain": 0.25, "dtype": "float8"}, "dtype must be one of"),
        ({"method": "vidcom2", "retain": 0.25, "fps": -1}, "fps must be a number > 0"),
        ({"method": "none", "positions": "preserve"}, "positions=preserve needs a method"),
        ({"method": "vidcom2", "retain": 0.25, "device": "tpu"}, "device must be cuda, cuda:N, cpu or mps"),
        ({"method": "vidcom2", "retain": 0.25}, "could not load"),  # every argument fine: the path is not
    ],
)
def test_bad_model_args_are_refused_before_loading(kwargs: dict, message: str, tmp_path: Path) -> None:
    from tokensieve.eval.lmms_model import TokensieveLMM

    missing = tmp_path / "no-model-here"  # only the last case gets as far as loading it
    with pytest.raises(InputError) as info:
        TokensieveLMM(pretrained=str(missing), **{"device": "cpu", **kwargs})
    assert message in str(info.value)


def test_option_values_are_read_as_lmms_eval_leaves_them() -> None:
    from tokensieve.eval.lmms_model import coerce_options

    assert coerce_options("pdrop", {"layers": "[2,4,6]", "ratios": "None"}) == {"layers": [2, 4, 6], "ratios": None}
    assert coerce_options("fastv", {"layer": 2, "depth": "scaled"}) == {"layer": 2, "depth": "scaled"}
    assert coerce_options("lftr", {"spatial": '"off"'}) == {"spatial": "off"}
    with pytest.raises(InputError, match="layer"):
        coerce_options("fastv", {"layer": "two"})
    # the vision-encoder stages every method takes
    assert coerce_options("vidcom2", {"encoder_frames": "0.5", "encoder_merge": 0.5, "encoder_merge_schedule": "early"}) == {
        "encoder_frames": 0.5, "encoder_merge": 0.5, "encoder_merge_schedule": "early"}
    with pytest.raises(InputError, match="encoder_frames must be"):
        coerce_options("vidcom2", {"encoder_frames": "2"})


def test_generation_settings_and_stop_strings() -> None:
    from tokensieve.eval.lmms_model import _cut, _gen_settings

    settings, until = _gen_settings({"max_new_tokens": 16, "temperature": 0, "top_p": 0.9, "until": ["\n\n", "ASSISTANT:"]})
    assert settings == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}  # greedy: no sampling knobs
    assert _cut("B. the cat\n\nmore", until) == "B. the cat"
    assert _cut("B ASSISTANT: again\n\nx", until) == "B "
    settings, until = _gen_settings({"temperature": 0.7, "top_k": 5, "until": "stop"})
    assert settings["do_sample"] and settings["temperature"] == 0.7 and settings["top_k"] == 5
    assert until == ["stop"]
    with pytest.raises(InputError, match="generation settings foo are not supported"):
        _gen_settings({"foo": 1})


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "internvl"])
def test_every_family_answers_images_and_videos_batched_as_one_at_a_time(arch: str, tmp_path: Path) -> None:
    """Mixed image and video requests, three tasks' worth of settings, through ``generate_until``
    at batch 3: each answer equals a single, unpadded ``generate`` on the same compressed model,
    with the inputs built by hand from the processor."""
    import torch
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from tokensieve.eval.lmms_model import TokensieveLMM
    from tokensieve.tiny import make_tiny
    from tokensieve.video import read_video
    from tokensieve.zoo import synthvid

    model_dir = make_tiny(arch, tmp_path / "model")
    clips = [synth_task.write_video(tmp_path / f"{s}.mp4", synthvid.make_example(s).frames) for s in (11, 12)]
    image = Image.fromarray(synthvid.make_example(13).frames[5])
    docs = [
        {"media": ("video", str(clips[0])), "q": "what shape appeared only briefly ?"},
        {"media": ("image", image), "q": "what colour is the square ?"},
        {"media": ("video", str(clips[1])), "q": "where was it at the end ?"},
        {"media": ("image", image), "q": "which shape is on the left side of the picture ?"},
    ]

    def to_messages(doc: dict) -> list:
        kind, url = doc["media"]
        return [{"role": "user", "content": [{"type": kind, "url": url}, {"type": "text", "text": doc["q"]}]}]

    lm = TokensieveLMM(pretrained=str(model_dir), method="vidcom2", retain=0.5, device="cpu", dtype="float32",
                       batch_size=3, max_num_frames=8)
    lm.task_dict = {"a": {"test": docs}, "b": {"test": docs}}
    settings = {"a": {"max_new_tokens": 3, "temperature": 0}, "b": {"max_new_tokens": 2, "temperature": 0}}
    order = [("a", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 3), ("a", 3), ("b", 0)]
    requests = [Instance("generate_until", ("", to_messages, settings[t], i, t, "test"), idx=0,
                         metadata={"task": t, "doc_id": i, "repeats": 1}) for t, i in order]
    out = lm.generate_until(requests)

    processor = lm.processor
    for (task, i), result in zip(order, out):
        kind, url = docs[i]["media"]
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": docs[i]["q"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if kind == "video":
            clip = read_video(url, 8)
            inputs = processor(text=[prompt], videos=[clip.frames], video_metadata=[clip.metadata()],
                               do_sample_frames=False, return_tensors="pt")
        else:
            inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.inference_mode():
            ids = lm.model.generate(**inputs, do_sample=False, max_new_tokens=settings[task]["max_new_tokens"])
        want = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)[0]
        assert result.text == want and want.strip(), (task, i, result.text, want)
        assert result.token_counts.output_tokens <= settings[task]["max_new_tokens"]


def test_a_clip_of_a_video_is_answered_from_its_window(tmp_path: Path) -> None:
    """``video_start``/``video_end`` (as lmms-eval's task code writes them) and ``start_time``/
    ``end_time`` (its chat protocol) sample inside the clip: the answer equals one from the
    clip's frames given by hand."""
    import torch
    from lmms_eval.api.instance import Instance

    from tokensieve.eval.lmms_model import TokensieveLMM
    from tokensieve.tiny import make_tiny
    from tokensieve.video import read_video
    from tokensieve.zoo import synthvid

    model_dir = make_tiny("llava-onevision", tmp_path / "model")
    clip_path = synth_task.write_video(tmp_path / "v.mp4", synthvid.make_example(21).frames)  # 16 frames, 2 s
    docs = [{"video": {"path": str(clip_path), "video_start": 0.5, "video_end": 1.5}},
            {"video": str(clip_path), "start_time": 0.5, "end_time": 1.5}]

    def to_messages(doc: dict) -> list:
        item = {"type": "video", "url": doc["video"]}
        if "start_time" in doc:
            item.update(start_time=doc["start_time"], end_time=doc["end_time"])
        return [{"role": "user", "content": [item, {"type": "text", "text": "what moved ?"}]}]

    lm = TokensieveLMM(pretrained=str(model_dir), method="vidcom2", retain=0.5, device="cpu", dtype="float32",
                       batch_size=2, max_num_frames=4)
    lm.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 3, "temperature": 0}
    out = lm.generate_until([Instance("generate_until", ("", to_messages, gen, i, "t", "test"), idx=0,
                                      metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(2)])
    clip = read_video(clip_path, 4, start=0.5, end=1.5)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moved ?"}]}]
    prompt = lm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = lm.processor(text=[prompt], videos=[clip.frames], video_metadata=[clip.metadata()],
                          do_sample_frames=False, return_tensors="pt")
    with torch.inference_mode():
        ids = lm.model.generate(**inputs, do_sample=False, max_new_tokens=3)
    want = lm.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)[0]
    assert [r.text for r in out] == [want, want]
    whole = read_video(clip_path, 4)  # the whole video answers otherwise: the window is what decided
    inputs = lm.processor(text=[prompt], videos=[whole.frames], video_metadata=[whole.metadata()],
                          do_sample_frames=False, return_tensors="pt")
    with torch.inference_mode():
        ids = lm.model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert lm.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0] != want
