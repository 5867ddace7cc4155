"""The embedded model: shipped in the package, loads with ``from_pretrained``, answers from the video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve.zoo import synthvid
from tokensieve.zoo.model import DEVICE_DIR, EMBEDDED_DIR, build_processor, build_tokenizer, load_embedded, load_model, prompt_for
from tokensieve.zoo.train import (
    COUNT_SINK,
    TOKEN_WORDS,
    Turn,
    attention_targets,
    cell_targets,
    extra_turns,
    make_batch,
    step_seeds,
    token_words,
    turns_for,
)

MAX_BYTES = 15 * 1024 * 1024


@pytest.fixture(scope="module")
def embedded() -> tuple[object, object]:
    return load_embedded()


@pytest.mark.parametrize("directory", [EMBEDDED_DIR, DEVICE_DIR], ids=["embedded", "device"])
def test_shipped_files_and_size(directory: Path) -> None:
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    total = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert total <= MAX_BYTES


def test_the_device_model_is_the_4_layer_donor() -> None:
    """The collaboration's device model: 4 decoder layers; the 16-layer instrument was grown from
    it (its vision tower bit for bit)."""
    from safetensors.torch import load_file

    from tokensieve.zoo.model import load_device

    model, _ = load_device()
    assert model.config.text_config.num_hidden_layers == 4
    device = load_file(str(DEVICE_DIR / "model.safetensors"))
    deep = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    tower = [k for k in device if "vision_tower" in k]
    assert tower and all(torch.equal(device[k], deep[k]) for k in tower)


def test_loads_with_from_pretrained() -> None:
    from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(str(EMBEDDED_DIR), dtype=torch.float32)
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vision_config.image_size == synthvid.SIZE


def test_answers_held_out_questions_from_the_video(embedded: tuple[object, object]) -> None:
    from tokensieve.zoo.evaluate import answer, score

    model, processor = embedded
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(40, seed=3)]
    real = score(examples, answer(model, processor, examples, batch_size=20))
    blank = score(examples, answer(model, processor, examples, batch_size=20, blank=True))
    assert real.accuracy >= 0.85  # measured 0.937 on 1,000 held-out questions (chance 0.29)
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
    onto carries the answer among its words (count: the asked-for shape, in twice as many tokens
    as the answer, since each appearance lasts two frames)."""
    kind = {"needle": "shape", "order": "shape", "position": "place"}
    for seed in range(40):
        example = synthvid.make_example(seed, family)
        words = token_words(example)
        attend = np.nonzero(attention_targets(example))[0]
        assert attend.size > 0
        if family == "count":
            colour, shape = example.question.split()[5:7]
            assert attend.size == 2 * (synthvid.NUMBERS.index(example.answer) + 1), (seed, example.question)
            assert all(words[i][:2] == [colour, shape] for i in attend)
        else:
            if family == "attribute":
                slot = TOKEN_WORDS.index("colour" if example.answer in synthvid.COLOURS else "shape")
            else:
                slot = TOKEN_WORDS.index(kind[family])
            assert all(words[i][slot] == example.answer for i in attend), (seed, example.question)
        # empty cells carry no words; every shape carries its colour and shape
        held = {t * 16 + o.cell[0] * 4 + o.cell[1] for t, row in enumerate(example.objects) for o in row}
        assert all((w[0] is not None) == (i in held) for i, w in enumerate(words))


def _check_extra(example: synthvid.Example, turn: Turn) -> None:
    """Answer ``turn`` from the clip's objects independently of :func:`extra_turns`."""
    objects = [o for row in example.objects for o in row]
    words = turn.question.split()
    attended = {int(i) for i in np.nonzero(turn.attend)[0]}
    if words[:3] == ["what", "colour", "is"]:
        shape = words[4]
        named = {o.colour for o in objects if o.shape == shape}
        assert named == {turn.answer}, (example.seed, turn)
        # one shape of that kind in the clip (possibly drawn in many frames)
        assert len({(o.colour, o.shape) for o in objects if o.shape == shape}) == 1
        chosen = [o for o in objects if o.shape == shape]
    elif words[:3] == ["what", "shape", "is"]:
        colour = words[4]
        assert {o.shape for o in objects if o.colour == colour} == {turn.answer}, (example.seed, turn)
        chosen = [o for o in objects if o.colour == colour]
    elif words[:3] == ["how", "many", "times"]:
        colour, shape = words[5:7]
        present = [sum((o.colour, o.shape) == (colour, shape) for o in row) for row in example.objects]
        runs = [t for t in range(synthvid.FRAMES) if present[t] and (t == 0 or not present[t - 1])]
        assert synthvid.NUMBERS[len(runs) - 1] == turn.answer and turn.sink == COUNT_SINK
        # two frames per appearance, so the guided tokens number twice the answer
        assert all(present[t] == 1 and present[t + 1] == 1 for t in runs) and sum(present) == 2 * len(runs)
        chosen = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
    else:
        assert words[:3] == ["where", "was", "the"] and words[-3:] == ["the", "end", "?"]
        colour, shape = words[3:5]
        last = [[o for o in row if (o.colour, o.shape) == (colour, shape)] for row in example.objects[-3:]]
        assert all(len(r) == 1 for r in last) and len({r[0].cell for r in last}) == 1
        assert last[0][0].cell in synthvid.REST_CELLS[turn.answer]
        assert attended == {(synthvid.FRAMES - 3 + t) * 16 + r[0].cell[0] * 4 + r[0].cell[1] for t, r in enumerate(last)}
        return
    frames = {t * 16 + o.cell[0] * 4 + o.cell[1] for t, row in enumerate(example.objects) for o in row if o in chosen}
    assert attended == frames


def test_extra_questions_are_answered_correctly() -> None:
    """Extra questions are phrased as the held-out families phrase them, answered right (checked
    against the objects directly), guided onto the asked-for shape, never repeat the example's
    own question, come count questions first, and are a pure function of the seed."""
    kinds: set[str] = set()
    for seed in range(300):
        example = synthvid.make_example(seed)
        turns = extra_turns(example, 3)
        assert [t.question for t in turns] == [t.question for t in extra_turns(synthvid.make_example(seed), 3)]
        assert len({t.question for t in turns}) == len(turns) and example.question not in {t.question for t in turns}
        assert all(w in synthvid.vocabulary() for t in turns for w in t.question.split() + [t.answer])
        counting = [t.question.startswith("how many") for t in turns]
        assert counting == sorted(counting, reverse=True)
        for turn in turns:
            _check_extra(example, turn)
            kinds.add(turn.question.split()[1])
    assert kinds == {"many", "colour", "shape", "was"}
    assert extra_turns(synthvid.make_example(0), 0) == []


def test_training_conversations() -> None:
    """The first turn is exactly the inference prompt; every turn's answer follows its answer
    position and is followed by the end of turn; count questions (and only they) carry the sink weight."""
    processor = build_processor()
    examples = [synthvid.make_example(s) for s in range(10)]
    batch = make_batch(processor, examples, extra=2)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, example in enumerate(examples):
        turns = turns_for(example, 2)
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        video = tok.convert_tokens_to_ids("<video>")
        own = [t for t in tok(prompt_for(processor, example.question) + example.answer + "<|im_end|>")["input_ids"]
               if t != video]
        assert [t for t in ids if t != video][: len(own)] == own
        for j, turn in enumerate(turns):
            pos = int(batch["answer_pos"][i, j])
            assert tok.convert_ids_to_tokens(int(batch["input_ids"][i, pos])) == "assistant"
            assert tok.decode([int(batch["input_ids"][i, pos + 1])]) == turn.answer
            assert int(batch["input_ids"][i, pos + 2]) == end
            assert bool((batch["attend"][i, j].numpy() == turn.attend).all())
            assert float(batch["sink"][i, j]) == (COUNT_SINK if turn.question.startswith("how many") else 0.0)
            assert float(batch["sink"][i, j]) == turn.sink
            asked = [w for w in turn.question.split() if w in synthvid.COLOURS or w in synthvid.SHAPES]
            marked = torch.nonzero(batch["question_words"][i, j])[:, 0]
            assert tok.convert_ids_to_tokens(batch["input_ids"][i, marked].tolist()) == asked
            assert bool((marked < pos).all()) and (j == 0 or bool((marked > batch["answer_pos"][i, j - 1]).all()))
        assert (batch["answer_pos"][i, len(turns):] == -1).all() and (batch["answer_ids"][i, len(turns):] == -100).all()


def test_count_guidance_is_lowest_at_its_target_spread() -> None:
    """The count guidance is minimised by attention that gives each target token one share and
    the first token COUNT_SINK shares, so what the head reads grows with the count."""
    from tokensieve.zoo.train import COUNT_HEAD, GUIDED_LAYERS, _attention_loss

    processor = build_processor()
    example = next(synthvid.make_example(s) for s in range(1, 400, 5) if synthvid.make_example(s).answer == "three")
    batch = make_batch(processor, [example])
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    length = batch["input_ids"].shape[1]
    visual = torch.nonzero(batch["input_ids"][0] == video_id)[:-1, 0]
    targets = visual[batch["attend"][0, 0]]
    assert targets.numel() == 6

    def loss_for(sink_share: float) -> float:
        row = torch.full((length,), 1e-9)
        row[targets] = (1 - sink_share) / targets.numel()
        row[0] = sink_share
        probs = torch.zeros(1, 4, length, length)
        probs[0, COUNT_HEAD, int(batch["answer_pos"][0, 0])] = row / row.sum()
        attentions = [probs] * (max(GUIDED_LAYERS) + 1)
        return float(_attention_loss(attentions, batch, video_id))

    best = COUNT_SINK / (COUNT_SINK + 6)
    assert loss_for(best) < min(loss_for(best - 0.1), loss_for(best + 0.1), loss_for(0.001))


def test_question_guidance_is_lowest_spread_evenly_over_the_asked_words() -> None:
    """The first layer's question head is guided to bring the colour and the shape word of a
    count question to the answer position in equal shares, so the heads above can match both."""
    from tokensieve.zoo.train import QUESTION_HEAD, _attention_loss

    processor = build_processor()
    example = next(synthvid.make_example(s) for s in range(1, 400, 5))
    assert example.family == "count"
    batch = make_batch(processor, [example])
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    length = batch["input_ids"].shape[1]
    colour, shape = torch.nonzero(batch["question_words"][0, 0])[:, 0].tolist()
    pos = int(batch["answer_pos"][0, 0])

    def loss_for(colour_share: float, elsewhere: float = 0.0) -> float:
        row = torch.full((length,), 1e-9)
        row[colour], row[shape], row[pos] = colour_share, 1 - colour_share - elsewhere, elsewhere
        probs = torch.zeros(1, 4, length, length)
        probs[0, QUESTION_HEAD, pos] = row / row.sum()
        return float(_attention_loss([probs, *[torch.zeros_like(probs)] * 3], batch, video_id))

    assert loss_for(0.5) < min(loss_for(0.3), loss_for(0.7), loss_for(0.99), loss_for(0.4, elsewhere=0.2))


def test_count_focus_weighs_only_the_count_guidance() -> None:
    from tokensieve.zoo.train import _attention_loss

    processor = build_processor()
    examples = [synthvid.make_example(s) for s in range(10)]
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    batch = make_batch(processor, examples)
    length = batch["input_ids"].shape[1]
    attentions = [torch.softmax(torch.randn(10, 4, length, length, generator=torch.Generator().manual_seed(i)), -1)
                  for i in range(4)]
    counting = batch["sink"][:, 0] > 0
    assert 0 < int(counting.sum()) < len(examples)
    base, heavy = _attention_loss(attentions, batch, video_id), _attention_loss(attentions, batch, video_id, 3.0)
    assert float(heavy) > float(base)
    plain = {k: (v[~counting] if torch.is_tensor(v) and v.shape[:1] == (10,) else v) for k, v in batch.items()}
    plain_attn = [a[~counting] for a in attentions]
    assert torch.allclose(_attention_loss(plain_attn, plain, video_id),
                          _attention_loss(plain_attn, plain, video_id, 3.0))


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    from tokensieve.errors import InputError
    from tokensieve.zoo.model import load_model

    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)


def test_training_runs_both_stages_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny run (2 vision-only steps, 2 joint steps) writes a loadable model; a run that crashes
    after step 3 and is resumed ends with exactly the weights of the uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from tokensieve.zoo import train as train_mod

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


def test_vision_tower_stays_fixed_after_the_vision_steps(tmp_path: Path) -> None:
    """With no vision-only steps, the vision tower ships exactly as initialised; the projector and
    the decoder learn. ``--no-freeze-vision`` lets the tower learn too."""
    from safetensors.torch import load_file

    from tokensieve.zoo import train as train_mod
    from tokensieve.zoo.model import build_model

    initial = {k.removeprefix("model."): v.half() for k, v in build_model(0, build_tokenizer()).state_dict().items()}
    base = ["--vision-steps", "0", "--steps", "2", "--batch-size", "2", "--warmup", "1", "--threads", "1",
            "--eval-n", "0", "--checkpoint-every", "0"]
    for flag, tower_fixed in (("--freeze-vision", True), ("--no-freeze-vision", False)):
        out = tmp_path / flag
        assert train_mod.main([*base, flag, "--out", str(out)]) == 0
        trained = load_file(str(out / "model.safetensors"))
        tower = [k for k in trained if "vision_tower" in k and "weight" in k]
        projector = [k for k in trained if "multi_modal_projector" in k]
        assert tower and projector and all(k in initial for k in tower + projector)
        assert all(torch.equal(trained[k], initial[k]) for k in tower) == tower_fixed
        assert not all(torch.equal(trained[k], initial[k]) for k in projector)


@pytest.mark.parametrize(("flag", "value"), [("--extra-questions", "-1"), ("--extra-questions", "x"), ("--threads", "0"), ("--count-focus", "-1"),
     ("--count-focus", "nan"), ("--count-focus", "x")])
def test_count_arguments_are_checked(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tokensieve.zoo.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([flag, value])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1,2", "1,1,1,1,-1", "0,0,0,0,0", "a,b,c,d,e"])
def test_family_weights_argument_is_checked(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tokensieve.zoo.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--family-weights", text])
    assert "needle,count,order,position,attribute" in capsys.readouterr().err


def test_teacher_recipe_shares_the_vision_tower_and_masks_like_an_uplink(tmp_path: Path) -> None:
    """``--teacher`` trains the larger decoder on the device's vision tower, bit for bit; with
    ``--mask-augment`` the projector sees exactly the UTS-kept tokens of the masked clips."""
    import torch
    from safetensors.torch import load_file

    from tokensieve.zoo import train as train_mod
    from tokensieve.zoo.model import TEACHER_TEXT

    out = tmp_path / "teacher"
    assert train_mod.main(["--teacher", "--steps", "2", "--batch-size", "2", "--warmup", "1", "--threads", "1",
                           "--eval-n", "0", "--checkpoint-every", "0", "--out", str(out)]) == 0
    model, _ = load_model(out)
    assert model.config.text_config.hidden_size == TEACHER_TEXT["hidden_size"]
    assert model.config.text_config.num_hidden_layers == TEACHER_TEXT["num_hidden_layers"]
    device = load_file(str(DEVICE_DIR / "model.safetensors"))
    teacher = load_file(str(out / "model.safetensors"))
    tower = [k for k in device if "vision_tower" in k]
    assert tower and all(torch.equal(device[k], teacher[k]) for k in tower)

    masker = train_mod._UplinkMask(model, 1.0)
    masker.draw(0, 0, 2)
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(2 * 3, 4, 96)  # 2 clips of 3 frames of 4 patches, the tower's 96 channels
    model.model.multi_modal_projector(x)
    hook.remove()
    masker.hook.remove()
    for clip, ratio in zip(range(2), masker.ratios):
        kept = seen[0][clip * 3 : (clip + 1) * 3].reshape(-1, 96)
        orig = x[clip * 3 : (clip + 1) * 3].reshape(-1, 96)
        nonzero = kept.abs().sum(-1) > 0
        n_keep = int(np.floor((1 - ratio) * 12 + 1e-12))
        assert int(nonzero.sum()) == n_keep
        # the kept ones are the lowest mean squares, untouched
        order = orig.square().mean(-1).argsort(stable=True)
        assert set(order[:n_keep].tolist()) == set(nonzero.nonzero().flatten().tolist())
        assert torch.equal(kept[nonzero], orig[nonzero])


def test_domain_weights_draw_only_the_weighted_domains() -> None:
    from tokensieve.zoo.train import step_domains

    assert step_domains(0, 5, 8, [1, 0, 0]) == ["source"] * 8
    drawn = {d for step in range(20) for d in step_domains(0, step, 8, [0, 1, 1])}
    assert drawn == {"dusk", "fog"}
    assert step_domains(0, 5, 8, [1, 1, 1]) == step_domains(0, 5, 8, [1, 1, 1])


@pytest.mark.parametrize("text", ["1,2", "1,1,-1", "0,0,0", "a,b,c", "1,inf,1"])
def test_domain_weights_argument_is_checked(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tokensieve.zoo.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--domains", text])
    assert "--domains" in capsys.readouterr().err
