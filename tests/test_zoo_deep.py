"""The 16-layer quality instruments: growing a trained 4-layer model by interleaving identity
layers (the grown model computes exactly what its donor computes), the guided layers moving with
their donor layers, the projector alignment loss (checked by hand), and the ``--deep`` recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve.zoo import synthvid
from tokensieve.zoo import train as train_mod
from tokensieve.zoo.model import (
    DEEP_TEXT,
    DEVICE_DIR,
    build_model,
    build_processor,
    build_tokenizer,
    load_model,
    prompt_for,
    save_model,
)


@pytest.mark.parametrize(
    "donor, layers, how, expected",
    [(4, 16, "interleave", [0, 4, 8, 12]), (4, 16, "append", [0, 1, 2, 3]), (4, 8, "interleave", [0, 2, 4, 6]),
     (3, 8, "interleave", [0, 2, 5]), (4, 4, "interleave", [0, 1, 2, 3])],
)
def test_grown_layers(donor: int, layers: int, how: str, expected: list[int]) -> None:
    assert train_mod.grown_layers(donor, layers, how) == expected


def test_grown_layers_refuse_a_deeper_donor() -> None:
    with pytest.raises(SystemExit, match="more than"):
        train_mod.grown_layers(8, 4, "interleave")


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl"])
def test_interleaved_growth_computes_what_the_donor_computes(arch: str, tmp_path: Path) -> None:
    """Donor layer i lands at 4i with its weights; every other layer is the identity, so the
    16-layer model's logits equal the 4-layer donor's (an independent reference: the donor run
    unchanged)."""
    tokenizer = build_tokenizer(arch=arch)
    processor = build_processor(tokenizer, arch=arch)
    donor = build_model(3, tokenizer, "device", arch=arch)
    with torch.no_grad():  # make the donor's layers non-trivial and distinct
        for p in donor.model.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_model(donor, processor, tmp_path / "donor", half=False)
    donor, _ = load_model(tmp_path / "donor", attn_implementation="eager")
    grown = build_model(5, tokenizer, "deep", arch=arch)
    place = train_mod._grow(grown, str(tmp_path / "donor"), "interleave")
    assert place == [0, 4, 8, 12] and grown.config.text_config.num_hidden_layers == DEEP_TEXT["num_hidden_layers"]
    a = dict(donor.model.language_model.layers[2].named_parameters())
    b = dict(grown.model.language_model.layers[8].named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(grown.model.language_model.layers[5].self_attn.o_proj.weight.abs().sum()) == 0.0
    assert float(grown.model.language_model.layers[5].mlp.down_proj.weight.abs().sum()) == 0.0
    grown.set_attn_implementation("eager")
    grown.eval()
    ex = synthvid.make_example(synthvid.heldout_seeds(1, 0)[0])
    inputs = processor(text=[prompt_for(processor, ex.question)], videos=[ex.frames], return_tensors="pt")
    with torch.no_grad():
        want = donor(**inputs).logits
        got = grown(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guided_layers_move_with_their_donor_layers() -> None:
    """The attention guidance reads the layers ``place`` maps the guided ones to: with attention
    only at layers 4, 8, 12 (and the question head at 0) the loss equals the unmoved loss on a
    4-layer stack holding those same maps."""
    b, q, n, length = 1, 1, 4, 10
    torch.manual_seed(0)
    four = [torch.softmax(torch.randn(b, 2, length, length), -1) for _ in range(4)]
    sixteen = [torch.softmax(torch.randn(b, 2, length, length), -1) for _ in range(16)]
    for i, layer in enumerate([0, 4, 8, 12]):
        sixteen[layer] = four[i]
    input_ids = torch.tensor([[1, 2, 9, 9, 9, 9, 3, 4, 5, 6]])
    batch = {
        "attend": torch.tensor([[[True, False, True, False]]]),
        "sink": torch.zeros(b, q),
        "answer_pos": torch.tensor([[8]]),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "question_words": torch.tensor([[[0, 0, 0, 0, 0, 0, 1, 1, 0, 0]]], dtype=torch.bool),
    }
    want = train_mod._attention_loss(four, batch, 9)
    got = train_mod._attention_loss(sixteen, batch, 9, place=[0, 4, 8, 12])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(train_mod._attention_loss(sixteen, batch, 9), want)


def test_align_loss_by_hand() -> None:
    """``1 - cos`` between each shape-holding visual token and the mean of its colour and shape
    word embeddings; the place word, empty tokens and LLaVA's trailing newline do not count."""
    d, video = 3, 7
    table = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [0, 2.0, 2.0]] + [[0.0, 0, 0]] * 3)
    input_ids = torch.tensor([[5, 7, 7, 7, 6]])  # three visual tokens: two contents, one newline
    embeds = torch.zeros(1, 5, d)
    embeds[0, 1] = torch.tensor([1.0, 1.0, 1.0])
    embeds[0, 2] = torch.tensor([5.0, -1.0, 0.0])
    embeds[0, 3] = torch.tensor([9.0, 9.0, 9.0])  # the newline: ignored
    cell_words = torch.tensor([[[0, 1, 4], [2, -100, -100]]])  # token 0: words 0, 1 (+ place 4); token 1: word 2
    got = train_mod._align_loss(embeds, input_ids, cell_words, video, table)
    t0 = torch.tensor([0.5, 0.5, 0.0])
    cos0 = float(torch.dot(embeds[0, 1], t0) / (embeds[0, 1].norm() * t0.norm()))
    cos1 = float(torch.dot(embeds[0, 2], table[2]) / embeds[0, 2].norm())
    assert float(got) == pytest.approx(1 - (cos0 + cos1) / 2, abs=1e-6)
    # Qwen2-VL: two frames per token, the second frame's colour and shape in slots 3 and 4
    pairs = torch.tensor([[[-100, -100, -100, 3, -100, -100], [-100] * 6]])
    got2 = train_mod._align_loss(embeds, input_ids, pairs, video, table, frames_per_token=2)
    cos = float(torch.dot(embeds[0, 1], table[3]) / (embeds[0, 1].norm() * table[3].norm()))
    assert float(got2) == pytest.approx(1 - cos, abs=1e-6)
    # nothing to align: zero, and no NaN
    assert float(train_mod._align_loss(embeds, input_ids, torch.full((1, 2, 3), -100), video, table)) == 0.0


def test_align_loss_moves_only_the_projector_towards_the_words() -> None:
    """The word embeddings are the fixed target (no gradient reaches them)."""
    table = torch.nn.Parameter(torch.randn(8, 4))
    embeds = torch.randn(1, 4, 4, requires_grad=True)
    loss = train_mod._align_loss(embeds, torch.tensor([[7, 7, 7, 1]]), torch.tensor([[[1, 2, -100], [3, -100, -100],
                                                                                       [-100] * 3]]), 7, table)
    loss.backward()
    assert table.grad is None and embeds.grad is not None and float(embeds.grad.abs().sum()) > 0


def test_deep_recipe_smoke_run(tmp_path: Path) -> None:
    """``--deep`` grows the shipped device model to 16 layers (its layers at 0, 4, 8, 12, the
    vision tower unchanged) and trains with the alignment loss."""
    from safetensors.torch import load_file

    out = tmp_path / "deep"
    assert train_mod.main(["--deep", "--steps", "1", "--batch-size", "2", "--warmup", "1", "--threads", "1",
                           "--eval-n", "0", "--checkpoint-every", "0", "--out", str(out)]) == 0
    model, _ = load_model(out)
    assert model.config.text_config.num_hidden_layers == 16
    device = load_file(str(DEVICE_DIR / "model.safetensors"))
    deep = load_file(str(out / "model.safetensors"))
    tower = [k for k in device if "vision_tower" in k]
    assert tower and all(torch.equal(device[k], deep[k]) for k in tower)


@pytest.mark.parametrize("argv, message", [
    (["--size", "deep", "--vision-steps", "0"], "--grow-from"),
    (["--grow", "interleave"], "--grow-from"),
])
def test_deep_options_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        train_mod.main(argv)


def test_qwen_deep_needs_a_donor() -> None:
    with pytest.raises(SystemExit, match="--grow-from"):
        train_mod.main(["--deep", "--arch", "qwen2-vl"])


@pytest.mark.parametrize("arch", ["llava-onevision", "qwen2-vl"])
def test_the_shipped_instruments_are_16_layers_deep(arch: str) -> None:
    import json

    from tokensieve.zoo.model import EMBEDDED_DIRS

    config = json.loads((EMBEDDED_DIRS[arch] / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 16
    assert np.isclose(config["text_config"]["hidden_size"], DEEP_TEXT["hidden_size"])
