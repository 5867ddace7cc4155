"""Qwen3-VL: pre-LLM compression with DeepStack, checked against the unpatched language model.

The reference recomputes by hand, from the unpatched model's own pieces (vision features and
DeepStack levels from ``get_image_features``/``get_video_features``, 3-D ids from
``get_rope_index`` on the full sequence), one sample at a time and without padding: the kept
tokens' embeddings, their original ids, the visual-position mask and the kept tokens' DeepStack
rows, fed straight to ``model.model.language_model`` (which adds the levels after its first
layers) and ``lm_head``. The compressed model goes through the library's batched, padded path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from _builders import left_pad

import tokensieve
from tokensieve.errors import InputError

PAD, BOS = 0, 2
IMAGE, VIDEO, V_START, V_END = 11, 12, 13, 14


def build(seed: int = 0, attn: str = "sdpa", moe: bool = False) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, pad_token_id=PAD, eos_token_id=1, bos_token_id=BOS,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]})
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2])
    config_cls, model_cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else \
        (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                     vision_start_token_id=V_START, vision_end_token_id=V_END)
    cfg._attn_implementation = attn
    model = model_cls(cfg).eval()
    with torch.no_grad():  # DeepStack mergers large enough that dropping them shows
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.do_sample = False
    return model


def build35(seed: int = 0, attn: str = "sdpa", layers: int = 4) -> Qwen3_5ForConditionalGeneration:
    """Tiny Qwen3.5: three Gated-DeltaNet layers, then a full-attention one (repeated); no DeepStack."""
    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, pad_token_id=PAD, eos_token_id=1, bos_token_id=BOS,
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.25})
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=V_START, vision_end_token_id=V_END)
    cfg._attn_implementation = attn
    model = Qwen3_5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a real pad embedding (the padding_idx row starts at zero): left padding must be masked
        model.model.language_model.embed_tokens.weight[PAD].normal_()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.do_sample = False
    return model


def make_batch(samples: list[list[tuple[str, tuple[int, int, int]]]], seed: int = 1) -> dict:
    """``samples[b]``: items ``("image", (1, h, w))`` or ``("video", (t, h, w))`` in patches; each
    video frame is written as Qwen3-VL writes it: timestamp text, start, pads, end."""
    g = torch.Generator().manual_seed(seed)
    dim = 3 * 2 * 4 * 4
    images = [grid for s in samples for kind, grid in s if kind == "image"]
    videos = [grid for s in samples for kind, grid in s if kind == "video"]
    kw: dict = {}
    if images:
        kw["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), dim, generator=g)
        kw["image_grid_thw"] = torch.tensor(images)
    if videos:
        pv = torch.randn(sum(t * h * w for t, h, w in videos), dim, generator=g)
        kw["pixel_values_videos"] = pv
        kw["video_grid_thw"] = torch.tensor(videos)
    rows = []
    for b, items in enumerate(samples):
        ids = [BOS] + torch.randint(20, 60, (2 + b,), generator=g).tolist()
        for kind, (t, h, w) in items:
            if kind == "image":
                ids += [V_START] + [IMAGE] * (h * w // 4) + [V_END]
            else:
                for _ in range(t):
                    ids += torch.randint(20, 60, (2,), generator=g).tolist()  # "<0.5 seconds>"
                    ids += [V_START] + [VIDEO] * (h * w // 4) + [V_END]
            ids += torch.randint(20, 60, (2,), generator=g).tolist()
        ids += torch.randint(20, 60, (3 + 2 * b,), generator=g).tolist()
        rows.append(ids)
    input_ids, mask = left_pad(rows, PAD)
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == IMAGE] = 1
    mm[input_ids == VIDEO] = 2
    kw.update(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm)
    return kw


def full_inputs(model, kw: dict):
    """Embeddings with the visual features in, DeepStack levels (rows in visual row-major order),
    the visual mask and the 3-D ids of the whole batch, from the unpatched model's own functions."""
    inner = model.model
    ids = kw["input_ids"]
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids).clone()
        visual = (ids == IMAGE) | (ids == VIDEO)
        levels = None
        for key, tok, px, grid in (("image", IMAGE, "pixel_values", "image_grid_thw"),
                                   ("video", VIDEO, "pixel_values_videos", "video_grid_thw")):
            if px not in kw:
                continue
            out = inner.get_image_features(kw[px], kw[grid], return_dict=True)
            embeds[ids == tok] = torch.cat(out.pooler_output)
            if getattr(out, "deepstack_features", None) is None:  # Qwen3.5
                continue
            if levels is None:
                levels = [embeds.new_zeros(int(visual.sum()), embeds.shape[-1]) for _ in out.deepstack_features]
            for j, level in enumerate(out.deepstack_features):
                levels[j][(ids == tok)[visual]] = torch.cat(level)
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                      image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
                                      attention_mask=kw["attention_mask"])
    return embeds, levels, visual, pos


def reference_logits(model, kw: dict, b: int, keep: torch.Tensor, deepstack: bool = True,
                     generated: list[int] = (), replaced: list = ()) -> torch.Tensor:
    """Sample ``b`` alone: the unpatched language model on its kept tokens (original ids), then
    ``generated`` tokens at the ids the unpruned model decodes at (max id + 1, + 2, ...).
    ``replaced``: ``(positions, features)`` a merging method wrote over kept tokens."""
    embeds, levels, visual, pos = full_inputs(model, kw)
    for where, feats in replaced:
        embeds[b, where] = feats
    rank = torch.full(visual.shape, -1, dtype=torch.long)
    rank[visual] = torch.arange(int(visual.sum()))
    valid = kw["attention_mask"][b].bool()
    nxt = int(pos[:, b, valid].max()) + 1
    new = torch.arange(nxt, nxt + len(generated))[None].expand(3, -1)
    rows = torch.cat([pos[:, b, keep], new], dim=1)[:, None]
    n = rows.shape[-1]
    ids4 = torch.cat([torch.arange(n)[None, None], rows], dim=0)
    x = torch.cat([embeds[b, keep], model.model.get_input_embeddings()(torch.tensor(list(generated), dtype=torch.long))])
    vmask = torch.cat([visual[b, keep], torch.zeros(len(generated), dtype=torch.bool)])[None]
    extra = {}
    if levels is not None:  # Qwen3-VL (Qwen3.5 has no DeepStack)
        ds = [lvl[rank[b, keep][visual[b, keep]]] for lvl in levels] if deepstack else None
        extra = {"visual_pos_masks": vmask if deepstack else None, "deepstack_visual_embeds": ds}
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=x[None], position_ids=ids4,
                                         attention_mask=torch.ones(1, n, dtype=torch.long), **extra)
        return model.lm_head(out.last_hidden_state)[0]


SAMPLES = [
    [("video", (4, 8, 8))],
    [("image", (1, 8, 4)), ("video", (2, 8, 8))],
]


@pytest.mark.parametrize(("method", "moe", "attn"), [("vidcom2", False, "sdpa"), ("random", False, "eager"),
                                                     ("dycoke", False, "sdpa"), ("vidcom2", True, "sdpa"),
                                                     ("lftr", False, "sdpa")])
def test_compressed_prefill_equals_the_unpatched_language_model_on_the_kept_tokens(method: str, moe: bool,
                                                                                  attn: str) -> None:
    model = build(moe=moe, attn=attn)
    kw = make_batch(SAMPLES)
    with tokensieve.compress(model, method, retain=0.5):
        with torch.no_grad():
            logits = model(**kw).logits
        st = tokensieve.stats(model)
    assert st.positions == "preserve"
    for b in range(len(SAMPLES)):
        keep = st.keep[b]
        n = keep.numel()
        assert n < int(kw["attention_mask"][b].sum())
        ref = reference_logits(model, kw, b, keep, replaced=st.replaced[b])
        got = logits[b, logits.shape[1] - n:]  # left padded
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        # DeepStack is really applied: without it the logits are not these
        assert not torch.allclose(got, reference_logits(model, kw, b, keep, deepstack=False, replaced=st.replaced[b]),
                                  atol=1e-3)


def test_timestamps_and_frame_wrappers_stay_and_counts_are_exact() -> None:
    model = build()
    kw = make_batch(SAMPLES)
    ids = kw["input_ids"]
    with tokensieve.compress(model, "vidcom2", retain=0.25):
        with torch.no_grad():
            model(**kw)
        st = tokensieve.stats(model)
    for b in range(len(SAMPLES)):
        valid = kw["attention_mask"][b].bool()
        text = valid & (ids[b] != IMAGE) & (ids[b] != VIDEO)
        assert bool(torch.isin(text.nonzero(as_tuple=True)[0], st.keep[b]).all())  # every text token kept
        for seg in st.segments[b]:
            assert seg.tokens_after == round(0.25 * seg.tokens_before)
    video = st.segments[0][0]
    assert video.modality == "video" and video.grid == (4, 4, 4) and len(video.frame_counts) == 4


def sample_of(kw: dict, samples: list, b: int) -> dict:
    """Sample ``b`` of a batch from :func:`make_batch` as a batch of one, without padding."""
    out: dict = {}
    for kind, px, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        owners = [i for i, s in enumerate(samples) for k, _ in s if k == kind]
        if px not in kw or b not in owners:
            continue
        sizes = kw[grid].prod(-1).tolist()
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        mine = [i for i, o in enumerate(owners) if o == b]
        out[px] = torch.cat([kw[px][starts[i]:starts[i] + sizes[i]] for i in mine])
        out[grid] = kw[grid][mine]
    valid = kw["attention_mask"][b].bool()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = kw[key][b, valid][None]
    return out


def generate_batched_then_singly(model, kw: dict, n_new: int, **gen):
    """``generate`` on the batch (its logits and statistics kept), then on each sample alone,
    unpadded: every sample's new tokens must equal its row's. Returns the batch's output and
    statistics (read before the single runs replace them)."""
    L = kw["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=n_new, return_dict_in_generate=True, output_logits=True, **gen)
        st = tokensieve.stats(model)
        for b in range(len(SAMPLES)):
            one = sample_of(kw, SAMPLES, b)
            single = model.generate(**one, max_new_tokens=n_new, **gen)
            assert torch.equal(single[0, one["input_ids"].shape[1]:], out.sequences[b, L:]), b
    return out, st


@pytest.mark.parametrize("builder", [build, build35], ids=["qwen3-vl", "qwen3.5"])
def test_generate_batched_equals_one_at_a_time_and_greedy_decoding_by_hand(builder) -> None:
    model = builder()
    kw = make_batch(SAMPLES)
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, "vidcom2", retain=0.5):
        out, st = generate_batched_then_singly(model, kw, 4)
    both = out.sequences
    assert torch.equal(both[:, :L], kw["input_ids"])  # the caller's prompt comes back
    for b in range(len(SAMPLES)):  # greedy decoding by hand, recomputing the whole sequence each step
        generated: list[int] = []
        for _ in range(4):
            generated.append(int(reference_logits(model, kw, b, st.keep[b], generated=generated)[-1].argmax()))
        assert both[b, L:].tolist() == generated, b


@torch.no_grad()
def reference_inllm_logits(model, kw: dict, b: int, record, generated: list[int] = ()) -> torch.Tensor:
    """Sample ``b`` alone, layer by layer through the unpatched decoder layers: DeepStack level j
    added to the visual rows present after layer j; at each prune point the visual tokens the
    method kept (``record.kept``, LM-input indices) stay with their original ids; then
    ``generated`` tokens appended at max id + 1, + 2, ... Returns the last position's logits."""
    lm = model.model.language_model
    embeds, levels, visual, pos = full_inputs(model, kw)
    L = kw["input_ids"].shape[1]
    valid = kw["attention_mask"][b].bool()
    offset = L - int(valid.sum())  # left padding: LM-input index = offset + local index
    nxt = int(pos[:, b, valid].max()) + 1
    new_ids = torch.tensor(list(generated), dtype=torch.long)
    h = torch.cat([embeds[b, valid], lm.embed_tokens(new_ids)])[None]
    rot = torch.cat([pos[:, b, valid], torch.arange(nxt, nxt + len(generated))[None].expand(3, -1)], 1)[:, None]
    vis = torch.cat([visual[b, valid], torch.zeros(len(generated), dtype=torch.bool)])
    first = int(visual[:b].sum())  # this sample's DeepStack rows start here (row-major order)
    ds_rank = torch.full(vis.shape, -1, dtype=torch.long)
    ds_rank[vis] = torch.arange(first, first + int(vis.sum()))
    origin = torch.arange(h.shape[1]) + offset
    points = [p[0] for p in record.points]
    for idx, layer in enumerate(lm.layers):
        n = h.shape[1]
        causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        h = layer(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, rot),
                  position_ids=torch.arange(n)[None])
        if idx < len(levels):
            rows = vis.nonzero(as_tuple=True)[0]
            h[0, rows] += levels[idx][ds_rank[rows]]
        for k in [k for k, pl in enumerate(points) if pl == idx]:
            kept = record.kept[b][k]
            stay = ~vis | torch.isin(origin, kept)
            h, rot, vis, ds_rank, origin = h[:, stay], rot[..., stay], vis[stay], ds_rank[stay], origin[stay]
    return model.lm_head(lm.norm(h))[0, -1]


@pytest.mark.parametrize(("method", "options", "retain"), [
    ("fastv", {"layer": 1}, 0.5),  # prunes after layer 0: DeepStack levels 1 and 2 go to kept tokens only
    ("fastv", {"layer": 3, "equivalent": "keep"}, 0.5),  # after every level
    ("pdrop", {"layers": (1, 2)}, 0.5),
    ("sparsevlm", {"pruning_layers": (1, 2), "recycle": False}, 0.6),
])
def test_in_llm_methods_equal_the_unpatched_layers_with_deepstack_by_hand(method, options, retain) -> None:
    model = build()
    kw = make_batch(SAMPLES)
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, method, retain=retain, **options):
        out, st = generate_batched_then_singly(model, kw, 3)
    record = st.inllm
    assert record.points and any(len(k[0]) < int(v[0]) for k, v in zip(record.kept, record.v_in))
    new = out.sequences[:, L:]
    for b in range(len(SAMPLES)):
        for t in range(3):
            want = reference_inllm_logits(model, kw, b, record, generated=new[b, :t].tolist())
            torch.testing.assert_close(out.logits[t][b], want, rtol=1e-4, atol=1e-4)


def test_dropping_deepstack_in_the_layer_loop_would_show() -> None:
    """The reference is sensitive to DeepStack: without the levels it gives other logits."""
    model = build()
    kw = make_batch(SAMPLES)
    with tokensieve.compress(model, "fastv", retain=0.5, layer=1):
        with torch.no_grad():
            logits = model(**kw).logits[:, -1]
        record = tokensieve.stats(model).inllm
    saved = [m.linear_fc2.weight.clone() for m in model.model.visual.deepstack_merger_list]
    with torch.no_grad():
        for m in model.model.visual.deepstack_merger_list:
            m.linear_fc2.weight.zero_()
            m.linear_fc2.bias.zero_() if m.linear_fc2.bias is not None else None
    try:
        without = reference_inllm_logits(model, kw, 0, record)
    finally:
        with torch.no_grad():
            for m, w in zip(model.model.visual.deepstack_merger_list, saved):
                m.linear_fc2.weight.copy_(w)
    assert not torch.allclose(logits[0], without, atol=1e-3)


@pytest.mark.parametrize(("method", "options"), [("vidcom2", {}), ("fastv", {"layer": 1}), ("dycoke", {"dp": True})])
def test_beams_and_the_decode_stage_run_batched_as_one_at_a_time(method: str, options: dict) -> None:
    """Beam search repeats each sample's rows: its DeepStack rows are repeated with them."""
    model = build()
    kw = make_batch(SAMPLES)
    with tokensieve.compress(model, method, retain=0.5, **options):
        generate_batched_then_singly(model, kw, 3, num_beams=1 if options.get("dp") else 2)



# -- Qwen3.5: the same layout, a hybrid linear/full-attention decoder ------------------------------


@pytest.mark.parametrize("method", ["vidcom2", "uniform", "lftr"])
def test_qwen3_5_prefill_equals_the_unpatched_hybrid_decoder_on_the_kept_tokens(method: str) -> None:
    """The Gated-DeltaNet layers' recurrence runs over the kept tokens only, left padding included."""
    model = build35()
    kw = make_batch(SAMPLES)
    with tokensieve.compress(model, method, retain=0.5):
        with torch.no_grad():
            logits = model(**kw).logits
        st = tokensieve.stats(model)
    for b in range(len(SAMPLES)):
        keep = st.keep[b]
        ref = reference_logits(model, kw, b, keep, replaced=st.replaced[b])
        got = logits[b, logits.shape[1] - keep.numel():]
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_qwen3_5_ranking_at_a_linear_attention_layer_is_refused_naming_the_full_ones() -> None:
    model = build35(layers=8)
    with pytest.raises(InputError, match="decoder layer 1, a linear-attention layer .*full-attention layers: 3, 7.*"
                                         "nearest is layer 3"):
        tokensieve.compress(model, "fastv", retain=0.5)  # FastV's K = 2 ranks at layer 1
    with pytest.raises(InputError, match="dp=False"):
        tokensieve.compress(model, "dycoke", retain=0.5, dp=True)
    assert not tokensieve.is_compressed(model)


@torch.no_grad()
def reference_hybrid_logits(model, kw: dict, b: int, record, generated: list[int] = ()) -> torch.Tensor:
    """Sample ``b`` alone through the unpatched hybrid layers, no cache: full-attention layers with a
    causal mask, Gated-DeltaNet layers over whatever rows are present; at each prune point the
    visual tokens the method kept (``record.kept``, LM-input indices) stay, with their original ids."""
    lm = model.model.language_model
    kinds = lm.config.layer_types
    embeds, _, visual, pos = full_inputs(model, kw)
    L = kw["input_ids"].shape[1]
    valid = kw["attention_mask"][b].bool()
    offset = L - int(valid.sum())
    nxt = int(pos[:, b, valid].max()) + 1
    h = torch.cat([embeds[b, valid], lm.embed_tokens(torch.tensor(list(generated), dtype=torch.long))])[None]
    rot = torch.cat([pos[:, b, valid], torch.arange(nxt, nxt + len(generated))[None].expand(3, -1)], 1)[:, None]
    vis = torch.cat([visual[b, valid], torch.zeros(len(generated), dtype=torch.bool)])
    origin = torch.arange(h.shape[1]) + offset
    points = [p[0] for p in record.points]
    for idx, layer in enumerate(lm.layers):
        n = h.shape[1]
        mask = None if kinds[idx] == "linear_attention" else torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, rot), position_ids=torch.arange(n)[None])
        for k in [k for k, pl in enumerate(points) if pl == idx]:
            stay = ~vis | torch.isin(origin, record.kept[b][k])
            h, rot, vis, origin = h[:, stay], rot[..., stay], vis[stay], origin[stay]
    return model.lm_head(lm.norm(h))[0, -1]


@pytest.mark.parametrize(("method", "options", "retain"), [
    ("fastv", {"layer": 4}, 0.7),  # ranks at full layer 3; layers 4-6 (linear) and 7 see the kept tokens
    ("pdrop", {"layers": (3, 7)}, 0.6),  # ranks with layers 3 and 7, prunes after 2 and 6
    ("sparsevlm", {"pruning_layers": (3,), "recycle": False}, 0.7),
])
def test_qwen3_5_in_llm_methods_equal_the_unpatched_hybrid_layers_by_hand(method: str, options: dict,
                                                                        retain: float) -> None:
    model = build35(layers=8)
    kw = make_batch(SAMPLES)
    L = kw["input_ids"].shape[1]
    with tokensieve.compress(model, method, retain=retain, **options):
        out, st = generate_batched_then_singly(model, kw, 3)
    record = st.inllm
    assert any(len(k[0]) < v[0] for k, v in zip(record.kept, record.v_in))
    new = out.sequences[:, L:]
    for b in range(len(SAMPLES)):
        for t in range(3):
            want = reference_hybrid_logits(model, kw, b, record, generated=new[b, :t].tolist())
            torch.testing.assert_close(out.logits[t][b], want, rtol=1e-4, atol=1e-4)
