"""InternVL (transformers-native InternVL3 / 3.5): tiles and frames read from the context-token
runs, every method checked against the unpatched model's own pieces recomputed by hand.

The reference takes the tile features from the unpatched ``get_image_features``, scatters them
over the context tokens as the model's forward does, then runs the unpatched decoder layers one
sample at a time, without padding, on the kept tokens with their original 1-D positions (in-LLM
methods: pruning at the recorded prune points, layer by layer).
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from _builders import left_pad

import tokensieve

PAD, EOS, BOS = 0, 1, 2
CTX, BOI, EOI = 11, 12, 13
S = 4  # tokens per tile: 16-px tiles, 4-px patches (4×4), pixel shuffle 0.5 → 2×2


def build(text_type: str = "qwen2", attn: str = "sdpa", seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(model_type=text_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if text_type == "qwen3":
        text["head_dim"] = 8
    vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  image_size=[16, 16], patch_size=[4, 4])
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=CTX, image_seq_length=S)
    cfg._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.do_sample = False
    return model


def make_batch(samples: list[list[tuple[str, int]]], seed: int = 1) -> dict:
    """``samples[b]``: items ``("image", n_tiles)`` or ``("video", n_frames)``, written as the
    processor writes them (frames: ``Frame k:`` text, then ``<img>`` context ``</img>``)."""
    g = torch.Generator().manual_seed(seed)
    rows, n_tiles = [], 0
    for b, items in enumerate(samples):
        ids = [BOS] + torch.randint(20, 60, (2 + b,), generator=g).tolist()
        for kind, n in items:
            if kind == "image":
                ids += [BOI] + [CTX] * (S * n) + [EOI]
            else:
                for k in range(n):
                    ids += [40, 41 + k, 42] + [BOI] + [CTX] * S + [EOI]  # "Frame{k}:"
            n_tiles += n
            ids += torch.randint(20, 60, (16,), generator=g).tolist()  # a caption between items
        ids += torch.randint(20, 60, (3 + 2 * b,), generator=g).tolist()
        rows.append(ids)
    input_ids, mask = left_pad(rows, PAD)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=torch.randn(n_tiles, 3, 16, 16, generator=g))


SAMPLES = [[("image", 3), ("video", 4)], [("video", 3)], [("image", 1), ("video", 2)]]


def sample_of(kw: dict, b: int) -> dict:
    tiles = [int((kw["input_ids"][i] == CTX).sum()) // S for i in range(kw["input_ids"].shape[0])]
    start = sum(tiles[:b])
    valid = kw["attention_mask"][b].bool()
    return dict(input_ids=kw["input_ids"][b, valid][None], attention_mask=kw["attention_mask"][b, valid][None],
                pixel_values=kw["pixel_values"][start:start + tiles[b]])


@torch.no_grad()
def full_embeds(model, kw: dict) -> torch.Tensor:
    inner = model.model
    out = inner.get_image_features(pixel_values=kw["pixel_values"], vision_feature_layer=-1,
                                   vision_feature_select_strategy="default")
    embeds = inner.get_input_embeddings()(kw["input_ids"]).clone()
    embeds[kw["input_ids"] == CTX] = out.pooler_output.reshape(-1, embeds.shape[-1])
    return embeds


@torch.no_grad()
def reference_logits(model, kw: dict, b: int, keep: torch.Tensor, record=None, generated: list[int] = (),
                     positions: str = "preserve") -> torch.Tensor:
    """Sample ``b`` alone through the unpatched decoder layers; ``record`` (in-LLM) gives the
    visual tokens kept at each prune point (LM-input indices). Returns all positions' logits."""
    lm = model.model.language_model
    L = kw["input_ids"].shape[1]
    valid = kw["attention_mask"][b].bool()
    offset = L - int(valid.sum())
    pos_full = torch.arange(int(valid.sum()))  # 1-D ids of the unpruned, unpadded sample
    local = keep - offset
    x = torch.cat([full_embeds(model, kw)[b, valid][local], lm.embed_tokens(torch.tensor(list(generated), dtype=torch.long))])
    n_prompt = local.numel()
    if positions == "preserve":
        pos = torch.cat([pos_full[local], pos_full[-1] + 1 + torch.arange(len(generated))])
    else:
        pos = torch.arange(n_prompt + len(generated))
    vis = torch.cat([kw["input_ids"][b, valid][local] == CTX, torch.zeros(len(generated), dtype=torch.bool)])
    origin = torch.cat([keep, torch.full((len(generated),), -1)])
    h = x[None]
    points = [p[0] for p in record.points] if record is not None else []
    for idx, layer in enumerate(lm.layers):
        n = h.shape[1]
        causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        h = layer(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, pos[None]), position_ids=pos[None])
        for k in [k for k, pl in enumerate(points) if pl == idx]:
            stay = ~vis | torch.isin(origin, record.kept[b][k])
            h, pos, vis, origin = h[:, stay], pos[stay], vis[stay], origin[stay]
            if positions == "compact":
                pos = torch.arange(h.shape[1])
    return model.lm_head(lm.norm(h))[0]


def test_tiles_frames_and_thumbnails_are_read_from_the_runs() -> None:
    model = build()
    kw = make_batch(SAMPLES)
    with tokensieve.compress(model, "uniform", retain=0.5):
        with torch.no_grad():
            model(**kw)
        st = tokensieve.stats(model)
    layout = [[(s.modality, s.grid) for s in row] for row in st.segments]
    assert layout == [[("image", (1, 1, 3 * S)), ("video", (4, 2, 2))], [("video", (3, 2, 2))],
                      [("image", (1, 2, 2)), ("video", (2, 2, 2))]]
    for row in st.segments:
        for seg in row:
            assert seg.tokens_after == round(0.5 * seg.tokens_before)


@pytest.mark.parametrize(("method", "positions"), [("vidcom2", None), ("random", None), ("lftr", None),
                                                   ("vidcom2", "compact"), ("dycoke", None)])
@pytest.mark.parametrize("text_type", ["qwen2", "qwen3"])
def test_pre_llm_generate_equals_the_unpatched_decoder_by_hand(method: str, positions, text_type: str) -> None:
    model = build(text_type)
    kw = make_batch(SAMPLES)
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, method, retain=0.5, positions=positions) as handle:
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
        st = tokensieve.stats(model)
        keeps, replaced, mode = [k.clone() for k in st.keep], st.replaced, handle.positions
        for b in range(len(SAMPLES)):
            one = sample_of(kw, b)
            with torch.no_grad():
                single = model.generate(**one, max_new_tokens=3)
            assert torch.equal(single[0, one["input_ids"].shape[1]:], out.sequences[b, L:]), b
    for b in range(len(SAMPLES)):
        if replaced[b]:  # merging methods write features over kept tokens: not this reference's business
            continue
        new = out.sequences[b, L:].tolist()
        for t in range(3):
            want = reference_logits(model, kw, b, keeps[b], generated=new[:t], positions=mode)[-1]
            torch.testing.assert_close(out.logits[t][b], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("method", "options", "retain"), [
    ("fastv", {"layer": 1}, 0.6),
    ("pdrop", {"layers": (1, 2)}, 0.5),
    ("sparsevlm", {"pruning_layers": (1, 2), "recycle": False}, 0.6),
])
@pytest.mark.parametrize("text_type", ["qwen2", "qwen3"])
def test_in_llm_generate_equals_the_unpatched_layers_by_hand(method: str, options: dict, retain: float,
                                                             text_type: str) -> None:
    model = build(text_type)
    kw = make_batch(SAMPLES)
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, method, retain=retain, **options):
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
        st = tokensieve.stats(model)
        record, keeps = st.inllm, [k.clone() for k in st.keep]
    assert any(len(k[0]) < v[0] for k, v in zip(record.kept, record.v_in))
    for b in range(len(SAMPLES)):
        new = out.sequences[b, L:].tolist()
        for t in range(3):
            want = reference_logits(model, kw, b, keeps[b], record=record, generated=new[:t])[-1]
            torch.testing.assert_close(out.logits[t][b], want, rtol=1e-4, atol=1e-4)


def test_a_one_tile_image_right_before_a_video_reads_as_its_first_frame() -> None:
    """The documented limit of reading the layout from token runs (the model input has no
    image/video type): with only a line break between them, a one-tile image and the frames
    after it cannot be told apart, and form one video segment. Budgets stay exact per segment."""
    model = build()
    ids = [BOS, 30] + [BOI] + [CTX] * S + [EOI, 31] + [40, 41, 42, BOI] + [CTX] * S + [EOI] + \
          [40, 43, 42, BOI] + [CTX] * S + [EOI, 50, 51]
    kw = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
              pixel_values=torch.randn(3, 3, 16, 16))
    with tokensieve.compress(model, "uniform", retain=0.5):
        with torch.no_grad():
            model(**kw)
        seg, = tokensieve.stats(model).segments[0]
    assert (seg.modality, seg.grid, seg.tokens_after) == ("video", (3, 2, 2), 6)
