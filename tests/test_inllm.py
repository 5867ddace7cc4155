"""In-LLM pruning (FastV, PDrop, SparseVLM, DyCoke stage 2) against a by-hand reference.

The reference runs the *unpatched* decoder layers one by one, without a KV cache, on the
shrinking sequence: at each prune point it gathers the kept visual tokens recorded by
``tokensieve.stats`` (plus every non-visual token), re-pads, and continues; each greedy step
recomputes the whole sequence. Agreement therefore checks the runtime's KV caches of
different lengths, per-layer masks, positions and decoding — not just "it runs".
"""

from __future__ import annotations

import math

import pytest
import torch
from _builders import ARCHS as ALL_ARCHS
from _builders import CLASSIC_ARCHS as ARCHS
from _builders import (IMAGE, MROPE_ARCHS, VIDEO, apply_replaced, build, capture_lm_inputs, full_positions_1d,
                       gather_by_hand, make_batch)

from tokensieve.errors import InputError

import tokensieve
from tokensieve.methods import DyCokeDP, FastV, PDrop, select_top
from tokensieve.runtime.inllm import _Capture, allowed_rows, call_capturing

N_NEW = 4
LAYERS = 4


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(arch: str, attn: str):
        if (arch, attn) not in cache:
            cache[(arch, attn)] = build(arch, attn, layers=LAYERS)
        return cache[(arch, attn)]

    return get


def samples_for(arch: str, batch: int):
    if arch == "llava-onevision":  # videos only: the trailing newline is the one structural token
        rows = [[("video", None)], [("video", None), ("video", None)], [("video", None)]]
    else:
        rows = [[("video", None)], [("image", (4, 6)), ("video", None)], [("video", None), ("image", (6, 4))]]
    return rows[:batch] if batch == 1 else rows


def visual_positions(arch: str, ids: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for row in ids:
        if arch == "llava-onevision":
            vis = (row == VIDEO)
            ends = vis & ~torch.cat([vis[1:], vis.new_zeros(1)])  # the newline closing each video
            out.append((vis & ~ends).nonzero(as_tuple=True)[0])
        else:
            out.append(((row == VIDEO) | (row == IMAGE)).nonzero(as_tuple=True)[0])
    return out


def split(pos):
    if pos.dim() == 3 and pos.shape[0] == 4:
        return pos[1:], pos[0]
    return (pos, None) if pos.dim() == 3 else (pos, pos)


def mask4d(m: torch.Tensor, hide: list[list[torch.Tensor | None]] | None, dtype) -> torch.Tensor:
    """Causal + key padding, and optional per-row hidden keys: additive float mask [B, 1, L, L]."""
    B, L = m.shape
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & m.bool()[:, None, :]
    if hide is not None:
        for b in range(B):
            for i, cols in enumerate(hide[b]):
                if cols is not None:
                    allowed[b, i, cols] = False
    out = torch.zeros(B, 1, L, L, dtype=dtype)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def deepstack_add(h, m, origin, seen, idx):
    """Qwen3-VL: DeepStack level ``idx`` added to the rows whose LM-input position is visual."""
    levels = seen.get("deepstack_visual_embeds") if seen else None
    if not levels or idx >= len(levels):
        return h
    vis = seen["visual_pos_masks"]
    rank = torch.full(vis.shape, -1, dtype=torch.long)
    rank[vis] = torch.arange(int(vis.sum()))
    h = h.clone()
    for b in range(h.shape[0]):
        o = origin[b]
        ok = (o >= 0) & m[b].bool() & (o < vis.shape[1])
        rows = ok.nonzero(as_tuple=True)[0]
        rows = rows[vis[b, o[rows]]]
        h[b, rows] = h[b, rows] + levels[idx][rank[b, o[rows]]]
    return h


@torch.no_grad()
def sequential_merge(kept, dropped):
    """HoliTom's inner merge as its paper states it: each dropped token, in sequence order, is
    averaged into its most cosine-similar kept token, one pair at a time."""
    kept = kept.clone()
    sim = torch.nn.functional.normalize(dropped.float(), dim=-1) @ torch.nn.functional.normalize(kept.float(), dim=-1).T
    for i, j in enumerate(sim.argmax(-1).tolist()):
        kept[j] = (kept[j] + dropped[i]) / 2
    return kept


def reference_logits(model, emb, mask, rot, text, visual, record, positions, n_prompt, dp=None, dp_hist=None,
                     seen=None, absorb=None):
    """Last-position logits of the full sequence (prompt + appended tokens), layer by layer.
    Linear-attention layers (Qwen3.5) take the 2-D padding mask; Qwen3-VL's DeepStack levels are
    added after their layers to the visual rows still present (``seen``: the unpatched inputs)."""
    lm = model.model.language_model
    kinds = getattr(lm.config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    B, L = mask.shape
    h, m = emb, mask
    origin = torch.arange(L).expand(B, L).clone()
    vis_sets = [v.clone() for v in visual]
    point_layers = [p[0] for p in record.points]
    for layer_idx, layer in enumerate(lm.layers):
        hide = None
        if dp is not None and layer_idx >= dp.layer and dp_hist:
            hide = []
            for b in range(B):
                rows = [None] * h.shape[1]
                for s, keeps in enumerate(dp_hist):
                    if keeps[b] is None:
                        continue
                    row = int((origin[b] == n_prompt + s).nonzero())
                    vis_here = torch.isin(origin[b], vis_sets[b]).nonzero(as_tuple=True)[0]
                    rows[row] = vis_here[~torch.isin(origin[b, vis_here], keeps[b])]
                hide.append(rows)
        pe = lm.rotary_emb(h, rot)
        layer_mask = m if kinds[layer_idx] == "linear_attention" else mask4d(m, hide, h.dtype)
        h = layer(h, attention_mask=layer_mask, position_embeddings=pe, position_ids=text)
        h = deepstack_add(h, m, origin, seen, layer_idx)
        for point_idx in [i for i, pl in enumerate(point_layers) if pl == layer_idx]:
            rows_h, rows_o, rows_r = [], [], []
            for b in range(B):
                kept = record.kept[b][point_idx]
                is_vis = torch.isin(origin[b], vis_sets[b])
                keep = (m[b].bool() & (~is_vis | torch.isin(origin[b], kept))).nonzero(as_tuple=True)[0]
                hb, ob = h[b, keep], origin[b, keep]
                if absorb is not None:
                    gone = (m[b].bool() & is_vis & ~torch.isin(origin[b], kept)).nonzero(as_tuple=True)[0]
                    stay = torch.isin(ob, kept)
                    if gone.numel():
                        hb = hb.clone()
                        hb[stay] = absorb(hb[stay], h[b, gone])
                rb = rot[:, b, keep] if rot.dim() == 3 else rot[b, keep]
                recycled = record.recycled[b][point_idx]
                if recycled is not None:  # merged tokens go right after the last kept visual token
                    centres, feats = recycled
                    at = int(torch.isin(ob, kept).nonzero().max()) + 1
                    cidx = torch.tensor([int((origin[b] == c).nonzero()) for c in centres.tolist()])
                    cpos = rot[:, b, cidx] if rot.dim() == 3 else rot[b, cidx]
                    hb = torch.cat([hb[:at], feats.to(hb.dtype), hb[at:]])
                    ob = torch.cat([ob[:at], centres, ob[at:]])
                    rb = torch.cat([rb[..., :at], cpos, rb[..., at:]], -1)
                    kept = torch.cat([kept, centres])
                vis_sets[b] = kept
                rows_h.append(hb)
                rows_o.append(ob)
                rows_r.append(rb)
            Lp = max(r.shape[0] for r in rows_h)
            h2 = h.new_zeros(B, Lp, h.shape[-1])
            m = mask.new_zeros(B, Lp)
            o2 = torch.full((B, Lp), -1)
            r2 = rot.new_zeros((3, B, Lp) if rot.dim() == 3 else (B, Lp))
            for b in range(B):
                n = rows_h[b].shape[0]
                h2[b, Lp - n:] = rows_h[b]
                m[b, Lp - n:] = 1
                o2[b, Lp - n:] = rows_o[b]
                if rot.dim() == 3:
                    r2[:, b, Lp - n:] = rows_r[b]
                else:
                    r2[b, Lp - n:] = rows_r[b]
            h, origin = h2, o2
            text = full_positions_1d(m)
            rot = r2 if (positions == "preserve" or rot.dim() == 3) else text
            if rot.dim() == 2:
                text = rot
    return model.lm_head(lm.norm(h))[:, -1]


def extend(rot, text, mask, n):
    """Append ``n`` decode positions (last + 1, per axis) and mask columns."""
    for _ in range(n):
        rot = torch.cat([rot, rot[..., -1:] + 1], -1)
        text = torch.cat([text, text[..., -1:] + 1], -1) if text is not None else None
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
    return rot, text, mask


def check_against_reference(model, arch, kw, name, options, retain, positions=None):
    mrope = arch in MROPE_ARCHS
    seen = capture_lm_inputs(model, kw)
    emb = seen["inputs_embeds"]
    mask = kw["attention_mask"]
    rot = seen["position_ids"] if mrope else full_positions_1d(mask)
    text = full_positions_1d(mask)
    visual = visual_positions(arch, kw["input_ids"])
    with tokensieve.compress(model, name, retain=retain, positions=positions, **options) as handle:
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        st = tokensieve.stats(model)
        state = handle.state
    record = st.inllm
    L = kw["input_ids"].shape[1]
    new = out.sequences[:, L:]
    lm = model.model.language_model
    for t in range(N_NEW):
        e = torch.cat([emb, lm.embed_tokens(new[:, :t])], 1)
        r, tx, m = extend(rot, text if mrope else None, mask, t)
        if not mrope:
            tx = r
        want = reference_logits(model, e, m, r, tx, visual, record, handle.positions, L,
                                dp=state.dp, dp_hist=record.dp_history[:t], seen=seen)
        torch.testing.assert_close(out.logits[t], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(new[:, t], want.argmax(-1))
    return st, handle


IN_LLM = {
    "fastv": ("fastv", {"layer": 2}, 0.8),
    "fastv-keep-mean-text": ("fastv", {"layer": 1, "equivalent": "keep", "query": "mean_text"}, 0.3),
    "pdrop": ("pdrop", {}, 0.6),
    "pdrop-ratios-fca": ("pdrop", {"layers": (1, 3), "ratios": (0.5, 0.25), "budget": "fca"}, 0.5),
    "sparsevlm": ("sparsevlm", {"pruning_layers": (1, 2)}, 0.6),
    "sparsevlm-v2": ("sparsevlm", {"variant": "v2", "pruning_layers": (1, 2), "priority_heads": 2}, 0.6),
    "sparsevlm-rank-fca": ("sparsevlm", {"pruning_layers": (0, 2), "budget": "rank", "lam": 0.5,
                                         "frame_budget": "fca"}, 0.6),
}


def ranks_at_a_linear_layer(model, name, options, retain) -> bool:
    """Whether this configuration would rank by a linear-attention layer (Qwen3.5), which
    ``compress`` refuses: the test then checks the refusal instead of the reference."""
    try:
        with tokensieve.compress(model, name, retain=retain, **options):
            return False
    except InputError as exc:
        if "linear-attention" not in str(exc):
            raise
        assert not tokensieve.is_compressed(model)
        return True


@pytest.mark.parametrize("method", list(IN_LLM))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_inllm_matches_layer_by_layer_reference(models, arch, attn, batch, method):
    model = models(arch, attn)
    name, options, retain = IN_LLM[method]
    if arch == "qwen3.5" and ranks_at_a_linear_layer(model, name, options, retain):
        return  # layers 0 and 2 are linear-attention layers: the refusal is the expected behaviour
    kw = make_batch(model, arch, samples_for(arch, batch))
    st, handle = check_against_reference(model, arch, kw, name, options, retain)
    assert st.inllm is not None
    v_out = st.inllm.v_out[0]
    assert v_out[-1] < v_out[0] or v_out[-1] < st.inllm.v_in[0][0]  # something was pruned


TWO_STAGE = {
    "flashvid-paper": ("flashvid", {"preset": "paper", "llm_layer": 2}, lambda V: math.ceil(0.3 * V), None),
    "holitom-inner": ("holitom", {"inner": True, "inner_layer": 2, "tau": 0.0}, lambda V: round(0.5 * V),
                      sequential_merge),
}


@pytest.mark.parametrize("method", list(TWO_STAGE))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if a not in ("qwen3-vl", "qwen3.5")])
def test_pre_llm_method_with_an_in_llm_stage_matches_reference(models, arch, batch, method):
    """FlashVID's paper preset and HoliTom with its inner merge: the pre-LLM selection (merged
    features included), then the unpatched layers by hand on the kept tokens with their original
    positions, pruned after layer 1 as recorded (HoliTom: the dropped tokens merged by the test's
    own pairwise loop)."""
    name, options, kept_count, absorb = TWO_STAGE[method]
    model = models(arch, "sdpa")
    mrope = arch in MROPE_ARCHS
    kw = make_batch(model, arch, samples_for(arch, batch))
    seen = capture_lm_inputs(model, kw)
    full_rot = seen["position_ids"] if mrope else full_positions_1d(kw["attention_mask"])
    with tokensieve.compress(model, name, retain=0.3, **options) as handle:
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        st = tokensieve.stats(model)
    emb, mask, rot = gather_by_hand(seen["inputs_embeds"], full_rot, kw["attention_mask"], st.keep,
                                    handle.positions, mrope)
    emb = apply_replaced(emb, st, st.keep)
    full_vis = visual_positions(arch, kw["input_ids"])
    Lp = mask.shape[1]
    visual = [torch.isin(st.keep[b], full_vis[b]).nonzero(as_tuple=True)[0] + Lp - st.keep[b].numel()
              for b in range(mask.shape[0])]
    record = st.inllm
    for b in range(mask.shape[0]):  # the in-LLM stage keeps its share of what the pre-LLM stage kept
        V = visual[b].numel()
        assert record.v_in[b][0] == V and record.v_out[b][1] == kept_count(V)
    text = full_positions_1d(mask)
    L = kw["input_ids"].shape[1]
    new = out.sequences[:, L:]
    lm = model.model.language_model
    for t in range(N_NEW):
        e = torch.cat([emb, lm.embed_tokens(new[:, :t])], 1)
        r, tx, m = extend(rot, text if mrope else None, mask, t)
        want = reference_logits(model, e, m, r, tx if mrope else r, visual, record, handle.positions, Lp,
                                absorb=absorb)
        torch.testing.assert_close(out.logits[t], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(new[:, t], want.argmax(-1))


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_position_modes_on_1d_models(models, name, positions):
    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    _, opts, retain = IN_LLM[name]
    _, handle = check_against_reference(model, "llava-onevision", kw, name, opts, retain, positions=positions)
    assert handle.positions == positions


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_preserve_and_compact_differ_on_1d_models(models, name):
    """The two position modes are really different computations on a 1-D RoPE model: after a
    prune point the kept tokens' ids differ (gaps vs renumbered), and so do the logits."""
    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    _, opts, retain = IN_LLM[name]
    logits = {}
    for positions in ("preserve", "compact"):
        with tokensieve.compress(model, name, retain=retain, positions=positions, **opts):
            out = model.generate(**kw, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        logits[positions] = torch.stack(out.logits)
    gap = (logits["preserve"] - logits["compact"]).abs().amax().item()
    assert gap > 1e-3, gap


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_full_retain_is_token_identical(models, arch, name):
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))
    base = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
    opts = {"layer": 1, "equivalent": "keep"} if name == "fastv" else {"equivalent": "keep"}
    if arch == "qwen3.5":  # rank at its full-attention layers (1 and 3)
        opts = {"layer": 2, "equivalent": "keep"} if name == "fastv" else {"layers": (1, 3), "equivalent": "keep"}
    with tokensieve.compress(model, name, retain=1.0, **opts):
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(out, base)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_dycoke_decode_stage_matches_reference(models, arch):
    model = models(arch, "sdpa")
    kw = make_batch(model, arch, samples_for(arch, 3))
    if arch == "qwen3.5":  # it hides keys, which linear-attention layers do not have
        with pytest.raises(InputError, match="dp=False"):
            tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=2, dp_prune=0.6)
        return
    # retain=1.0: TTM keeps everything, so only the decode-time stage acts
    st, handle = check_against_reference(model, arch, kw, "dycoke",
                                         {"dp": True, "dp_layer": 2, "dp_prune": 0.6}, 1.0)
    assert handle.state.session is None  # the generation's KV cache is not kept alive
    assert st.inllm.dp_steps == N_NEW - 1


def test_dycoke_decode_stage_prunes_and_can_be_neutral(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 3))
    base = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
    with tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=2, dp_threshold=-2.0):
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
        assert tokensieve.stats(model).inllm.dp_pruned_steps == 0
    assert torch.equal(out, base)  # never re-selects: attends to everything, as without stage 2
    with tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=2):
        model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
        hist = tokensieve.stats(model).inllm.dp_history
        assert tokensieve.stats(model).inllm.dp_pruned_steps >= 1
        first = hist[0][0]
        assert first is not None and first.numel() == int((1 - 0.7) * 32)


def test_dycoke_decode_stage_starts_every_generation_afresh(models):
    """Unlike the official code, stage 2 keeps no attention from one generation to the next:
    A, then B, then A again gives A's tokens and decode-time choices both times."""
    model = models("llava-onevision", "sdpa")
    a = make_batch(model, "llava-onevision", samples_for("llava-onevision", 1), seed=3)
    b = make_batch(model, "llava-onevision", samples_for("llava-onevision", 1), seed=4)
    runs = []
    with tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=2, dp_threshold=0.999):
        for kw in (a, b, a):
            out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
            hist = tokensieve.stats(model).inllm.dp_history
            runs.append((out, [[None if k is None else k.tolist() for k in step] for step in hist]))
    assert torch.equal(runs[0][0], runs[2][0]) and runs[0][1] == runs[2][1]
    assert runs[0][1][0][0] is not None  # the first decode step re-selects (no stored attention)


@pytest.mark.parametrize("arch", ARCHS)
def test_row_attention_equals_rows_of_the_full_eager_matrix(models, arch):
    """Invariant 7's building block: the captured rows are the full softmax rows (RoPE / M-RoPE)."""
    model = models(arch, "eager")
    kw = make_batch(model, arch, samples_for(arch, 3))
    lm = model.model.language_model
    seen = capture_lm_inputs(model, kw)
    with torch.no_grad():
        full = model(**kw, output_attentions=True).attentions  # eager: [B, H, L, L] per layer
    mask = kw["attention_mask"]
    mrope = arch != "llava-onevision"
    pos = seen["position_ids"] if mrope else full_positions_1d(mask)
    text = full_positions_1d(mask)
    h = seen["inputs_embeds"]
    B, L = mask.shape
    rows = [torch.tensor([L - 1, L - 3, L - 6 - b]) for b in range(B)]
    from tokensieve.runtime.compat import causal_mask

    with torch.no_grad():
        for idx, layer in enumerate(lm.layers):
            pe = lm.rotary_emb(h, pos)
            m4 = causal_mask(lm.config, "full_attention", h, mask, None, idx)
            cap = _Capture(base="", rows=rows, allowed=[allowed_rows(mask[b], rows[b], 0) for b in range(B)])
            h = call_capturing(layer.self_attn, cap, lambda: layer(h, attention_mask=m4, position_embeddings=pe,
                                                                   position_ids=None if mrope else text))
            for b in range(B):
                want = full[idx][b][:, rows[b]].float()
                torch.testing.assert_close(cap.result[b], want, rtol=1e-5, atol=1e-6)


def test_sdpa_runs_never_build_a_full_attention_matrix(models, monkeypatch):
    """With SDPA, no eager (full-matrix) attention function is ever called."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as q

    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 3))

    def forbidden(*a, **k):
        raise AssertionError("eager attention called")

    monkeypatch.setattr(q, "eager_attention_forward", forbidden)
    with tokensieve.compress(model, "pdrop", retain=0.6):
        model.generate(**kw, max_new_tokens=2, do_sample=False)
    with tokensieve.compress(model, "fastv", retain=0.8, layer=2):
        model.generate(**kw, max_new_tokens=2, do_sample=False)


def test_stats_report_equivalent_tokens_and_flops(models):
    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    with tokensieve.compress(model, "fastv", retain=0.8, layer=2):
        model.generate(**kw, max_new_tokens=2, do_sample=False)
        st = tokensieve.stats(model)
    d = st.as_dict()["samples"][1]
    V0 = d["visual_per_layer_in"][0]
    k = d["visual_per_layer_in"][-1]
    assert d["visual_per_layer_in"] == [V0, V0, k, k]
    assert d["visual_per_layer_out"] == [V0, k, k, k]
    assert d["equivalent_tokens"]["E_in"] == pytest.approx((2 * V0 + 2 * k) / 4)
    assert d["equivalent_tokens"]["E_out"] == pytest.approx((V0 + 3 * k) / 4)
    # retain is E_in by default: (K·V0 + (L−K)·k)/L = r·V0 with K = 2, L = 4, k rounded half up
    from fractions import Fraction

    assert k == math.floor((Fraction(8, 10) * 4 - 2) * V0 / 2 + Fraction(1, 2))
    cfg = model.config.text_config
    D, Mw = cfg.hidden_size, cfg.intermediate_size
    dkv = cfg.num_key_value_heads * (cfg.head_dim if getattr(cfg, "head_dim", None) else D // cfg.num_attention_heads)
    n_full = d["sequence_before"]

    def flops(n):  # per layer: projections, attention, MLP (multiply-accumulates)
        return n * D * (2 * D + 2 * dkv) + 2 * n * n * D + 3 * n * D * Mw

    seqs = [n_full - (V0 - v) for v in d["visual_per_layer_in"]]
    assert d["prefill_flops"]["pruned"] == pytest.approx(sum(flops(n) for n in seqs))
    assert d["prefill_flops"]["unpruned"] == pytest.approx(4 * flops(n_full))
    assert st.tokens_after == sum(v[-1] for v in st.inllm.v_out)


def test_select_top_with_frame_budgets():
    score = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 9.0, 8.0])
    frame = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert select_top(score, 3).tolist() == [0, 6, 7]
    w = torch.tensor([0.6, 0.2, 0.2])
    keep = select_top(score, 5, frame, w)
    assert keep.tolist() == [0, 1, 2, 4, 6]  # 3 from frame 0, 1 each from frames 1 and 2


def test_plans_and_errors():
    assert FastV(layer=2).plan(100, 28, 0.25)[0] == FastV(layer=2).plan(100, 28, 0.25)[0]
    p = FastV(layer=2).plan(1000, 28, 0.25)[0]
    assert p.layer == 1 and abs((2 * 1000 + 26 * p.keep) / 28 - 250) <= 1
    assert FastV(layer=2, equivalent="keep").plan(1000, 28, 0.25)[0].keep == 250
    with pytest.raises(tokensieve.InputError, match="leaves no visual token after layer K=2"):
        FastV(layer=2).plan(1000, 28, 0.05)
    plan = PDrop(ratios=(0.5, 0.25, 0.125)).plan(576, 32, 0.5)
    assert [(p.layer, p.keep, p.source) for p in plan] == [(7, 288, "next"), (15, 144, "next"), (23, 72, "next")]
    plan = PDrop().plan(576, 32, 0.3)
    e_in = (8 * 576 + 8 * plan[0].keep + 8 * plan[1].keep + 8 * plan[2].keep) / 32
    assert abs(e_in - 0.3 * 576) < 8
    with pytest.raises(tokensieve.InputError, match="strictly increasing"):
        PDrop(layers=(8, 8))
    assert DyCokeDP().keep_count(100) == 30


def test_bad_in_llm_options_fail_before_anything_changes(models):
    model = models("qwen2-vl", "sdpa")
    with pytest.raises(tokensieve.InputError, match="past the language model's depth"):
        tokensieve.compress(model, "fastv", retain=0.5, layer=9)
    with pytest.raises(tokensieve.InputError, match="past the language model's depth"):
        tokensieve.compress(model, "dycoke", retain=0.5, dp=True, dp_layer=4)
    with pytest.raises(tokensieve.InputError, match="leaves no visual token"):
        tokensieve.compress(model, "fastv", retain=0.2, layer=2)
    with pytest.raises(tokensieve.InputError, match="compact.*not defined .*M-RoPE"):
        tokensieve.compress(model, "pdrop", retain=0.6, positions="compact")
    with pytest.raises(tokensieve.InputError, match="retain must be"):
        tokensieve.compress(model, "pdrop", retain=0)
    assert not tokensieve.is_compressed(model)
    assert "forward" not in model.model.language_model.__dict__


@pytest.mark.parametrize("variant,target,e_out", [("v1.5", 192, 192.03125), ("v1.5", 128, 128.625),
                                                  ("v1.5", 64, 64.8125), ("v2", 192, 192.4375)])
def test_sparsevlm_reference_schedules_on_a_576_token_image(variant, target, e_out):
    """The published schedules through the runtime: a 32-layer model, one 24×24-token image."""
    model = build("qwen2-vl", "sdpa", layers=32)
    kw = make_batch(model, "qwen2-vl", [[("image", (48, 48))]])
    assert int((kw["input_ids"] == IMAGE).sum()) == 576
    with tokensieve.compress(model, "sparsevlm", retain=0.5, variant=variant, budget="schedule", target=target):
        model(**kw)
        st = tokensieve.stats(model)
    eq = st.equivalent_tokens(0)
    assert eq["E_out"] == pytest.approx(e_out)
    if (variant, target) == ("v1.5", 192):
        assert eq["E_in"] == pytest.approx(206.5)
        assert [len(r[1]) for r in st.inllm.recycled[0]] == [9, 4, 3]
        v_out = st.inllm.v_out[0]
        assert v_out[:3] == [576, 576, 309] and v_out[6] == 204 and v_out[15] == 113


def test_sparsevlm_keeps_at_most_v_minus_one_like_the_reference(models):
    """V0 = 300 at target 192: the first scheduled keep (300) equals V, so the reference keeps
    V − 1 = 299 and recycles the one pruned token (the runtime once kept all 300, pruning nothing)."""
    from tokensieve.methods.sparsevlm import recycle_counts, simulate_schedule

    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", [[("image", (20, 60))]])
    assert int((kw["input_ids"] == IMAGE).sum()) == 300
    with tokensieve.compress(model, "sparsevlm", retain=0.5, budget="schedule", target=192,
                             pruning_layers=(0, 1, 2)):
        model(**kw)
        rec = tokensieve.stats(model).inllm
    assert [k.numel() for k in rec.kept[0]] == [299, 200, 110]
    c = recycle_counts(1)[1]
    assert c == 1 and len(rec.recycled[0][0][1]) == c
    sim = simulate_schedule(300, LAYERS, {0: 300, 1: 200, 2: 110})
    assert rec.v_out[0] == sim["v_out"] and rec.v_out[0][0] == 300


def test_sparsevlm_schedule_longer_than_the_sequence_is_a_clear_error(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", [[("video", None)]])
    with tokensieve.compress(model, "sparsevlm", retain=0.5, budget="schedule", pruning_layers=(1, 2, 3)):
        with pytest.raises(tokensieve.InputError, match="longer than the sequence|has only"):
            model(**kw)


def test_generation_defaults_and_prompt_aware_processors_match_the_unpatched_model(models):
    """No length given (transformers' default), repetition penalty (it reads the prompt ids)."""
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 3))
    for extra in ({}, {"repetition_penalty": 1.5}, {"max_length": kw["input_ids"].shape[1] + 3}):
        base = model.generate(**kw, do_sample=False, **extra)
        for name, opts in (("vidcom2", {}), ("fastv", {"layer": 1, "equivalent": "keep"})):
            with tokensieve.compress(model, name, retain=1.0, **opts):
                out = model.generate(**kw, do_sample=False, **extra)
            assert torch.equal(out, base), (extra, name)


def test_a_failed_call_leaves_nothing_pending(models):
    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    text = torch.randint(2, 100, (1, 30))
    with torch.no_grad():
        base = model(input_ids=text).logits
    with tokensieve.compress(model, "fastv", retain=0.8, layer=2) as h:
        with pytest.raises(Exception):
            model.generate(**kw, max_new_tokens=2, bogus_argument=1)
        assert h.state.pending is None and h.state.session is None
        with torch.no_grad():
            assert torch.equal(model(input_ids=text).logits, base)
        with pytest.raises(tokensieve.InputError, match="labels are not supported"):
            model(**kw, labels=kw["input_ids"])
        model.generate(**kw, max_new_tokens=2)
        assert h.state.session is None  # the KV cache is not kept alive after generate


def test_unsupported_generation_settings_are_clear_errors(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 1))
    with tokensieve.compress(model, "pdrop", retain=0.6):
        with pytest.raises(tokensieve.InputError, match="dynamic KV cache"):
            model.generate(**kw, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(tokensieve.InputError, match="prefill_chunk_size"):
            model.generate(**kw, max_new_tokens=2, prefill_chunk_size=8)
    with tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=2):
        with pytest.raises(tokensieve.InputError, match="beam search"):
            model.generate(**kw, max_new_tokens=2, num_beams=2)


def test_a_text_only_sample_in_the_batch(models):
    model = models("qwen2-vl", "sdpa")
    kw = make_batch(model, "qwen2-vl", [[], [("video", None)], [("video", None)]])
    with tokensieve.compress(model, "fastv", retain=0.8, layer=2):
        model.generate(**kw, max_new_tokens=2)
        st = tokensieve.stats(model)
    assert st.inllm.points == [(1, "self")]
    assert st.inllm.v_in[0] == [0, 0, 0, 0] and st.inllm.v_in[1][0] > st.inllm.v_in[1][-1]


def test_kernels_that_read_the_module_config_see_the_real_one(models, monkeypatch):
    """FlashAttention reads module.config itself; the row capture must not show it its own name."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build("qwen2-vl", "sdpa", layers=LAYERS)
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def checking(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return sdpa(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("vt_checking", checking)
    model.config._attn_implementation = "vt_checking"
    kw = make_batch(model, "qwen2-vl", samples_for("qwen2-vl", 3))
    with tokensieve.compress(model, "fastv", retain=0.8, layer=2):
        model.generate(**kw, max_new_tokens=2)
    assert seen and set(seen) == {"vt_checking"}


# --- selections decided by the reference itself (not read from the runtime's record) ----------


def _first_point_attention(model, kw, layer):
    """Post-softmax attention ``[B, H, L, L]`` of the unpatched eager model at ``layer``, and the
    language model's input embeddings, on the full (unpruned) input."""
    seen = capture_lm_inputs(model, kw)
    lm = model.model.language_model
    emb, mask = seen["inputs_embeds"], kw["attention_mask"]
    pos = seen.get("position_ids")
    if pos is None:
        pos = full_positions_1d(mask)
    with torch.no_grad():
        out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_attentions=True)
    return out.attentions[layer], emb


def _top(scores, k):
    """Indices of the k largest scores, ties to the earlier index, ascending."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


@pytest.mark.parametrize(("arch", "name"), [("llava-onevision", "fastv"), ("qwen2-vl", "fastv"),
                                            ("qwen2-vl", "sparsevlm")])
def test_inllm_selections_are_the_methods_own_choice(models, arch, name):
    """The first prune point's kept set, chosen here from the paper's definition on the unpatched
    eager model's attention: FastV — the last prompt token's head-mean attention, top k; SparseVLM —
    raters r_i > mean(r) with r = mean_v softmax_t(H_v H_tᵀ) on the layer-0 embeddings, then the
    raters' head-mean attention averaged over raters, top k."""
    model = models(arch, "eager")
    kw = make_batch(model, arch, samples_for(arch, 3))
    opts = {"fastv": {"layer": 2, "equivalent": "keep"}, "sparsevlm": {"pruning_layers": (1, 2), "equivalent": "output"}}[name]
    layer = 1
    attn, emb = _first_point_attention(model, kw, layer)
    with tokensieve.compress(model, name, retain=0.5, **opts):
        with torch.no_grad():
            model(**kw)
        rec = tokensieve.stats(model).inllm
    visual = visual_positions(arch, kw["input_ids"])
    L = kw["input_ids"].shape[1]
    for b in range(len(visual)):
        vis = visual[b]
        V = vis.numel()
        a = attn[b].float().mean(0)  # [L, L], head mean
        if name == "fastv":
            k = int(math.floor(0.5 * V + 0.5))
            scores = a[L - 1, vis]  # left padding: the last prompt token sits at L - 1
        else:
            text = torch.arange(int(vis.max()) + 1, L)
            g = emb[b, vis].float() @ emb[b, text].float().T
            r = torch.softmax(g, dim=1).mean(0)
            raters = text[r > r.mean()] if bool((r > r.mean()).any()) else text
            k = rec.kept[b][0].numel()  # the count is the schedule's (tested on its own)
            scores = a[raters][:, vis].mean(0)
        want = vis[_top(scores, k)]
        assert torch.equal(rec.kept[b][0], want), (b, rec.kept[b][0].tolist(), want.tolist())


@pytest.mark.parametrize(("retain", "equivalent"), [(0.85, "input"), (0.3, "keep"), (0.9, "output")])
def test_inllm_keep_counts_are_the_published_formulas(models, retain, equivalent):
    """FastV's keep count k from the equivalent-token definitions (round half up), per sample:
    input  (K·V0 + (L−K)·k)/L = r·V0;  output ((K−1)·V0 + (L−K+1)·k)/L = r·V0;  keep  k = r·V0."""
    from fractions import Fraction

    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    K, L = 2, LAYERS
    with tokensieve.compress(model, "fastv", retain=retain, layer=K, equivalent=equivalent):
        with torch.no_grad():
            model(**kw)
        rec = tokensieve.stats(model).inllm
    r = Fraction(str(retain))
    for b, vis in enumerate(visual_positions("llava-onevision", kw["input_ids"])):
        V0 = vis.numel()
        exact = {"keep": r * V0, "input": (r * L - K) * V0 / (L - K),
                 "output": (r * L - (K - 1)) * V0 / (L - K + 1)}[equivalent]
        assert rec.kept[b][0].numel() == math.floor(exact + Fraction(1, 2)), (b, V0, exact)


def test_dycoke_decode_choices_are_the_methods_own(models):
    """DyCoke stage 2 decided here: at each decode step, the new token's head-mean attention over
    the visual keys at layer dp_layer − 1 (unpatched eager model, whole sequence, no cache); the
    cosine with the previous step's (0 on the first); below the threshold keep the top
    ⌊(1 − prune)·V⌋, else attend to everything."""
    model = models("llava-onevision", "eager")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    dp_layer, prune, threshold = 2, 0.6, 0.995
    with tokensieve.compress(model, "dycoke", retain=1.0, dp=True, dp_layer=dp_layer, dp_prune=prune,
                             dp_threshold=threshold):
        out = model.generate(**kw, max_new_tokens=N_NEW, do_sample=False)
        hist = tokensieve.stats(model).inllm.dp_history
    seen = capture_lm_inputs(model, kw)
    lm = model.model.language_model
    L = kw["input_ids"].shape[1]
    new = out[:, L:]
    visual = visual_positions("llava-onevision", kw["input_ids"])
    previous = [None] * len(visual)
    changed = stable = 0
    for s in range(N_NEW - 1):
        e = torch.cat([seen["inputs_embeds"], lm.embed_tokens(new[:, : s + 1])], 1)
        m = torch.cat([kw["attention_mask"], kw["attention_mask"].new_ones(len(visual), s + 1)], 1)
        with torch.no_grad():
            attn = lm(inputs_embeds=e, attention_mask=m, position_ids=full_positions_1d(m),
                      output_attentions=True).attentions[dp_layer - 1]
        for b, vis in enumerate(visual):
            a = attn[b, :, -1, vis].float().mean(0)
            sim = 0.0 if previous[b] is None else float(torch.nn.functional.cosine_similarity(a, previous[b], dim=0))
            previous[b] = a
            got = hist[s][b]
            if sim < threshold:
                changed += 1
                want = vis[_top(a, max(1, math.floor((1 - prune) * vis.numel())))]
                assert got is not None and torch.equal(got, want), (s, b)
            else:
                stable += 1
                assert got is None, (s, b)
    assert changed and stable  # both branches exercised


# --- published layers on shallower models (depth="scaled") -------------------------------------


def test_scaled_layers_rule():
    from tokensieve.methods.inllm import scaled_layers

    assert scaled_layers((2,), 32, 32, low=1) == (2,)  # the published depth: unchanged
    assert scaled_layers((2,), 4, 32, low=1) == (1,)  # 2·4/32 = 0.25 → 0, raised to K ≥ 1
    assert scaled_layers((2, 6, 15), 4, 32, low=0) == (0, 1, 2)  # 0.25, 0.75, 1.875 → 0, 1, 2
    assert scaled_layers((2, 6, 15), 28, 32, low=0) == (2, 5, 13)  # round half up of 1.75, 5.25, 13.125
    assert scaled_layers((3,), 4, 28, low=1) == (1,)
    assert scaled_layers((8, 16, 24), 16, 32, low=1) == (4, 8, 12)
    with pytest.raises(tokensieve.InputError, match="cannot place 3 layers"):
        scaled_layers((2, 6, 15), 2, 32, low=0)


@pytest.mark.parametrize(("name", "options", "resolved"), [
    ("fastv", {"depth": "scaled"}, ("layer", 1)),
    ("sparsevlm", {"depth": "scaled"}, ("pruning_layers", (0, 1, 2))),
    ("pdrop", {"depth": "scaled", "layers": (8, 16, 24)}, ("layers", (1, 2, 3))),
    ("dycoke", {"depth": "scaled", "dp": True}, ("dp_layer", 1)),
])
def test_depth_scaled_places_published_layers_on_a_shallow_model(models, name, options, resolved):
    """On the 4-layer test model the published layers do not exist; depth='scaled' puts them at
    the same fraction of the depth, and the compressed model then runs."""
    model = models("llava-onevision", "sdpa")
    kw = make_batch(model, "llava-onevision", samples_for("llava-onevision", 3))
    if name in ("sparsevlm", "pdrop"):
        with pytest.raises(tokensieve.InputError, match="past the language model's depth|no room"):
            tokensieve.compress(model, name, retain=0.6, **{k: v for k, v in options.items() if k != "depth"})
    handle = tokensieve.compress(model, name, retain=0.6 if name != "dycoke" else 1.0, **options)
    try:
        method = handle.state.inllm if handle.state.inllm is not None else handle.state.selector
        attr, value = resolved
        assert getattr(method, attr) == value
        model.generate(**kw, max_new_tokens=2, do_sample=False)
    finally:
        handle.restore()
