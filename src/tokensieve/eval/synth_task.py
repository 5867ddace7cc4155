"""An offline lmms-eval task built from the synthetic video questions (``tokensieve_synthvid``).

:func:`write` renders ``n`` held-out questions of :mod:`tokensieve.zoo.synthvid` (the very
questions ``tokensieve bench quality --n n --seed seed`` asks, in the same order) into a folder
lmms-eval reads with ``--include_path``:

- ``videos/<seed>.mp4``: each clip, H.264 RGB with constant quality 0 (``libx264rgb``,
  ``rgb24``, ``crf=0``): lossless, so decoding returns the rendered frames bit for bit;
- ``data.jsonl``: one document per question (``id``, ``video`` as an absolute path,
  ``family``, ``question``, ``answer``, ``options``);
- ``tokensieve_synthvid.yaml``: the task (``generate_until``, greedy, accuracy by the first
  answer word, as :func:`tokensieve.zoo.synthvid.check_answer` scores).

Nothing is downloaded: the dataset is read by the ``json`` builder of ``datasets``. The task
folder holds no code; the YAML points at the functions below by their import path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import InputError

__all__ = ["TASK_NAME", "doc_to_text", "doc_to_visual", "process_results", "write", "write_video"]

#: The task's name (prefixed: a built-in lmms-eval task of the same name would win silently).
TASK_NAME = "tokensieve_synthvid"
#: Frame rate written into the clips (16 frames: two seconds).
FPS = 8


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """Write ``frames`` (uint8 ``[T, H, W, 3]`` RGB) losslessly to ``path`` (H.264 RGB, crf 0)."""
    import av

    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise InputError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {array.dtype} {tuple(array.shape)}")
    out = Path(path)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = int(array.shape[2]), int(array.shape[1])
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def _yaml(max_new_tokens: int) -> str:
    return f"""\
# Written by `tokensieve eval make-task`: held-out synthetic video questions, offline.
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function tokensieve.eval.synth_task.doc_to_visual
doc_to_text: !function tokensieve.eval.synth_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function tokensieve.eval.synth_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def write(directory: str | Path, n: int = 50, seed: int = 0, *, max_new_tokens: int = 2) -> Path:
    """Write the task for held-out set ``seed``'s first ``n`` questions into ``directory``.

    Returns the YAML file's path. ``max_new_tokens`` is the generation budget (2, as the
    quality bench answers). Existing files of an earlier task in ``directory`` are replaced.
    """
    from tokensieve._argtypes import writable_dir
    from tokensieve.zoo import synthvid

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be an integer >= 1 (questions in the task), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0 (the held-out set), got {seed!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    try:
        seeds = synthvid.heldout_seeds(n, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    root = writable_dir(directory, "task directory").resolve()
    videos = root / "videos"
    videos.mkdir(exist_ok=True)
    lines = []
    for s in seeds:
        example = synthvid.make_example(s)
        clip = write_video(videos / f"{s}.mp4", example.frames)
        lines.append(json.dumps({
            "id": s,
            "video": str(clip),
            "family": example.family,
            "question": example.question,
            "answer": example.answer,
            "options": list(example.options),
        }))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = root / f"{TASK_NAME}.yaml"
    task.write_text(_yaml(max_new_tokens), encoding="utf-8")
    return task


# -- the task's functions (named in the YAML) -------------------------------------------------


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The clip of a document, as a path (lmms-eval types paths without an image extension as video)."""
    return [doc["video"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question alone, as the embedded models were trained to read it (video first, then text)."""
    return str(doc["question"])


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """1.0 when the first word of the answer is the right one (``synthvid.check_answer``'s rule)."""
    from tokensieve.zoo.synthvid import normalise_answer

    text = results[0] if results else ""
    return {"accuracy": float(normalise_answer(str(text)) == doc["answer"])}
