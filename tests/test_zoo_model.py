"""The embedded model: shipped in the package, loads with ``from_pretrained``, answers from the video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visiontrim.zoo import synthvid
from visiontrim.zoo.model import EMBEDDED_DIR, build_processor, build_tokenizer, load_embedded, prompt_for
from visiontrim.zoo.train import cell_targets, make_batch, step_seeds

MAX_BYTES = 15 * 1024 * 1024


@pytest.fixture(scope="module")
def embedded() -> tuple[object, object]:
    return load_embedded()


def test_shipped_files_and_size() -> None:
    names = {p.name for p in EMBEDDED_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir() if p.is_file())
    assert total <= MAX_BYTES


def test_loads_with_from_pretrained() -> None:
    from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(str(EMBEDDED_DIR), dtype=torch.float32)
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vision_config.image_size == synthvid.SIZE


def test_answers_held_out_questions_from_the_video(embedded: tuple[object, object]) -> None:
    from visiontrim.zoo.evaluate import answer, score

    model, processor = embedded
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(40, seed=3)]
    real = score(examples, answer(model, processor, examples, batch_size=20))
    blank = score(examples, answer(model, processor, examples, batch_size=20, blank=True))
    assert real.accuracy >= 0.45  # measured 0.59 on 1,000 held-out questions (chance 0.29)
    assert blank.accuracy <= real.chance + 0.15


def test_prompt_and_placeholders(embedded: tuple[object, object]) -> None:
    model, processor = embedded
    ex = synthvid.make_example(7)
    inputs = processor(text=[prompt_for(processor, ex.question)], videos=[ex.frames], return_tensors="pt")
    video_id = model.config.video_token_index
    assert int((inputs["input_ids"] == video_id).sum()) == synthvid.FRAMES * 16 + 1
    assert tuple(inputs["pixel_values_videos"].shape) == (1, synthvid.FRAMES, 3, synthvid.SIZE, synthvid.SIZE)


def test_tokenizer_is_word_level() -> None:
    tok = build_tokenizer()
    for word in synthvid.vocabulary():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == word
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_training_batches() -> None:
    processor = build_processor()
    seeds = step_seeds(0, 5, 4)
    assert seeds == step_seeds(0, 5, 4) and max(seeds) < synthvid.HELDOUT_START
    examples = [synthvid.make_example(s) for s in seeds]
    batch = make_batch(processor, examples)
    decoded = processor.tokenizer.batch_decode(batch["answer_ids"][:, :1])
    assert decoded == [e.answer for e in examples]
    cells = cell_targets(examples[0])
    assert cells.shape == (synthvid.FRAMES, 16)
    assert int((cells > 0).sum()) == sum(len(row) for row in examples[0].objects)
    assert np.all(batch["position_ids"][:, -1].numpy() == batch["attention_mask"].sum(-1).numpy() - 1)


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    from visiontrim.errors import InputError
    from visiontrim.zoo.model import load_model

    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)
