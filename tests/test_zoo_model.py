"""The embedded model: shipped in the package, loads with ``from_pretrained``, answers from the video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visiontrim.zoo import synthvid
from visiontrim.zoo.model import EMBEDDED_DIR, build_processor, build_tokenizer, load_embedded, load_model, prompt_for
from visiontrim.zoo.train import TOKEN_WORDS, attention_targets, cell_targets, make_batch, step_seeds, token_words

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
    assert real.accuracy >= 0.6  # measured 0.80 on 1,000 held-out questions (chance 0.29)
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


def test_family_weights_draw_only_the_weighted_families() -> None:
    seeds = step_seeds(3, 11, 64, [0, 1, 0, 1, 0])
    assert seeds == step_seeds(3, 11, 64, [0, 1, 0, 1, 0]) and max(seeds) < synthvid.HELDOUT_START
    families = {synthvid.FAMILIES[s % len(synthvid.FAMILIES)] for s in seeds}
    assert families == {"count", "position"}


@pytest.mark.parametrize("family", synthvid.FAMILIES)
def test_answer_is_a_word_of_the_attended_tokens(family: str) -> None:
    """The training targets agree with the generator: every token the answer position is guided
    onto carries the answer among its words (count: the count so far at the last appearance)."""
    kind = {"needle": "shape", "count": "count", "order": "shape", "position": "place"}
    for seed in range(40):
        example = synthvid.make_example(seed, family)
        words = token_words(example)
        attend = np.nonzero(attention_targets(example))[0]
        assert attend.size > 0
        if family == "attribute":
            slot = TOKEN_WORDS.index("colour" if example.answer in synthvid.COLOURS else "shape")
        else:
            slot = TOKEN_WORDS.index(kind[family])
        assert all(words[i][slot] == example.answer for i in attend), (seed, example.question)
        # empty cells carry no words; every shape carries its colour and shape
        held = {t * 16 + o.cell[0] * 4 + o.cell[1] for t, row in enumerate(example.objects) for o in row}
        assert all((w[0] is not None) == (i in held) for i, w in enumerate(words))


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    from visiontrim.errors import InputError
    from visiontrim.zoo.model import load_model

    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)


def test_training_runs_both_stages_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny run (2 vision-only steps, 2 joint steps) writes a loadable model; a run that crashes
    after step 3 and is resumed ends with exactly the weights of the uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from visiontrim.zoo import train as train_mod

    def args(name: str) -> list[str]:
        return ["--vision-steps", "2", "--steps", "2", "--batch-size", "2", "--warmup", "2", "--threads", "1",
                "--eval-n", "0", "--checkpoint-every", "1", "--out", str(tmp_path / name / "out"),
                "--checkpoint-dir", str(tmp_path / name / "ck")]

    assert train_mod.main(args("straight")) == 0
    model, _ = load_model(tmp_path / "straight" / "out")
    assert model.config.architectures == ["LlavaOnevisionForConditionalGeneration"]

    real = train_mod._checkpoint

    def crash_after_three(cfg, directory, done, *rest):  # type: ignore[no-untyped-def]
        real(cfg, directory, done, *rest)
        if done == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_checkpoint", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(args("crashed"))
    monkeypatch.setattr(train_mod, "_checkpoint", real)
    assert [p.name for p in (tmp_path / "crashed" / "ck").iterdir()] == ["step-3.pt"]
    assert train_mod.main([*args("crashed"), "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text", ["1,2", "1,1,1,1,-1", "0,0,0,0,0", "a,b,c,d,e"])
def test_family_weights_argument_is_checked(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from visiontrim.zoo.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--family-weights", text])
    assert "needle,count,order,position,attribute" in capsys.readouterr().err
