"""Install tokensieve on a loaded model: wrap its ``forward`` and ``generate``.

Correct by construction: a compressed prefill is turned into an ordinary call on a shorter
sequence. ``generate`` prunes *before* generation starts and hands the language model
``inputs_embeds``, the pruned attention mask and the gathered position ids, so the KV cache,
the mask, ``cache_position`` and every decode position live in pruned coordinates from the
first step on — for any attention kernel and batch size. ``generate`` continues each row's
positions at ``last + 1``; with ``positions="preserve"`` that is exactly the position the
unpruned model would use. The returned sequences are the caller's original ``input_ids``
followed by the new tokens, as without compression.

This module (with :mod:`tokensieve.runtime.trim`) is the only code that relies on how
transformers passes arguments between ``generate`` and ``forward``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..methods.base import MethodSpec, Selection, Selector
from ..methods.budget import fca_budget
from ..methods.encoder import choose_frames
from ..methods.inllm import SampleLayout, uses_fca
from ..methods.signals import question_positions
from ..models.base import Adapter, Prepared
from . import compat
from .inllm import LMForward, Pending
from .repad import mask_positions, repad, row_slot
from ._missing import MISSING as _MISSING
from .cache import FeatureCache
from .tower import TowerMerge
from .trim import Trimmed, TrimStats, trim

STATE_ATTR = "_tokensieve_state"
#: optional call argument: ``[B, L]`` bool mask of the question tokens, for methods that use text
QUESTION_KEY = "question_mask"
_PASS_THROUGH_MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", QUESTION_KEY)


@dataclass
class TrimState:
    """Everything tokensieve attached to one model; removed by :func:`uninstall`."""

    spec: MethodSpec
    selector: Selector
    retain: float
    positions: str
    adapter: Adapter
    options: dict[str, Any]
    saved: dict[str, Any] = field(default_factory=dict)
    last: TrimStats | None = None
    calls: int = 0
    #: in-LLM method (prunes between decoder layers) and DyCoke's decode-time stage, if any
    inllm: Any = None
    dp: Any = None
    #: in-LLM bookkeeping: what the next prefill needs, the running generation, the last record
    pending: Any = None
    session: Any = None
    inllm_record: Any = None
    rows_used: Any = None
    lm_config: Any = None
    #: how the in-LLM loop calls this transformers release's layers (:mod:`.compat`)
    lm_calls: Any = None
    #: one compressed call at a time: per-call bookkeeping (pending, session, rows) lives here,
    #: so concurrent calls from several threads are serialised, never interleaved
    lock: Any = field(default_factory=threading.RLock, repr=False)
    #: per-visual-token inputs of the next language-model prefill, gathered with the kept tokens
    #: (Qwen3-VL's DeepStack levels and visual-position mask; see ``Adapter.visual_mask_key``)
    lm_extras: Any = None
    #: why the last compressed call failed (``stats`` says so instead of describing an older call)
    last_error: str | None = None
    #: per thread (``threading.get_ident()``): the statistics of that thread's last compressed
    #: call, or the one-line reason it failed
    by_thread: dict[int, Any] = field(default_factory=dict, repr=False)
    #: the encoder stage (:class:`~tokensieve.methods.encoder.EncoderStage`): which frames of each
    #: video the vision tower encodes; ``None``: all of them
    encoder: Any = None
    #: token merging inside the vision tower (:class:`~tokensieve.methods.tome.MergeSpec`) and the
    #: tower's layout; the installed :class:`~.tower.TowerMerge` while compressed
    tower_merge: Any = None
    tower_layout: Any = None
    tower: Any = None
    #: the video-feature cache's bound (MB) and the installed :class:`~.cache.FeatureCache`
    cache_mb: Any = None
    cache: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "TrimState":
        """A deep copy of a compressed model is compressed the same way and independent: its
        wrappers and this state are copied with it; per-call bookkeeping starts empty."""
        out = object.__new__(type(self))
        memo[id(self)] = out
        skip = {"lock", "pending", "session", "rows_used", "last", "inllm_record", "last_error", "by_thread",
                "lm_extras"}
        for name, value in vars(self).items():
            if name not in skip:
                setattr(out, name, copy.deepcopy(value, memo))
        out.lock = threading.RLock()
        out.by_thread = {}
        out.pending = out.session = out.rows_used = out.last = out.inllm_record = out.last_error = None
        out.lm_extras = None
        return out

    def __reduce__(self) -> Any:
        raise InputError(
            f"a model compressed with {self.spec.name!r} cannot be pickled (its forward and generate are "
            "wrapped); call tokensieve.restore(model) first, pickle or save it, and compress again after loading"
        )

    @property
    def uses_lm_loop(self) -> bool:
        return self.inllm is not None or self.dp is not None


def get_state(model: object) -> TrimState | None:
    return getattr(model, STATE_ATTR, None) if isinstance(model, torch.nn.Module) else None


def _bind(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional + keyword arguments of a call to ``fn`` as one flat dict."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _needs(state: TrimState) -> tuple[bool, bool]:
    if state.selector is None:  # in-LLM methods read what they need inside the model
        return False, False
    return state.spec.signals(state.selector)


def _questions(model: torch.nn.Module, state: TrimState, prepared: Prepared, mask: Any) -> list[torch.Tensor]:
    """Question token positions per sample: from ``question_mask`` or the adapter's rule."""
    ids = prepared.input_ids
    valid = prepared.attention_mask.bool()
    out = []
    for b in range(ids.shape[0]):
        if mask is not None:
            q = (mask[b].bool() & valid[b]).nonzero(as_tuple=True)[0]
        else:
            visual = torch.zeros_like(valid[b])
            for seg in prepared.segments[b]:
                visual[seg.positions] = True
                visual[seg.structural] = True
            q = question_positions(ids[b], valid[b], visual, state.adapter.special_ids(model), state.adapter.end_ids(model))
        if q.numel() == 0:
            raise InputError(
                f"method {state.spec.name!r} needs the question text, but sample {b} of this "
                f"{type(model).__name__} call has no question tokens (no text after or before its visual "
                "inputs); pass question_mask=[B, L] bool marking the question tokens"
            )
        out.append(q)
    return out


def _pad_id(model: torch.nn.Module) -> int:
    for cfg in (getattr(model, "generation_config", None), getattr(model.config, "text_config", None), model.config):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pad, int):
            return pad
    return 0


def _on_device(model: torch.nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
    """Token-level tensors on the model's device (transformers' generate moves them itself)."""
    device = getattr(model, "device", None)
    if device is None:
        return kw
    keys = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", QUESTION_KEY, "labels")
    return {k: (v.to(device) if k in keys and isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _run_trim(model: torch.nn.Module, state: TrimState, kw: dict[str, Any]) -> tuple[Prepared, Trimmed]:
    kw = _on_device(model, kw)
    needs_text, needs_attention = _needs(state)
    if needs_attention and state.adapter.fallback_encoder_signal is None:
        raise InputError(
            f"method {state.spec.name!r} needs vision-encoder attention, which {type(model).__name__} "
            "cannot give (no summary token, pooling head or stand-in for this family)"
        )
    question_mask = kw.get(QUESTION_KEY)
    ids = state.adapter.require_ids(kw)
    if question_mask is not None and (
        not isinstance(question_mask, torch.Tensor) or tuple(question_mask.shape) != tuple(ids.shape)
    ):
        raise InputError(f"{QUESTION_KEY} must be a bool tensor shaped like input_ids {tuple(ids.shape)}")
    prepared = state.adapter.prepare(model, kw, encoder_attention=needs_attention, frame_plan=_frame_plan(state))
    questions = _questions(model, state, prepared, question_mask) if needs_text else None
    user_pos = kw.get("position_ids")
    if user_pos is not None:
        if prepared.style == "mrope":
            if user_pos.dim() == 2:
                user_pos = user_pos[None].expand(3, -1, -1)
            prepared.position_ids = user_pos[-3:]
        else:
            prepared.position_ids = user_pos.expand(prepared.input_ids.shape[0], -1)
    trimmed = trim(
        prepared,
        state.selector if state.selector is not None else KeepAll(),
        state.retain,
        state.positions,
        state.spec.name,
        questions=questions,
        want_attention=needs_attention,
        pad_id=_pad_id(model),
    )
    if state.tower is not None:
        trimmed.stats.encoder_tokens = list(state.tower.merged_counts)
    if state.cache is not None:
        trimmed.stats.encoder_cache = state.cache.summary()
    state.adapter.set_rope_deltas(model, trimmed.rope_deltas)
    state.lm_extras = _lm_extras(state.adapter, prepared, trimmed)
    trimmed.stats.lm_shape = lm_shape(model)
    state.last = trimmed.stats
    state.last_error = None
    state.by_thread[threading.get_ident()] = trimmed.stats
    state.calls += 1
    if state.uses_lm_loop:
        state.pending = pending_layouts(prepared, trimmed, state)
        state.session = None
    return prepared, trimmed


def _frame_plan(state: TrimState) -> Any:
    """The adapter's frame plan for the state's encoder stage (``None`` without one): how many token
    frames of a video to encode from its grid and the options alone, then which from its pixels."""
    stage = state.encoder
    if stage is None:
        return None
    retain, absolute = state.retain, state.selector is not None  # in-LLM methods prune what arrives

    def plan(signatures: torch.Tensor, per_frame: int) -> torch.Tensor:
        T = int(signatures.shape[0])
        return choose_frames(signatures, stage.frames_for(T, per_frame, retain, check=absolute), stage.policy)

    return plan


def _lm_extras(adapter: Adapter, prepared: Prepared, trimmed: Trimmed) -> dict[str, Any] | None:
    """The kept tokens' rows of the adapter's per-visual-token streams and their visual-position
    mask over the sequence the language model receives (``None`` when the family has none)."""
    streams = prepared.rest.get("visual_streams")
    if adapter.visual_mask_key is None or not streams:
        return None
    rank = prepared.rest["visual_rank"]
    ranks = [rank[b, keep] for b, keep in enumerate(trimmed.stats.emitted)]
    mask = repad([r >= 0 for r in ranks], trimmed.padding_side, False, trimmed.attention_mask.shape[1])
    index = torch.cat([r[r >= 0] for r in ranks])
    out: dict[str, Any] = {adapter.visual_mask_key: mask}
    for name, rows in streams.items():
        out[name] = [level[index] for level in rows]
    return out


class _LMExtras:
    """Wraps the language model's ``forward``: the prefill call gets the gathered per-visual-token
    inputs (:func:`_lm_extras`), which the top-level forward does not pass when it is given
    ``inputs_embeds``. Later calls (decoding) pass through unchanged."""

    def __init__(self, state: "TrimState", original: Any) -> None:
        functools.update_wrapper(self, original, updated=())  # not the wrapped object's own attributes
        self.state = state
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        extras = self.state.lm_extras
        key = self.state.adapter.visual_mask_key
        embeds = kwargs.get("inputs_embeds")
        if extras is not None and kwargs.get(key) is None and embeds is not None \
                and embeds.shape[1] == extras[key].shape[1]:
            self.state.lm_extras = None  # the prefill only
            device = embeds.device
            mask = extras[key]
            reps = embeds.shape[0] // max(1, mask.shape[0])
            counts = mask.sum(-1).tolist()
            kwargs = {**kwargs, key: mask.repeat_interleave(reps, dim=0).to(device) if reps > 1 else mask.to(device)}
            for name, value in extras.items():
                if name != key:
                    if reps > 1:  # generate repeats each sample (beams, several sequences): so do its rows
                        value = [torch.cat([c for c in v.split(counts) for _ in range(reps)]) for v in value]
                    kwargs[name] = [v.to(device, embeds.dtype) for v in value]
        return self.original(*args, **kwargs)


def model_position_ids(trimmed: Trimmed, style: str) -> torch.Tensor:
    """Position ids in the layout the model's own ``generate`` would pass.

    M-RoPE models get ``[4, B, L']``: a leading row of plain text positions (used only for
    mask construction) then the three rotary rows.
    """
    if style != "mrope":
        return trimmed.position_ids
    text = mask_positions(trimmed.attention_mask)
    return torch.cat([text[None].to(trimmed.position_ids.dtype), trimmed.position_ids], dim=0)


def _cache_length(past: Any) -> int:
    if past is None:
        return 0
    get_len = getattr(past, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    return 0


class _Wrapper:
    """A call wrapper installed on one model instance. Not a closure: ``copy.deepcopy`` of the
    model copies it with the model, so the copy's wrapper calls the copy (bound methods are
    rebound through the copy's memo)."""

    def __init__(self, model: torch.nn.Module, state: TrimState, original: Any) -> None:
        self.model = model
        self.state = state
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        with state.lock:
            try:
                return self.call(*args, **kwargs)
            except BaseException as exc:
                # statistics describe a call that finished, never a failed one
                reason = (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]
                state.last = None
                state.last_error = reason
                state.by_thread[threading.get_ident()] = reason
                raise

    def call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class _Forward(_Wrapper):
    def call(self, *args: Any, **kwargs: Any) -> Any:
        model, state, original = self.model, self.state, self.original
        kw = _bind(original, args, kwargs)
        if not state.adapter.has_visual(kw):
            kw.pop(QUESTION_KEY, None)
            return original(**kw)
        if _cache_length(compat.cache_of(kw)) > 0:
            raise InputError(
                "tokensieve compresses visual inputs in the prefill only; this call passes pixel inputs "
                "together with a non-empty KV cache"
            )
        if state.uses_lm_loop and kw.get("labels") is not None:
            raise InputError(f"labels are not supported with the in-LLM method {state.spec.name!r} "
                             "(the sequence shrinks inside the model)")
        _check_outputs(state, kw)
        try:
            prepared, trimmed = _run_trim(model, state, kw)
        except BaseException:
            state.pending = None
            raise
        new_kw = {k: v for k, v in kw.items() if k not in state.adapter.visual_keys and k not in _PASS_THROUGH_MODEL_KEYS}
        labels = new_kw.get("labels")
        if labels is not None:
            new_kw["labels"] = _gather_rows(labels, trimmed, fill=-100)
        new_kw.update(
            inputs_embeds=trimmed.inputs_embeds,
            attention_mask=trimmed.attention_mask,
            position_ids=model_position_ids(trimmed, prepared.style),
        )
        del prepared, trimmed  # the full-length inputs are not needed while the model runs
        try:
            return original(**new_kw)
        finally:
            state.pending = None
            state.lm_extras = None


def _check_outputs(state: TrimState, kw: dict[str, Any]) -> None:
    """In-LLM methods run their own layer loop, which returns no per-layer outputs: refuse to
    return ``None`` where the caller asked for them."""
    if not state.uses_lm_loop:
        return
    gen = kw.get("generation_config")
    for name in ("output_hidden_states", "output_attentions"):
        asked = kw.get(name)
        if asked is None and gen is not None:
            asked = getattr(gen, name, None)
        if asked:
            raise InputError(f"{name}=True is not supported with the in-LLM method {state.spec.name!r} "
                             "(its layer loop shrinks the sequence between layers)")


def _gather_rows(t: torch.Tensor, trimmed: Trimmed, fill: int) -> torch.Tensor:
    """``t`` ``[B, L]`` (e.g. labels) gathered like the tokens and re-padded like them."""
    return repad([t[b, keep] for b, keep in enumerate(trimmed.stats.emitted)], trimmed.padding_side, fill,
                 width=trimmed.attention_mask.shape[1])


def _resolve_lengths(model: torch.nn.Module, kw: dict[str, Any], prompt_len: int) -> None:
    """Express length limits as new-token counts: the prompt the language model sees is shorter.

    ``max_length`` / ``min_length`` (from the call or the generation config) count the
    caller's prompt; they become ``max_new_tokens`` / ``min_new_tokens``. When neither is set,
    transformers' own default (a fixed number of new tokens) applies unchanged.
    """
    config = kw.get("generation_config") or getattr(model, "generation_config", None)
    asked = kw.get("max_length")
    if asked is not None and kw.get("max_new_tokens") is None and int(asked) <= prompt_len:
        raise InputError(
            f"max_length={asked} leaves no room for new tokens after the {prompt_len}-token prompt "
            "(max_length counts the prompt); raise max_length or pass max_new_tokens"
        )
    if kw.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        max_length = kw.pop("max_length", None)
        if max_length is None:
            max_length = getattr(config, "max_length", None)
        if max_length is not None:
            kw["max_new_tokens"] = max(1, int(max_length) - prompt_len)
    else:
        kw.pop("max_length", None)
    min_length = kw.pop("min_length", None)
    if min_length is None:
        min_length = getattr(config, "min_length", None) or None
    if min_length and kw.get("min_new_tokens") is None and getattr(config, "min_new_tokens", None) is None:
        kw["min_new_tokens"] = max(0, int(min_length) - prompt_len)
        kw["min_length"] = 0


def _check_generate_kwargs(model: torch.nn.Module, state: TrimState, kw: dict[str, Any]) -> None:
    """Reject generation settings the compressed path cannot honour, before anything runs."""
    config = kw.get("generation_config") or getattr(model, "generation_config", None)
    if kw.get("prefill_chunk_size") is not None or getattr(config, "prefill_chunk_size", None):
        raise InputError("prefill_chunk_size is not supported with tokensieve: the prompt is compressed in one prefill")
    if state.uses_lm_loop:
        impl = kw.get("cache_implementation") or getattr(config, "cache_implementation", None)
        past = compat.cache_of(kw)
        if impl not in (None, "dynamic") or (past is not None and getattr(past, "is_compileable", False)):
            raise InputError(
                f"method {state.spec.name!r} prunes inside the language model, which needs a dynamic KV cache "
                f"(per-layer lengths differ); got cache_implementation={impl!r}"
            )
    if state.dp is not None:
        beams = kw.get("num_beams") or getattr(config, "num_beams", 1) or 1
        if int(beams) > 1:
            raise InputError("dycoke's decode-time stage (dp=True) does not support beam search (num_beams > 1)")


class _Generate(_Wrapper):
    def call(self, *args: Any, **kwargs: Any) -> Any:
        model, state, original = self.model, self.state, self.original
        kw = _bind(original, args, kwargs)
        if "inputs" in kw:
            inputs = kw.pop("inputs")
            if inputs is not None:
                kw.setdefault("input_ids", inputs)
        if not state.adapter.has_visual(kw):
            kw.pop(QUESTION_KEY, None)
            return original(**kw)
        if _cache_length(compat.cache_of(kw)) > 0:
            raise InputError("tokensieve cannot continue generation from a cache when new pixel inputs are given")
        input_ids = state.adapter.require_ids(kw)
        _check_generate_kwargs(model, state, kw)
        _check_outputs(state, kw)
        try:
            prepared, trimmed = _run_trim(model, state, kw)
            gen_kw = {k: v for k, v in kw.items()
                      if k not in state.adapter.visual_keys and k not in _PASS_THROUGH_MODEL_KEYS}
            _resolve_lengths(model, gen_kw, input_ids.shape[1])
            # the kept token ids go along with the embeddings, so logits processors that look at
            # the prompt (repetition penalty, ...) see the same tokens as without compression
            call = dict(
                input_ids=trimmed.input_ids,
                inputs_embeds=trimmed.inputs_embeds,
                attention_mask=trimmed.attention_mask,
                position_ids=model_position_ids(trimmed, prepared.style),
            )
            pruned_len = trimmed.input_ids.shape[1]
            del prepared, trimmed  # the full-length inputs are not needed while the model runs
            out = original(**call, **gen_kw)
        finally:
            state.pending = None
            state.lm_extras = None
            state.session = None  # the generation is over: do not keep its KV cache alive
        return _prepend_prompt(out, input_ids, pruned_len)


def _prepend_prompt(out: Any, input_ids: torch.Tensor, pruned_len: int) -> Any:
    """Replace the pruned prompt in front of the generated ids by the caller's prompt ids
    (what an unpatched model returns)."""

    def fix(seqs: torch.Tensor) -> torch.Tensor:
        reps = seqs.shape[0] // input_ids.shape[0]
        prompt = input_ids.repeat_interleave(reps, dim=0) if reps > 1 else input_ids
        return torch.cat([prompt.to(seqs.device), seqs[:, pruned_len:]], dim=-1)

    if isinstance(out, torch.Tensor):
        return fix(out)
    if hasattr(out, "sequences") and isinstance(out.sequences, torch.Tensor):
        out.sequences = fix(out.sequences)
    return out


def lm_shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(hidden, MLP width, key/value width, layers) of the model's language model."""
    cfg = getattr(model.config, "text_config", model.config)
    d = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    return d, int(cfg.intermediate_size), kv, int(cfg.num_hidden_layers)


class KeepAll:
    """Selector that keeps every token (in-LLM methods decide later, inside the model)."""

    keeps_all = True  # with an encoder stage: every encoded token, whatever the retain

    def select(self, x: torch.Tensor, retain: float, context: Any = None) -> Selection:
        T, M, _ = x.shape
        return Selection(keep=torch.arange(T * M, device=x.device),
                         frame_counts=torch.full((T,), M, dtype=torch.long))


def pending_layouts(prepared: Prepared, trimmed: Trimmed, state: TrimState) -> Pending:
    """Where the visual tokens sit in the sequence the language model receives, per sample."""
    B, Lp = trimmed.attention_mask.shape
    fca = uses_fca(state.inllm) if state.inllm is not None else False
    layouts, weights = [], []
    for b in range(B):
        keep = trimmed.keep[b]
        n = keep.numel()
        off = row_slot(n, Lp, trimmed.padding_side).start
        slot = torch.full((prepared.input_ids.shape[1],), -1, dtype=torch.long, device=keep.device)
        slot[trimmed.stats.emitted[b]] = torch.arange(n, device=keep.device)  # where each kept position sits
        vis, frames, w = [], [], []
        frame_base = 0
        total = sum(seg.num_frames * seg.tokens_per_frame for seg in prepared.segments[b])
        for seg in prepared.segments[b]:
            T, M = seg.num_frames, seg.tokens_per_frame
            kept = torch.isin(seg.positions, keep)
            local = kept.nonzero(as_tuple=True)[0]
            vis.append(slot[seg.positions[local]] + off)
            frames.append(local // M + frame_base)
            if fca:
                x = prepared.inputs_embeds[b, seg.positions].reshape(T, M, -1)
                if seg.encoded_frames is not None:  # the frame weights of the frames that were encoded
                    enc = seg.encoded_frames.to(x.device)
                    wt = torch.zeros(T, dtype=torch.float64, device=x.device)
                    wt[enc] = fca_budget(x[enc], state.retain)[1].to(torch.float64)
                else:
                    _, wt = fca_budget(x, state.retain)
                w.append(wt.to(torch.float64) * (T * M) / max(total, 1))
            frame_base += T
        visual = torch.cat(vis) if vis else keep.new_zeros(0)
        order = torch.argsort(visual)
        visual = visual[order]
        frame = torch.cat(frames)[order] if frames else keep.new_zeros(0)
        start = int(visual.max()) + 1 if visual.numel() else off
        text = torch.arange(start, off + n, device=keep.device)
        layouts.append(SampleLayout(visual=visual, text=text, last=off + n - 1, frame=frame))
        weights.append(torch.cat(w) if w else None)
    return Pending(layouts, weights)


def check_transformers(model: torch.nn.Module, adapter: Adapter, in_llm: bool) -> Any:
    """Refuse a transformers release (or, for the in-LLM loop, decoder layers) the runtime was not
    written for; return how to call the layers (``None`` for pre-LLM methods)."""
    compat.check_version()
    return compat.check_language_model(adapter.language_model(model)) if in_llm else None


def install(model: torch.nn.Module, state: TrimState) -> None:
    """Wrap ``model.forward`` and ``model.generate`` (and, for in-LLM methods, the language
    model's ``forward``); the caller has validated everything."""
    for name in ("forward", "generate"):
        state.saved[name] = model.__dict__.get(name, _MISSING)
    originals = {"forward": model.forward, "generate": model.generate}
    setattr(model, STATE_ATTR, state)
    if state.tower_merge is not None:
        state.tower = TowerMerge(state.tower_layout, state.tower_merge)
    if state.cache_mb is not None:
        state.cache = FeatureCache(model.model, state.cache_mb)
    model.forward = _Forward(model, state, originals["forward"])  # type: ignore[method-assign]
    model.generate = _Generate(model, state, originals["generate"])  # type: ignore[method-assign]
    if state.uses_lm_loop or state.adapter.visual_mask_key is not None:
        lm = state.adapter.language_model(model)
        state.saved["lm_forward"] = lm.__dict__.get("forward", _MISSING)
        forward = lm.forward
        if state.uses_lm_loop:
            forward = LMForward(model, lm, state, forward)
        if state.adapter.visual_mask_key is not None:
            forward = _LMExtras(state, forward)
        lm.forward = forward  # type: ignore[method-assign]


def uninstall(model: torch.nn.Module) -> None:
    """Undo :func:`install` exactly (earlier instance-level wrappers, e.g. accelerate hooks, come back)."""
    state = get_state(model)
    if state is None:
        return
    for name in ("forward", "generate"):
        prev = state.saved.get(name, _MISSING)
        if name in model.__dict__:
            del model.__dict__[name]
        if prev is not _MISSING:
            model.__dict__[name] = prev
    if "lm_forward" in state.saved:
        lm = state.adapter.language_model(model)
        lm.__dict__.pop("forward", None)
        if state.saved["lm_forward"] is not _MISSING:
            lm.__dict__["forward"] = state.saved["lm_forward"]
    if state.tower is not None:
        state.tower.remove()
        state.tower = None
    if state.cache is not None:
        state.cache.remove()
        state.cache = None
    state.pending = state.session = state.lm_extras = None
    state.adapter.set_rope_deltas(model, None)  # type: ignore[arg-type]
    delattr(model, STATE_ATTR)
