"""The embedded model on the Qwen2-VL architecture: build, save and load, the processor's token
layout, the per-pair training targets (checked by hand) and a training smoke run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve.zoo import synthvid
from tokensieve.zoo.model import (
    MROPE_SECTION,
    QWEN_VISION,
    build_model,
    build_processor,
    build_tokenizer,
    load_model,
    prompt_for,
    save_model,
)

ARCH = "qwen2-vl"
PAIRS = synthvid.FRAMES // 2
CELLS = synthvid.GRID * synthvid.GRID
N_TOKENS = PAIRS * CELLS  # 128


@pytest.fixture(scope="module")
def qwen() -> tuple[object, object]:
    tokenizer = build_tokenizer(arch=ARCH)
    return build_model(0, tokenizer, arch=ARCH), build_processor(tokenizer, arch=ARCH)


def _grey_clip(level: int = 110) -> np.ndarray:
    return np.full((synthvid.FRAMES, synthvid.SIZE, synthvid.SIZE, 3), level, np.uint8)


def _paint(clip: np.ndarray, frame: int, row: int, col: int) -> np.ndarray:
    """A 12-pixel red square in the middle of cell (row, col) of one frame, as synthvid draws shapes."""
    out = clip.copy()
    y, x = row * synthvid.CELL + 2, col * synthvid.CELL + 2
    out[frame, y : y + 12, x : x + 12] = (225, 35, 35)
    return out


# ---------------------------------------------------------------------------------------------
# Model, processor, save and load
# ---------------------------------------------------------------------------------------------


def test_untrained_model_builds_saves_and_loads(qwen: tuple[object, object], tmp_path: Path) -> None:
    from transformers import Qwen2VLForConditionalGeneration

    from tokensieve.zoo.model import TEXT

    model, processor = qwen
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        TEXT["hidden_size"], TEXT["num_hidden_layers"], TEXT["num_attention_heads"])
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.rope_parameters["mrope_section"] == MROPE_SECTION and sum(MROPE_SECTION) == head_dim // 2
    assert (vision.embed_dim, vision.depth, vision.num_heads, vision.patch_size) == (96, 2, 4, 8)
    assert vision.hidden_size == text.hidden_size == QWEN_VISION["hidden_size"]
    assert model.config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    out = save_model(model, processor, tmp_path / "qwen")
    loaded, loaded_processor = load_model(out)
    assert isinstance(loaded, Qwen2VLForConditionalGeneration)
    assert loaded.config.to_dict()["text_config"]["rope_parameters"]["mrope_section"] == MROPE_SECTION
    saved = {k: v.half().float() for k, v in model.state_dict().items()}
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    example = synthvid.make_example(11)
    a = processor(text=[prompt_for(processor, example.question)], videos=[example.frames], return_tensors="pt")
    b = loaded_processor(text=[prompt_for(loaded_processor, example.question)], videos=[example.frames],
                         return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_gives_128_video_tokens(qwen: tuple[object, object]) -> None:
    _, processor = qwen
    tok = processor.tokenizer
    example = synthvid.make_example(4)
    prompt = prompt_for(processor, example.question)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>" + example.question)
    inputs = processor(text=[prompt], videos=[example.frames], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    video = tok.convert_tokens_to_ids("<|video_pad|>")
    assert ids.count(video) == N_TOKENS == 128
    start = ids.index(video)
    # one run of video tokens between the vision markers, nothing (no newline) in between
    assert ids[start - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids[start + N_TOKENS] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert inputs["video_grid_thw"].tolist() == [[PAIRS, 8, 8]]  # 64x64 stays 64x64: 8x8 patches of 8 pixels
    assert tuple(inputs["pixel_values_videos"].shape) == (PAIRS * 64, 3 * 2 * 8 * 8)
    assert inputs["mm_token_type_ids"][0].tolist() == [2 if t == video else 0 for t in ids]


def test_load_embedded_qwen_is_a_clear_error_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokensieve.errors import InputError
    from tokensieve.zoo import model as zoo_model

    monkeypatch.setitem(zoo_model.EMBEDDED_DIRS, ARCH, tmp_path / "absent")
    with pytest.raises(InputError, match="--arch qwen2-vl"):
        zoo_model.load_embedded(arch=ARCH)
    with pytest.raises(InputError, match="unknown architecture"):
        zoo_model.build_tokenizer(arch="qwen2.5-vl")


# ---------------------------------------------------------------------------------------------
# Token order
# ---------------------------------------------------------------------------------------------


def _local_tower(model: object) -> object:
    """``model`` with its vision blocks made the identity (residual branches zero), so each merged
    token is a function of its own 2x2 patches (over two frames) alone."""
    import copy

    local = copy.deepcopy(model)
    with torch.no_grad():
        for block in local.model.visual.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    return local


@pytest.mark.parametrize(("frame", "row", "col"), [(5, 1, 3), (12, 2, 0), (0, 0, 1), (15, 3, 2)])
def test_merged_tokens_come_in_pair_row_column_order(qwen: tuple[object, object], frame: int, row: int,
                                                     col: int) -> None:
    """A shape in one cell of one frame changes exactly merged token ``(frame // 2)·16 + row·4 + col``
    (the processor's patch layout and the merger group each 16-pixel cell of a frame pair into one
    token, in (pair, row, column) order), that token lands on the matching ``<|video_pad|>`` of
    the prompt, and M-RoPE gives it the positions (pair, row, column) after the start."""
    model, processor = qwen
    local = _local_tower(model)
    blank, clip = _grey_clip(), _paint(_grey_clip(), frame, row, col)
    features = []
    for video in (blank, clip):
        pixels = processor.video_processor(videos=[video], return_tensors="pt")
        with torch.no_grad():
            out = local.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"])
        features.append(torch.cat(out.pooler_output))
    assert features[0].shape == (N_TOKENS, model.config.text_config.hidden_size)
    changed = torch.nonzero((features[1] - features[0]).abs().amax(-1) > 1e-4)[:, 0].tolist()
    token = (frame // 2) * CELLS + row * synthvid.GRID + col
    assert changed == [token]

    # the decoder receives merged token k at the k-th <|video_pad|>
    inputs = processor(text=[prompt_for(processor, "what shape appeared only briefly ?")], videos=[clip],
                       return_tensors="pt")
    seen = {}
    hook = local.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        local(**inputs)
    hook.remove()
    slots = torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id)[:, 0]
    assert torch.allclose(seen["embeds"][0, slots], features[1], atol=1e-6)

    # M-RoPE: (time, height, width) of merged token k are (pair, row, column) offsets from one start
    positions, _ = local.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    start = int(slots[0])
    k = torch.arange(N_TOKENS)
    expected = torch.stack([k // CELLS, (k % CELLS) // synthvid.GRID, k % synthvid.GRID]) + start
    assert torch.equal(positions[:, 0, slots], expected)


# ---------------------------------------------------------------------------------------------
# Per-pair training targets, by hand
# ---------------------------------------------------------------------------------------------


def _object(name: str, colour: str, shape: str, cell: tuple[int, int]) -> synthvid.ObjectFrame:
    return synthvid.ObjectFrame(name, colour, shape, cell, (cell[0] * 16 + 2, cell[1] * 16 + 2, 12, 12))


def _hand_example() -> synthvid.Example:
    """Count question, answer two: the red circle at (1, 2) in frames 3-4 (straddling pairs 1 and 2)
    and at (0, 0) in frames 8-9 (pair 4); a yellow triangle takes (1, 2) in frame 5; a blue square
    sits at (3, 3) in frames 0-6 and at (3, 2), the middle of the bottom edge, from frame 7 on."""
    objects: list[list[synthvid.ObjectFrame]] = [[] for _ in range(synthvid.FRAMES)]
    for t in (3, 4):
        objects[t].append(_object("target", "red", "circle", (1, 2)))
    for t in (8, 9):
        objects[t].append(_object("target", "red", "circle", (0, 0)))
    objects[5].append(_object("d1", "yellow", "triangle", (1, 2)))
    for t in range(synthvid.FRAMES):
        objects[t].append(_object("d0", "blue", "square", (3, 3) if t <= 6 else (3, 2)))
    return synthvid.Example(
        seed=0, family="count", question="how many times did the red circle appear ?", answer="two",
        frames=_grey_clip(), objects=objects, cuts=[], focus=[[o.cell for o in row if o.name == "target"]
                                                            for row in objects],
    )


def _token(pair: int, row: int, col: int) -> int:
    return pair * 16 + row * 4 + col


#: The hand-built example's pair-level words, per token (every other token holds none).
HAND_WORDS = {
    _token(1, 1, 2): [None, None, None, "red", "circle", None],  # frame 3 only
    _token(2, 1, 2): ["red", "circle", None, "yellow", "triangle", None],  # frame 4, then frame 5
    _token(4, 0, 0): ["red", "circle", None, None, None, None],  # both frames: named once
    **{_token(p, 3, 3): ["blue", "square", None, None, None, None] for p in range(3)},  # frames 0-5
    _token(3, 3, 3): ["blue", "square", None, None, None, None],  # frame 6 only
    _token(3, 3, 2): [None, None, None, "blue", "square", "bottom"],  # frame 7 only
    **{_token(p, 3, 2): ["blue", "square", "bottom", None, None, None] for p in range(4, 8)},
}
#: Guidance weights of the count question: frames of the pair holding the red circle.
HAND_ATTEND = {_token(1, 1, 2): 1, _token(2, 1, 2): 1, _token(4, 0, 0): 2}


def _class(colour: str, shape: str) -> int:
    return 1 + list(synthvid.COLOURS).index(colour) * len(synthvid.SHAPES) + synthvid.SHAPES.index(shape)


#: Per token, the classes of its cell in the pair's first and second frame.
HAND_CLASSES = {
    _token(1, 1, 2): (0, _class("red", "circle")),
    _token(2, 1, 2): (_class("red", "circle"), _class("yellow", "triangle")),
    _token(4, 0, 0): (_class("red", "circle"),) * 2,
    **{_token(p, 3, 3): (_class("blue", "square"),) * 2 for p in range(3)},
    _token(3, 3, 3): (_class("blue", "square"), 0),
    _token(3, 3, 2): (0, _class("blue", "square")),
    **{_token(p, 3, 2): (_class("blue", "square"),) * 2 for p in range(4, 8)},
}


def test_pair_targets_by_hand() -> None:
    from tokensieve.zoo.train import (
        COUNT_SINK,
        attention_targets,
        pair_attention,
        pair_token_words,
    )

    example = _hand_example()
    words = pair_token_words(example)
    assert len(words) == N_TOKENS
    assert {i: w for i, w in enumerate(words) if any(x is not None for x in w)} == HAND_WORDS
    attend = pair_attention(attention_targets(example))
    assert attend.shape == (N_TOKENS,)
    assert {int(i): int(attend[i]) for i in np.nonzero(attend)[0]} == HAND_ATTEND
    assert attend.sum() == 2 * 2  # twice the count, as on LLaVA-OneVision, against the sink
    assert COUNT_SINK > 0


def test_qwen_batch_probe_and_word_targets_by_hand(qwen: tuple[object, object]) -> None:
    import torch.nn.functional as F

    from tokensieve.zoo.train import _N_CLASSES, _Probe, _word_loss, make_batch

    model, processor = qwen
    example = _hand_example()
    batch = make_batch(processor, [example])
    assert "position_ids" not in batch  # Qwen2-VL computes its own 3-D positions
    assert batch["attend"].shape == (1, 1, N_TOKENS) and batch["attend"].dtype == torch.long
    assert {int(i): int(batch["attend"][0, 0, i]) for i in torch.nonzero(batch["attend"][0, 0])[:, 0]} == HAND_ATTEND
    vocab = processor.tokenizer.get_vocab()
    cell_words = batch["cell_words"][0]
    assert cell_words.shape == (N_TOKENS, 6)
    for i in range(N_TOKENS):
        expected = [vocab[w] if w is not None else -100 for w in HAND_WORDS.get(i, [None] * 6)]
        assert cell_words[i].tolist() == expected, i

    # the probe: token k's logits [first frame's class, second frame's class, row, column]
    probe = _Probe(model, model.config.text_config.hidden_size, 0, ARCH)
    probe.hook.remove()
    width = model.config.text_config.hidden_size
    probe.features = torch.randn(N_TOKENS, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = probe.loss(batch["cells"])
        logits = probe.head(probe.features)
        ce_class, ce_row, ce_col = [], [], []
        for k in range(N_TOKENS):
            first, second = HAND_CLASSES.get(k, (0, 0))
            ce_class.append(F.cross_entropy(logits[k, :_N_CLASSES], torch.tensor(first)))
            ce_class.append(F.cross_entropy(logits[k, _N_CLASSES : 2 * _N_CLASSES], torch.tensor(second)))
            ce_row.append(F.cross_entropy(logits[k, 2 * _N_CLASSES : 2 * _N_CLASSES + 4], torch.tensor((k % 16) // 4)))
            ce_col.append(F.cross_entropy(logits[k, 2 * _N_CLASSES + 4 :], torch.tensor(k % 4)))
        want = torch.stack(ce_class).mean() + 0.25 * torch.stack(ce_row).mean() + 0.25 * torch.stack(ce_col).mean()
    assert torch.allclose(got, want, atol=1e-5)

    # the word loss reads the 128 visual positions, with no newline after them
    video_id = model.config.video_token_id
    slots = torch.nonzero(batch["input_ids"][0] == video_id)[:, 0]
    logits = torch.zeros(1, batch["input_ids"].shape[1], len(vocab))
    for k, token_words in HAND_WORDS.items():
        for w in token_words:
            if w is not None:
                logits[0, slots[k], vocab[w]] = 30.0
    right = float(_word_loss(logits, batch["input_ids"], batch["cell_words"], video_id))
    shifted = float(_word_loss(logits.roll(1, dims=1), batch["input_ids"], batch["cell_words"], video_id))
    assert right < 1.2 < shifted  # a token holding two shapes splits its mass between their words


def test_qwen_count_guidance_is_lowest_at_its_weighted_spread(qwen: tuple[object, object]) -> None:
    """Minimised by attention 1 : 1 : 2 on the three target tokens (frames holding the target) and
    COUNT_SINK on the first token, so the share read from the targets is 2·count : sink as on
    LLaVA-OneVision."""
    from tokensieve.zoo.train import (
        COUNT_HEAD,
        COUNT_SINK,
        GUIDED_LAYERS,
        _attention_loss,
        make_batch,
    )

    model, processor = qwen
    batch = make_batch(processor, [_hand_example()])
    video_id = model.config.video_token_id
    length = batch["input_ids"].shape[1]
    slots = torch.nonzero(batch["input_ids"][0] == video_id)[:, 0]
    a, b, c = (int(slots[k]) for k in sorted(HAND_ATTEND))  # weights 1, 1, 2
    pos = int(batch["answer_pos"][0, 0])

    def loss_for(shares: tuple[float, float, float], sink: float) -> float:
        row = torch.full((length,), 1e-9)
        row[a], row[b], row[c] = shares
        row[0] = sink
        probs = torch.zeros(1, 4, length, length)
        probs[0, COUNT_HEAD, pos] = row / row.sum()
        return float(_attention_loss([probs] * (max(GUIDED_LAYERS) + 1), batch, video_id))

    best = loss_for((1, 1, 2), COUNT_SINK)
    assert best < min(loss_for((4 / 3, 4 / 3, 4 / 3), COUNT_SINK), loss_for((1, 1, 2), 2 * COUNT_SINK),
                      loss_for((1, 1, 2), COUNT_SINK / 2), loss_for((1.5, 1.5, 1), COUNT_SINK))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_smoke_run_ends_with_a_loadable_model(tmp_path: Path) -> None:
    """Both stages run on Qwen2-VL and write a model that loads and answers (batched, left padded)
    through ``evaluate``; after the vision-only steps the tower's patch embedding and blocks stay
    fixed and the merger learns."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from tokensieve.zoo import train as train_mod
    from tokensieve.zoo.evaluate import answer

    def args(vision_steps: int, name: str) -> list[str]:
        return ["--arch", ARCH, "--vision-steps", str(vision_steps), "--steps", "2", "--batch-size", "2",
                "--warmup", "1", "--threads", "1", "--eval-n", "0", "--checkpoint-every", "1",
                "--out", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / f"ck-{name}")]

    out = tmp_path / "out"
    assert train_mod.main(args(1, "out")) == 0
    assert [p.name for p in (tmp_path / "ck-out").iterdir()] == ["step-3.pt"]
    model, processor = load_model(out)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(3, seed=2)]
    answers = answer(model, processor, examples, batch_size=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)

    # vision stage skipped: the tower ships as initialised, the merger (projector) learns
    fixed = tmp_path / "fixed"
    assert train_mod.main(args(0, "fixed")) == 0
    initial = {k.removeprefix("model."): v.half() for k, v in build_model(0, build_tokenizer(arch=ARCH),
                                                                          arch=ARCH).state_dict().items()}
    trained = load_file(str(fixed / "model.safetensors"))
    tower = [k for k in trained if k.startswith("visual.") and "merger" not in k]
    merger = [k for k in trained if k.startswith("visual.merger")]
    assert tower and merger and all(k in initial for k in tower + merger)
    assert all(torch.equal(trained[k], initial[k]) for k in tower)
    assert not all(torch.equal(trained[k], initial[k]) for k in merger)


@pytest.mark.parametrize("flags", [["--teacher"], ["--vision-from", "x"], ["--mask-augment", "0.5"]])
def test_llava_only_options_are_refused(flags: list[str]) -> None:
    from tokensieve.zoo import train as train_mod

    with pytest.raises(SystemExit, match="LLaVA-OneVision only"):
        train_mod.main(["--arch", ARCH, *flags])


# -- the shipped, trained Qwen2-VL model ---------------------------------------------------------


def test_the_shipped_qwen_model_loads_with_from_pretrained_and_fits_the_size_limit() -> None:
    from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

    from tokensieve.zoo.model import EMBEDDED_QWEN_DIR

    names = {p.name for p in EMBEDDED_QWEN_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in EMBEDDED_QWEN_DIR.iterdir() if p.is_file()) <= 15 * 1024 * 1024
    model = AutoModelForImageTextToText.from_pretrained(str(EMBEDDED_QWEN_DIR), dtype=torch.float32)
    assert isinstance(model, Qwen2VLForConditionalGeneration)


def test_the_shipped_qwen_model_answers_held_out_questions_from_the_video() -> None:
    """Measured 97.2% on 1,000 held-out questions (every family >= 89.5%), blank clips 19.9%
    (chance 29.4%); a small sample here, with room for its sampling noise."""
    from tokensieve.zoo.evaluate import answer, score
    from tokensieve.zoo.model import load_embedded

    model, processor = load_embedded(arch=ARCH)
    examples = [synthvid.make_example(s) for s in synthvid.heldout_seeds(40, seed=3)]
    real = score(examples, answer(model, processor, examples, batch_size=20))
    blank = score(examples, answer(model, processor, examples, batch_size=20, blank=True))
    assert real.accuracy >= 0.85
    assert blank.accuracy <= real.chance + 0.15
