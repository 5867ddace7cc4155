"""In-LLM pruning: run the decoder layer by layer, shrink the sequence between layers.

While an in-LLM method is installed, the language model's ``forward`` is replaced by
:class:`LMForward`. It does what the model's own forward does — mask per layer with
transformers' ``create_causal_mask``, rotary embeddings from the model's ``rotary_emb``, the
unmodified decoder layers — and in addition, at each prune point:

* obtains the attention rows the method asks for **without a full attention map**: the
  pruning layer runs through a registered attention function that hands the runtime the
  layer's own post-RoPE queries and keys and then calls the configured kernel (SDPA, eager,
  FlashAttention) unchanged; only ``softmax(Q_rows Kᵀ·scale + mask)`` of shape
  ``[H, R, Lk]`` is formed, in fp32. PDrop's "next layer" scores come from a dry call of the
  next layer's attention module on the current hidden states (projections only, no output);
* keeps the top visual tokens per sample, gathers, and re-pads the batch.

Each layer's KV cache then holds the sequence that layer saw, so caches have different
lengths. The runtime keeps one 2-D key mask per layer and extends it at every decode step,
so masks and cache lengths agree for every kernel and batch size. Positions: ``preserve``
keeps the original ids (decode positions are the unpruned model's, as ``generate`` passes
them); ``compact`` (1-D RoPE only) renumbers each layer's sequence, and decode positions
are shifted per layer by the number of tokens that layer no longer holds.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..methods.inllm import InLLMMethod, PruneContext, PrunePoint, SampleLayout, select_top, uses_fca
from . import compat
from .repad import mask_of, mask_positions, padding_side_of, repad, repad_positions, row_slot

ROWS_IMPL = "tokensieve_rows"
_CAPTURE: contextvars.ContextVar["_Capture | None"] = contextvars.ContextVar("tokensieve_capture", default=None)


@dataclass
class _Capture:
    """What one attention call should hand back: rows per sample and the allowed keys per row."""

    base: str
    rows: list[torch.Tensor]
    allowed: list[torch.Tensor]  # per sample [R, Lk] bool
    dry: bool = False
    result: list[torch.Tensor] = field(default_factory=list)


def _rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, **kwargs: Any) -> Any:
    """Attention function that records the requested softmax rows, then runs the real kernel."""
    cap = _CAPTURE.get()
    view = module.config
    base_config = object.__getattribute__(view, "_base") if isinstance(view, _ConfigView) else view
    if cap is None:  # another thread's call while this module is being captured: run it plainly
        return _call_base(module, base_config, base_config._attn_implementation, query, key, value,
                          attention_mask, kwargs)
    H, d = query.shape[1], query.shape[-1]
    rep = H // key.shape[1]
    scale = kwargs.get("scaling") or d**-0.5
    for b, rows in enumerate(cap.rows):
        rows = rows.to(query.device)
        q = query[b, :, rows].float()  # [H, R, d]
        k = key[b].float().repeat_interleave(rep, dim=0)  # [H, Lk, d]
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~cap.allowed[b].to(query.device)[None], float("-inf"))
        cap.result.append(torch.softmax(logits, dim=-1))
    if cap.dry:
        return query.new_zeros(query.shape[0], query.shape[2], H, d), None
    return _call_base(module, base_config, cap.base, query, key, value, attention_mask, kwargs)


def _call_base(module: torch.nn.Module, base_config: Any, name: str, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]) -> Any:
    """The configured kernel, with the module's real config in place (kernels such as
    FlashAttention read ``module.config`` themselves)."""
    current = module.config
    module.config = base_config
    try:
        return compat.attention_function(module, name)(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = current


class _ConfigView:
    """A config that reports another attention implementation and forwards everything else."""

    def __init__(self, base: Any, impl: str) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_attn_implementation", impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)


def call_capturing(attn_module: torch.nn.Module, cap: _Capture, fn: Any) -> Any:
    """Run ``fn()`` while ``attn_module`` routes its attention through the row capture."""
    compat.register_attention(ROWS_IMPL, _rows_attention)
    cap.base = attn_module.config._attn_implementation
    original = attn_module.config
    attn_module.config = _ConfigView(original, ROWS_IMPL)
    token = _CAPTURE.set(cap)
    try:
        out = fn()
    finally:
        _CAPTURE.reset(token)
        attn_module.config = original
    if len(cap.result) != len(cap.rows):
        raise compat.UnsupportedTransformers(
            f"{type(attn_module).__name__} did not route its attention through transformers' attention-function "
            f"registry (transformers {compat.transformers_version()}; supported: {compat.supported_range()}), "
            "so its attention rows cannot be read"
        )
    return out


def allowed_rows(key_mask: torch.Tensor, rows: torch.Tensor, query_offset: int) -> torch.Tensor:
    """``[R, Lk]`` bool: key ``j`` is visible to query row ``i`` (at ``query_offset + i``) iff
    ``j <= query_offset + i`` and key ``j`` is not padding."""
    Lk = key_mask.shape[-1]
    j = torch.arange(Lk, device=key_mask.device)
    return (j[None, :] <= (rows[:, None] + query_offset)) & key_mask.bool()[None, :]


# --- the session: what one generation (prefill + decode steps) knows ------------------------


@dataclass
class Pending:
    """Set by the outer wrapper before a compressed prefill reaches the language model."""

    layouts: list[SampleLayout]
    frame_weights: list[torch.Tensor | None]


@dataclass
class Session:
    cache: Any  # a weak reference: the caller owns the KV cache
    layer_masks: list[torch.Tensor]
    layer_shift: list[torch.Tensor]
    layer_visual: list[list[torch.Tensor]]
    dp_previous: list[torch.Tensor | None] = field(default_factory=list)
    dp_keep: list[torch.Tensor | None] = field(default_factory=list)
    #: per layer, per sample: LM-input index of every entry of that layer's sequence (-1: padding)
    layer_origin: list[list[torch.Tensor]] = field(default_factory=list)
    record: "InLLMRecord | None" = None


@dataclass
class InLLMRecord:
    """Per-sample statistics of one compressed prefill (``tokensieve.stats(model).inllm``)."""

    v_in: list[list[int]]
    v_out: list[list[int]]
    kept: list[list[torch.Tensor]] = field(repr=False)
    recycled: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(repr=False)
    seq_in: list[list[int]] = field(default_factory=list)
    score_ms: float = 0.0
    points: list[tuple[int, str]] = field(default_factory=list)
    #: DyCoke's decode stage: steps seen, steps that pruned, and per step and sample the
    #: LM-input indices of the visual keys attended in layers >= dp_layer (``None``: all)
    dp_steps: int = 0
    dp_pruned_steps: int = 0
    dp_history: list[list[torch.Tensor | None]] = field(default_factory=list, repr=False)

    def equivalent(self, b: int) -> tuple[float, float]:
        L = len(self.v_in[b])
        return sum(self.v_out[b]) / L, sum(self.v_in[b]) / L


# --- helpers --------------------------------------------------------------------------------


def check_ranking_layers(lm: torch.nn.Module, method: Any, dp: Any, name: str, retain: float) -> None:
    """On a hybrid decoder (Qwen3.5: linear-attention layers between full-attention ones) a method
    can rank only by a full-attention layer's rows: raise :class:`InputError` naming the layer
    and the full-attention ones otherwise. Called by ``compress`` before anything is patched."""
    kinds = compat.layer_types(lm)
    if all(k != "linear_attention" for k in kinds):
        return
    full = [i for i, k in enumerate(kinds) if k != "linear_attention"]
    where = f"{type(lm).__name__} (full-attention layers: {', '.join(map(str, full))})"
    if dp is not None:
        raise InputError(f"{name}: the decode-time stage (dp=True) hides visual keys from layers that have no keys "
                         f"on the linear-attention layers of {where}; use dp=False")
    if method is None:
        return
    for point in method.plan(10_000, len(kinds), retain):
        ranked = point.layer if point.source == "self" else point.layer + 1
        if ranked < len(kinds) and kinds[ranked] == "linear_attention":
            nearest = min(full, key=lambda f: (abs(f - ranked), f))
            raise InputError(
                f"{name}: ranks visual tokens by the attention of decoder layer {ranked}, a linear-attention layer "
                f"of {where}; only full-attention layers have attention rows: choose the method's layers so that it "
                f"ranks at one of them (the nearest is layer {nearest})"
            )


def _split_positions(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rotary positions, text positions passed to layers) from the model's position layout."""
    if pos.dim() == 3 and pos.shape[0] == 4:
        return pos[1:], pos[0]
    if pos.dim() == 3:
        return pos, None
    return pos, pos


def _join_positions(rotary: torch.Tensor, text: torch.Tensor | None, template: torch.Tensor) -> torch.Tensor:
    if template.dim() == 3 and template.shape[0] == 4:
        return torch.cat([text[None], rotary], 0)
    return rotary


# --- the language-model forward ---------------------------------------------------------------


class LMForward:
    """The replacement for ``lm.forward`` that runs the in-LLM method of ``state``. A callable
    object rather than a closure, so a deep copy of the model carries a wrapper of the copy."""

    def __init__(self, model: torch.nn.Module, lm: torch.nn.Module, state: Any, original: Any) -> None:
        self.model, self.lm, self.state, self.original = model, lm, state, original
        functools.update_wrapper(self, original)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 inputs_embeds: Any = None, use_cache: Any = None, **kwargs: Any) -> Any:
        model, lm, state, original = self.model, self.lm, self.state, self.original
        from transformers import DynamicCache

        calls: compat.LMCalls = state.lm_calls
        kv_cache = compat.pop_cache(kwargs)  # the caller's KV cache, under either spelling
        # per-visual-token streams added between the first layers (Qwen3-VL's DeepStack)
        key = state.adapter.visual_mask_key
        streams = {name: kwargs.pop(name) for name in _STREAM_ARGS if name in kwargs}
        stream_mask = kwargs.pop(key) if key is not None and key in kwargs else None
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        pending: Pending | None = state.pending
        state.pending = None  # consumed (or stale) whatever happens below
        session: Session | None = state.session
        decoding = session is not None and past > 0 and kv_cache is session.cache()
        if pending is None and not decoding:
            state.session = None
            if stream_mask is not None:
                kwargs = {**kwargs, key: stream_mask, **streams}
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, **calls.cache_kw(kv_cache),
                            **kwargs)
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = lm.config.use_cache
        if use_cache and kv_cache is None:
            kv_cache = DynamicCache(config=lm.config)
        B, q = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, past + q, dtype=torch.long, device=inputs_embeds.device)
        if isinstance(attention_mask, dict) or attention_mask.dim() != 2:
            raise InputError("in-LLM pruning needs a 2-D attention mask and a dynamic KV cache")
        if position_ids is None:
            position_ids = mask_positions(attention_mask)[:, -q:]
        if decoding:
            h = _decode(model, lm, state, session, inputs_embeds, attention_mask.long(), position_ids,
                        kv_cache, use_cache, kwargs)
        else:
            if past > 0:
                raise InputError("in-LLM pruning needs the prompt in one prefill (the cache must start empty)")
            if len(pending.layouts) and B % len(pending.layouts):
                raise RuntimeError("the prepared samples do not match the language model's batch")
            deepstack = None
            if stream_mask is not None and streams.get("deepstack_visual_embeds") is not None:
                deepstack = _Deepstack(stream_mask.bool(), streams["deepstack_visual_embeds"])
            h = _prefill(model, lm, state, pending, inputs_embeds, attention_mask.long(), position_ids,
                         kv_cache, use_cache, kwargs, deepstack)
        h = lm.norm(h)
        return compat.model_output(h, kv_cache if use_cache else None)


#: language-model arguments that carry per-visual-token streams (see ``Adapter.visual_mask_key``)
_STREAM_ARGS = ("deepstack_visual_embeds",)


class _Deepstack:
    """DeepStack levels (arXiv 2406.04334; Qwen3-VL): ``levels[j]`` ``[N, D]`` is added to the
    visual rows of the language-model input (``visual`` ``[B, L]``, rows in row-major order)
    after decoder layer ``j``. Rows are found through each row's LM-input index, so tokens
    pruned before a level's layer simply do not receive it, and kept ones receive their own."""

    def __init__(self, visual: torch.Tensor, levels: list[torch.Tensor]) -> None:
        self.visual = visual
        self.levels = levels
        self.rank = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        self.rank[visual] = torch.arange(int(visual.sum()), device=visual.device)

    def add(self, idx: int, h: torch.Tensor, mask: torch.Tensor, origin: list[torch.Tensor]) -> torch.Tensor:
        if idx >= len(self.levels):
            return h
        level = self.levels[idx]
        out = h.clone()
        for b in range(h.shape[0]):
            o = origin[b].to(self.visual.device)
            safe = o.clamp(min=0)
            rows = ((o >= 0) & mask[b].bool().to(o.device) & self.visual[b, safe]).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[b, rows] = out[b, rows] + level[self.rank[b, safe[rows]]].to(out.device, out.dtype)
        return out


def _expand(pending: Pending, B: int) -> Pending:
    n = len(pending.layouts)
    if n == B:
        return pending
    if B % n:
        raise RuntimeError(f"batch of {B} rows does not expand the {n} prepared samples")
    r = B // n
    return Pending([lay for lay in pending.layouts for _ in range(r)],
                   [w for w in pending.frame_weights for _ in range(r)])


def _prefill(model: Any, lm: Any, state: Any, pending: Pending, h: torch.Tensor, mask: torch.Tensor,
             position_ids: torch.Tensor, cache: Any, use_cache: bool, kwargs: dict[str, Any],
             deepstack: _Deepstack | None = None) -> torch.Tensor:
    method = state.inllm
    calls: compat.LMCalls = state.lm_calls
    num_layers = len(lm.layers)
    kinds = compat.layer_types(lm)
    B = h.shape[0]
    state.lm_config = lm.config
    pending = _expand(pending, B)
    layouts = list(pending.layouts)
    V0 = [int(lay.visual.numel()) for lay in layouts]
    plans = [method.plan(v, num_layers, state.retain) if method is not None and v > 0 else [] for v in V0]
    for b, plan in enumerate(plans):
        for p in plan:
            if p.keep > V0[b]:
                raise InputError(f"{state.spec.name}: the schedule keeps {p.keep} visual tokens at layer {p.layer} "
                                 f"but sample {b} has only {V0[b]}")
    record = InLLMRecord(v_in=[[] for _ in range(B)], v_out=[[] for _ in range(B)],
                         kept=[[] for _ in range(B)], recycled=[[] for _ in range(B)],
                         seq_in=[[] for _ in range(B)],
                         points=[(p.layer, p.source) for p in next((pl for pl in plans if pl), [])])
    origin = [torch.arange(h.shape[1], device=h.device) for _ in range(B)]  # LM-input index of every row entry
    session = Session(cache=(weakref.ref(cache) if cache is not None else (lambda: None)), layer_masks=[],
                      layer_shift=[], layer_visual=[])
    full_valid = mask.sum(-1)
    rotary, text_pos = _split_positions(position_ids)
    pe = lm.rotary_emb(h, rotary)
    mask_cache: dict[tuple[str, int], Any] = {}
    prepared_state = (
        [method.prepare_sample(h[b, layouts[b].visual], h[b, layouts[b].text]) if V0[b] > 0 else None
         for b in range(B)]
        if method is not None
        else None
    )
    t_score = 0.0
    for idx, layer in enumerate(lm.layers):
        key = (kinds[idx], id(mask))
        if key not in mask_cache:
            mask_cache = {k: v for k, v in mask_cache.items() if k[1] == id(mask)}
            mask_cache[key] = compat.causal_mask(lm.config, kinds[idx], h, mask, cache, idx)
        session.layer_masks.append(mask)
        session.layer_shift.append((full_valid - mask.sum(-1)).to(position_ids.dtype))
        session.layer_visual.append([lay.visual for lay in layouts])
        session.layer_origin.append([torch.where(mask[b].bool(), origin[b], -1) for b in range(B)])
        for b in range(B):
            record.v_in[b].append(int(layouts[b].visual.numel()))
            record.seq_in[b].append(int(mask[b].sum()))
        points = [next((p for p in plans[b] if p.layer == idx), None) for b in range(B)]
        self_points = [p if p is not None and p.source == "self" else None for p in points]

        def run_layer(h=h, idx=idx, layer=layer, pe=pe, text_pos=text_pos):
            return layer(h, attention_mask=mask_cache[(kinds[idx], id(mask))], position_embeddings=pe,
                         position_ids=text_pos, use_cache=use_cache, **calls.cache_kw(cache), **kwargs)

        attn: list[torch.Tensor | None] = [None] * B
        rows_req: list[torch.Tensor | None] = [None] * B
        if any(p is not None for p in self_points):
            rows_req, cap = _row_capture(method, layouts, prepared_state, mask, self_points)
            h_out = call_capturing(layer.self_attn, cap, run_layer)
            attn = [cap.result[b] if self_points[b] is not None else None for b in range(B)]
        else:
            h_out = run_layer()
        if deepstack is not None:  # part of this layer's output, before any scoring or pruning
            h_out = deepstack.add(idx, h_out, mask, origin)
        if any(p is not None and p.source == "next" for p in points) and idx + 1 < num_layers:
            start = time.perf_counter()
            nxt = lm.layers[idx + 1]
            rows_req, cap = _row_capture(method, layouts, prepared_state, mask, points, dry=True)
            x = nxt.input_layernorm(h_out)
            nxt_mask = compat.causal_mask(lm.config, kinds[idx + 1], h_out, mask, None, idx + 1)
            call_capturing(nxt.self_attn, cap, lambda: nxt.self_attn(
                hidden_states=x, attention_mask=nxt_mask, position_ids=text_pos, position_embeddings=pe,
                **calls.cache_kw(None)))
            attn = [cap.result[b] if points[b] is not None else None for b in range(B)]
            t_score += (time.perf_counter() - start) * 1000.0
        h = h_out
        state.rows_used = rows_req
        if any(p is not None for p in points):
            start = time.perf_counter()
            h, mask, position_ids, layouts, origin = _prune(
                method, state, h, mask, position_ids, layouts, origin, points, attn, pending.frame_weights,
                record, prepared_state)
            t_score += (time.perf_counter() - start) * 1000.0
            rotary, text_pos = _split_positions(position_ids)
            pe = lm.rotary_emb(h, rotary)
            mask_cache = {}
        for b in range(B):
            record.v_out[b].append(int(layouts[b].visual.numel()))
    record.score_ms = t_score
    session.dp_previous = [None] * B
    session.dp_keep = [None] * B
    session.record = record
    state.session = session if use_cache else None
    state.inllm_record = record
    if state.last is not None:
        state.last.inllm = record
    return h


def _row_capture(
    method: Any, layouts: list[SampleLayout], prepared_state: Any, mask: torch.Tensor, points: list[Any],
    dry: bool = False,
) -> tuple[list[torch.Tensor], _Capture]:
    """The query rows each sample with a prune point needs (none for the others) and the capture
    that computes their attention over the keys ``mask`` allows."""
    rows = [_rows_for(method, layouts[b], prepared_state, b) if points[b] is not None else
            torch.zeros(0, dtype=torch.long, device=mask.device) for b in range(len(layouts))]
    allowed = [allowed_rows(mask[b], rows[b], 0) for b in range(len(layouts))]
    return rows, _Capture(base="", rows=rows, allowed=allowed, dry=dry)


def _rows_for(method: InLLMMethod, layout: SampleLayout, prepared_state: Any, b: int) -> torch.Tensor:
    return method.rows(layout, prepared_state[b] if prepared_state is not None else None)


def _rope_info(config: Any) -> tuple[int, float, list[int] | None]:
    """(head_dim, rope theta, M-RoPE sections) of a language model config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    params = getattr(config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)) or 10000.0)
    section = params.get("mrope_section")
    return head_dim, theta, list(section) if section else None


def _prune(method: Any, state: Any, h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
           layouts: list[SampleLayout], origin: list[torch.Tensor], points: list[PrunePoint | None],
           attn: list[torch.Tensor | None], frame_weights: list[torch.Tensor | None], record: InLLMRecord,
           prepared_state: Any) -> tuple:
    """Keep the selected visual tokens of every sample (plus recycled ones), re-pad."""
    B, L, D = h.shape
    side = padding_side_of(mask)
    rotary, text_pos = _split_positions(position_ids)
    mrope = rotary.dim() == 3
    rows_h, rows_pos, rows_origin, new_layouts = [], [], [], []
    fca = uses_fca(method)
    for b in range(B):
        lay = layouts[b]
        valid = mask[b].bool().to(h.device)
        p = points[b]
        if p is None or attn[b] is None:
            idx = valid.nonzero(as_tuple=True)[0]
            merged = None
            keep_vis = lay.visual
        else:
            head_dim, theta, section = _rope_info(state.lm_config)
            ctx = PruneContext(layout=lay, point=p, rows=state.rows_used[b],
                               positions=rotary[:, b] if mrope else rotary[b], head_dim=head_dim, rope_theta=theta,
                               mrope_section=tuple(section) if section else None,
                               state=prepared_state[b] if prepared_state is not None else None)
            score = method.score(attn[b], ctx)
            V = int(lay.visual.numel())
            k = method.keep_bound(p.keep, V)  # the method's rule (SparseVLM: V − 1), by default V
            adaptive = method.dynamic_keep(attn[b], ctx)
            if adaptive is not None:
                k = min(int(adaptive), V)
            local = select_top(score, k, lay.frame if fca else None, frame_weights[b] if fca else None)
            keep_vis = lay.visual[local]
            drop = torch.ones(lay.visual.numel(), dtype=torch.bool, device=h.device)
            drop[local] = False
            keep_mask = valid.clone()
            keep_mask[lay.visual[drop]] = False
            idx = keep_mask.nonzero(as_tuple=True)[0]
            merged = None
            if bool(drop.any()) and k < lay.visual.numel():
                merged = method.recycle_tokens(h[b, lay.visual[drop]], score[drop])  # (features [c, D], centre [c])
                if merged is not None and merged[0].shape[0] == 0:
                    merged = None
        # assemble the new row: tokens in order, recycled ones right after the last kept visual token
        seq_h = h[b, idx]
        absorb = getattr(method, "merge_dropped", None) if p is not None and attn[b] is not None else None
        if absorb is not None and bool(drop.any()):  # the dropped tokens merge into the kept ones (HoliTom)
            seq_h = seq_h.clone()
            seq_h[torch.isin(idx, keep_vis)] = absorb(h[b, keep_vis], h[b, lay.visual[drop]])
        seq_pos = rotary[:, b, idx] if mrope else rotary[b, idx]
        seq_origin = origin[b][idx]
        new_visual_flags = torch.isin(idx, keep_vis)
        frame_of = dict(zip(lay.visual.tolist(), lay.frame.tolist()))
        new_frames = [frame_of[int(i)] for i in idx[new_visual_flags].tolist()]
        if merged is not None:
            feats, centres = merged
            dropped = lay.visual[drop]
            centre_idx = dropped[centres]
            insert_at = int((idx <= int(keep_vis.max())).sum()) if keep_vis.numel() else int((idx < int(lay.visual.min())).sum())
            cen_pos = rotary[:, b, centre_idx] if mrope else rotary[b, centre_idx]
            seq_h = torch.cat([seq_h[:insert_at], feats.to(seq_h.dtype), seq_h[insert_at:]], 0)
            if mrope:
                seq_pos = torch.cat([seq_pos[:, :insert_at], cen_pos, seq_pos[:, insert_at:]], 1)
            else:
                seq_pos = torch.cat([seq_pos[:insert_at], cen_pos, seq_pos[insert_at:]], 0)
            seq_origin = torch.cat([seq_origin[:insert_at], origin[b][centre_idx], seq_origin[insert_at:]], 0)
            flags = torch.cat([new_visual_flags[:insert_at], torch.ones(feats.shape[0], dtype=torch.bool,
                                                                        device=h.device), new_visual_flags[insert_at:]])
            new_frames = new_frames + [frame_of[int(i)] for i in centre_idx.tolist()]
            record.recycled[b].append((origin[b][centre_idx], feats.detach()))
            new_visual_flags = flags
        if p is not None:
            record.kept[b].append(origin[b][keep_vis])
            if merged is None:
                record.recycled[b].append(None)
        n = seq_h.shape[0]
        rows_h.append(seq_h)
        rows_pos.append(seq_pos)
        rows_origin.append(seq_origin)
        new_layouts.append((n, new_visual_flags, new_frames, lay))
    Lp = max(r.shape[0] for r in rows_h)
    new_h = repad(rows_h, side)
    new_mask = mask_of([r.shape[0] for r in rows_h], side, mask)
    new_rot = repad_positions(rows_pos, side)
    out_origin = list(repad(rows_origin, side, -1).unbind(0))
    out_layouts = []
    for b in range(B):
        n, flags, frames, lay = new_layouts[b]
        off = row_slot(n, Lp, side).start
        vis = flags.nonzero(as_tuple=True)[0] + off
        after = torch.arange(int(vis.max()) + 1 if vis.numel() else off, off + n, device=h.device)
        out_layouts.append(SampleLayout(visual=vis, text=after, last=off + n - 1,
                                        frame=torch.tensor(frames, dtype=torch.long, device=h.device)))
    if state.positions == "compact" and not mrope:
        new_rot = mask_positions(new_mask).to(new_rot.dtype)
    new_text = mask_positions(new_mask).to(new_rot.dtype) if text_pos is not None else None
    if text_pos is not None and not mrope:
        new_text = new_rot
    return new_h, new_mask, _join_positions(new_rot, new_text, position_ids), out_layouts, out_origin


def _decode(model: Any, lm: Any, state: Any, session: Session, h: torch.Tensor, mask: torch.Tensor,
            position_ids: torch.Tensor, cache: Any, use_cache: bool, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decode call (``q`` new tokens): every layer's key mask grows by the new columns."""
    dp = state.dp
    calls: compat.LMCalls = state.lm_calls
    B, q = h.shape[:2]
    new_cols = mask[:, -q:]
    kinds = compat.layer_types(lm)
    dp_keep: list[torch.Tensor | None] = [None] * B
    rotary_cache: dict[tuple[int, ...], Any] = {}
    for idx, layer in enumerate(lm.layers):
        m = torch.cat([session.layer_masks[idx], new_cols.to(session.layer_masks[idx].dtype)], -1)
        session.layer_masks[idx] = m
        step_mask = m
        if dp is not None and idx >= dp.layer and any(k is not None for k in dp_keep):
            step_mask = m.clone()
            for b, keep in enumerate(dp_keep):
                if keep is not None:
                    step_mask[b, _map_keep(session, idx, b, keep, dp)] = 0
        shift = session.layer_shift[idx]
        pos = position_ids
        if state.positions == "compact" and bool(shift.any()):
            rot, text = _split_positions(position_ids)
            pos = _join_positions(rot - shift[:, None], text - shift[:, None] if text is not None else None,
                                  position_ids)
        rotary, text_pos = _split_positions(pos)
        key = tuple(shift.tolist()) if state.positions == "compact" else ()
        if key not in rotary_cache:
            rotary_cache[key] = lm.rotary_emb(h, rotary)
        pe = rotary_cache[key]
        mask_arg = compat.causal_mask(lm.config, kinds[idx], h, step_mask, cache, idx)

        def run(h=h, layer=layer, mask_arg=mask_arg, pe=pe, text_pos=text_pos):
            return layer(h, attention_mask=mask_arg, position_embeddings=pe, position_ids=text_pos,
                         use_cache=use_cache, **calls.cache_kw(cache), **kwargs)

        if dp is not None and idx == dp.layer - 1:
            offset = cache.get_seq_length(idx)
            rows = [torch.tensor([q - 1], device=h.device) for _ in range(B)]
            cap = _Capture(base="", rows=rows, allowed=[allowed_rows(step_mask[b], rows[b], offset) for b in range(B)])
            h = call_capturing(layer.self_attn, cap, run)
            record = session.record
            record.dp_steps += 1
            for b in range(B):
                keep, a = dp.step(cap.result[b], session.layer_visual[idx][b], session.dp_previous[b],
                                  session.dp_keep[b])
                session.dp_previous[b] = a
                session.dp_keep[b] = keep
                dp_keep[b] = keep
            if any(k is not None for k in dp_keep):
                record.dp_pruned_steps += 1
            origin = session.layer_origin[idx]
            record.dp_history.append([origin[b][k] if k is not None else None for b, k in enumerate(dp_keep)])
        else:
            h = run()
    return h


def _map_keep(session: Session, idx: int, b: int, keep: torch.Tensor, dp: Any) -> torch.Tensor:
    """Visual key indices to hide at layer ``idx`` (>= ``dp.layer``) given the visual keys of
    layer ``dp.layer − 1`` to keep. The layers hold the same visual tokens in the same order
    (no in-LLM prune point lies between them), so they correspond by rank."""
    src = session.layer_visual[dp.layer - 1][b]
    dst = session.layer_visual[idx][b]
    if src.numel() != dst.numel():
        raise InputError("dycoke's decode-time pruning cannot be combined with an in-LLM prune point before it")
    return dst[~torch.isin(src, keep)]
