"""The signals methods ask for: the question's tokens and the vision encoder's attention."""

from __future__ import annotations

import math

import pytest
import torch
from _builders import IMAGE, V_END, VIDEO, build, capture_lm_inputs, make_batch

import tokensieve
from tokensieve.methods import LFTR
from tokensieve.methods.signals import frame_mean_attention
from tokensieve.models import get_adapter


@pytest.fixture(scope="module")
def qwen():
    return build("qwen2-vl", "sdpa")


def test_question_is_the_text_after_the_last_visual_input(qwen):
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)], [("image", (4, 6)), ("video", None)]])
    with tokensieve.compress(qwen, "lftr", retain=0.25):
        qwen.generate(**kw, max_new_tokens=2)
        st = tokensieve.stats(qwen)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    for b in range(ids.shape[0]):
        last_visual = int(((ids[b] == VIDEO) | (ids[b] == IMAGE)).nonzero().max())
        expected = [i for i in range(last_visual + 1, ids.shape[1]) if mask[b, i] and ids[b, i] != V_END]
        assert st.question[b].tolist() == expected
    assert st.as_dict()["question_tokens"] == [len(q) for q in st.question]


def test_question_mask_overrides_the_rule_and_changes_the_text_selection(qwen):
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)]])
    ids = kw["input_ids"]
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[0, :3] = True  # the leading text tokens instead of the trailing ones
    with tokensieve.compress(qwen, "lftr", retain=0.25, temporal="off"):
        qwen(**kw)
        default = tokensieve.stats(qwen)
        qwen(**kw, question_mask=first)
        custom = tokensieve.stats(qwen)
        with pytest.raises(tokensieve.InputError, match="needs the question text.*question_mask"):
            qwen(**kw, question_mask=torch.zeros_like(first))
        with pytest.raises(tokensieve.InputError, match="question_mask must be a bool tensor shaped like"):
            qwen(**kw, question_mask=first[:, :5])
    assert custom.question[0].tolist() == [0, 1, 2]
    assert not torch.equal(default.keep[0], custom.keep[0])


def test_text_selection_equals_the_method_on_the_question_embeddings(qwen):
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)]])
    seen = capture_lm_inputs(qwen, kw)
    with tokensieve.compress(qwen, "lftr", retain=0.25, temporal="off"):
        qwen(**kw)
        st = tokensieve.stats(qwen)
    seg = st.segments[0][0]
    T, H, W = seg.grid
    content = (kw["input_ids"][0] == VIDEO).nonzero(as_tuple=True)[0]
    x = seen["inputs_embeds"][0, content].view(T, H * W, -1)
    text = seen["inputs_embeds"][0, st.question[0]]
    from tokensieve.methods import SegmentContext

    sel = LFTR(temporal="off").select(x, 0.25, SegmentContext(grid=(T, H, W), text=text))
    assert torch.equal(content[sel.keep], st.keep[0][torch.isin(st.keep[0], content)])


def test_frame_mean_stand_in_for_encoders_without_a_summary_token(qwen):
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)]])
    with tokensieve.compress(qwen, "visionzip", retain=0.5):
        qwen(**kw)
        assert tokensieve.stats(qwen).encoder_signal == "frame-mean"
    x = torch.randn(2, 5, 8)
    a = frame_mean_attention(x)
    assert torch.allclose(a, (x * x.mean(1, keepdim=True)).sum(-1) / math.sqrt(8))


def test_siglip_probe_attention_matches_the_pooling_head():
    """With a pooling head, LLaVA-OV videos are scored by the head's own probe attention."""
    model = build("llava-onevision", "sdpa", siglip_head=True)
    kw = make_batch(model, "llava-onevision", [[("video", None)]])
    seen = capture_lm_inputs(model, kw)
    with tokensieve.compress(model, "lftr", retain=0.25, temporal="off", spatial="topic"):
        model(**kw)
        st = tokensieve.stats(model)
    assert st.encoder_signal == "siglip-probe+siglip-received"
    # the reference: the head's nn.MultiheadAttention weights, averaged over heads, resized like the features
    tower = model.model.vision_tower
    pv = kw["pixel_values_videos"][0]
    with torch.no_grad():
        z = tower(pv).last_hidden_state
        head = tower.head
        _, w = head.attention(head.probe.expand(z.shape[0], -1, -1), z, z, need_weights=True)
    side = math.isqrt(w.shape[-1])
    amap = torch.nn.functional.interpolate(w.view(-1, 1, side, side), size=[math.ceil(side / 2)] * 2,
                                           mode="bilinear").flatten(1)
    seg = st.segments[0][0]
    T, H, W = seg.grid
    content = (kw["input_ids"][0] == VIDEO).nonzero(as_tuple=True)[0][:-1]
    x = seen["inputs_embeds"][0, content].view(T, H * W, -1)
    from tokensieve.methods import SegmentContext

    sel = LFTR(temporal="off", spatial="topic").select(x, 0.25, SegmentContext(grid=seg.grid, encoder_attention=amap))
    assert torch.equal(content[sel.keep], st.keep[0][torch.isin(st.keep[0], content)])
    # and it differs from what the frame-mean stand-in would choose
    alt = LFTR(temporal="off", spatial="topic").select(
        x, 0.25, SegmentContext(grid=seg.grid, encoder_attention=frame_mean_attention(x)))
    assert not torch.equal(alt.keep, sel.keep)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_siglip_received_attention_is_the_towers_own(feature_layer):
    """(The tiny tower has one layer: feature layer -2 is the patch embeddings, which no attention
    made — then there is no received attention and the methods' stand-in is used.)"""
    """LLaVA-OV videos carry the mean attention each patch receives in the tower layer that made
    the features (heads and queries averaged), resized like the features: compared with the
    eager tower's own attention maps, and with the choice FlashVID makes from them."""
    model = build("llava-onevision", "eager")
    model.config.vision_feature_layer = feature_layer
    model.model.config.vision_feature_layer = feature_layer
    kw = make_batch(model, "llava-onevision", [[("video", None)], [("video", None)]])
    seen = capture_lm_inputs(model, kw)
    with tokensieve.compress(model, "flashvid", retain=0.25):
        model(**kw)
        st = tokensieve.stats(model)
    if feature_layer == -2:
        assert st.encoder_signal == "frame-mean"
        return
    assert st.encoder_signal == "frame-mean+siglip-received"
    tower = model.model.vision_tower
    from tokensieve.methods import FlashVID, SegmentContext

    for b in range(2):
        pv = kw["pixel_values_videos"][b]
        with torch.no_grad():
            out = tower(pv, output_attentions=True, output_hidden_states=True)
        layer = feature_layer % len(out.hidden_states)
        w = out.attentions[layer - 1].mean(dim=(1, 2))  # [frames, N]
        side = math.isqrt(w.shape[-1])
        amap = torch.nn.functional.interpolate(w.view(-1, 1, side, side), size=[math.ceil(side / 2)] * 2,
                                               mode="bilinear").flatten(1)
        seg = st.segments[b][0]
        T, H, W = seg.grid
        content = (kw["input_ids"][b] == VIDEO).nonzero(as_tuple=True)[0][:-1]
        x = seen["inputs_embeds"][b, content].view(T, H * W, -1)
        sel = FlashVID().select(x, 0.25, SegmentContext(grid=seg.grid, encoder_received=amap.view(T, H * W)))
        assert torch.equal(content[sel.keep], st.keep[b][torch.isin(st.keep[b], content)])
        alt = FlashVID(attention="features").select(x, 0.25)
        assert not torch.equal(alt.keep, sel.keep)


def test_a_family_without_any_encoder_signal_gets_a_clear_error(qwen, monkeypatch):
    adapter = get_adapter(qwen)
    monkeypatch.setattr(type(adapter), "fallback_encoder_signal", None)
    kw = make_batch(qwen, "qwen2-vl", [[("video", None)]])
    with tokensieve.compress(qwen, "lftr", retain=0.25, spatial="topic"):
        with pytest.raises(tokensieve.InputError,
                           match="method 'lftr' needs vision-encoder attention, which Qwen2VLForConditionalGeneration"):
            qwen(**kw)
    with tokensieve.compress(qwen, "lftr", retain=0.25, spatial="text"):
        qwen(**kw)  # the text variant needs no encoder signal
