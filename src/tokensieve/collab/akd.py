"""AKD: adapter-based knowledge distillation on the cloud (CD-CCA, arXiv 2312.16279 §3.3).

The cloud keeps a copy of the device model with adapters — LoRA from `peft
<https://github.com/huggingface/peft>`_ on the language model's and the projector's linear
layers, plus norm and bias tuning — and trains only those on the samples the device uplinked,
with a larger, frozen teacher that shares the device's vision encoder and so reads the very
same uplinked tokens. Three terms (``specs/cdcca.md`` §3.1), each with weight 1:

* **L_CE** — cross-entropy of the student's answer tokens against the teacher's greedy answer
  (the pseudo-label) and its end-of-turn token.
* **L_token** — QueryKD between the uplinked tokens through each model's *own* projector.
* **L_feature** — QueryKD between the two models' final normed hidden states over the same
  token sequence (the teacher's detached), per sample over its real positions.

QueryKD(y_s, y_t) with y ``[B, L, C]``: both to ``[B, C, L]``; a 1×1 ``Conv1d`` (the
``align_module``, trained, used only for distillation and never shipped) maps the student's
channels to the teacher's; ``MSE(ŷ_s, y_t)`` plus, for each of the 3 detail bands of a
``db6`` discrete wavelet transform along the token axis (zero padding, as the reference's
transform), the mean absolute difference (the approximation band is ignored). The transform is
`ptwt <https://github.com/v0lta/PyTorch-Wavelet-Toolbox>`_ (differentiable, PyWavelets'
conventions).

Beside the paper's terms, replayed source clips (``Sample.distil=False``, the cloud's own
labelled data; :mod:`tokensieve.collab.rounds`) are learnt with L_CE on their true answers and
**L_anchor**: for the input embeddings and each decoder layer's output, the mean squared
difference from the student as it was when the fit began (a frozen copy: the device's current
weights), relative to that copy's mean square, averaged over the layers — learning without
forgetting (Li & Hoiem, arXiv 1606.09282) on features rather than outputs, so that what the
device knew on the source domain stays where it was (``AKDConfig.anchor``).

The trainable set is exactly: LoRA A/B, every norm weight and every bias outside the vision
encoder (which both models share and nobody trains), and the alignment convs. Only the first
three reach the device (:mod:`tokensieve.collab.dwc`: ``norm | bias | lora``, never
``align_module``).

Hyper-parameters follow the reference (3 epochs, warm-up 0.2 epoch, cosine to a floor, gradient
clip 2, weight decay 0.02) except where the model size says otherwise: the reference's LoRA
rank 16 and learning rate 3e-5 are for a 7B model; the embedded models are ~10⁵× smaller, and
rank 4 on the attention and projector layers / 2e-3 (floor 2e-4) is what a whole update fits in
(1% of the model, int4) and learns with (``AKDConfig``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import dwc

__all__ = [
    "AKDConfig",
    "Distiller",
    "QueryKD",
    "Sample",
    "add_adapters",
    "adapter_names",
    "query_kd",
    "wavelet_details",
]

#: Linear layers that get LoRA: the language model's attention projections and the multimodal
#: projector (the "query adapters" of the reference sit on its cross-modal side). The MLPs are
#: left out so that a whole update fits the downlink budget (1% of the model) in int4.
LORA_TARGETS = (
    r".*(language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj|multi_modal_projector\.linear_[12])"
)
#: Parameters nobody trains: the shared vision encoder.
FROZEN = re.compile(r"vision_tower|vision_model|visual\.")


@dataclass
class AKDConfig:
    """AKD settings (see the module docstring for the defaults' provenance)."""

    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (reference: 16 on a 7B model)"})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale alpha/rank)"})
    lora_targets: str = field(default=LORA_TARGETS, metadata={"help": "regex of the linear layers with LoRA"})
    epochs: int = field(default=4, metadata={"help": "passes over the uplinked samples (reference: 3)"})
    batch_size: int = field(default=8, metadata={"help": "samples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=2e-4, metadata={"help": "cosine floor"})
    warmup: float = field(default=0.2, metadata={"help": "linear warm-up, in epochs"})
    clip_grad: float = field(default=2.0, metadata={"help": "gradient-norm clip"})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay"})
    ce: bool = field(default=True, metadata={"help": "L_CE on the pseudo-labels"})
    token_kd: bool = field(default=True, metadata={"help": "L_token (QueryKD on the projected uplinked tokens)"})
    feature_kd: bool = field(default=True, metadata={"help": "L_feature (QueryKD on the final normed hidden states)"})
    token_norm: bool = field(default=True, metadata={
        "help": "layer-normalise (no affine) both projections before L_token, as the reference's projector "
                "(Linear + LayerNorm) does; LLaVA's projector has no norm and its outputs are ~100x larger"})
    anchor: float = field(default=5.0, metadata={
        "help": "weight of L_anchor on replayed samples (distil=False): keep every decoder hidden state where it "
                "was when the fit began (relative MSE against a frozen copy; learning without forgetting); 0: off"})
    wavelet: str = field(default="db6", metadata={"help": "wavelet of the frequency term"})
    levels: int = field(default=3, metadata={"help": "wavelet levels (detail bands compared)"})
    wavelet_mode: str = field(default="zero", metadata={"help": "boundary mode of the transform"})
    seed: int = field(default=0, metadata={"help": "shuffling and alignment-conv initialisation seed"})

    def __post_init__(self) -> None:
        for name in ("lora_rank", "epochs", "batch_size", "levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"AKD {name} must be a positive integer, got {value!r}")
        for name in ("lr", "min_lr", "warmup", "clip_grad", "weight_decay", "lora_alpha", "anchor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"AKD {name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.clip_grad <= 0:
            raise InputError(f"AKD lr and clip_grad must be > 0, got lr={self.lr!r} clip_grad={self.clip_grad!r}")
        try:
            re.compile(self.lora_targets)
        except (re.error, TypeError) as exc:
            raise InputError(f"AKD lora_targets is not a regular expression: {exc}") from None
        if self.min_lr > self.lr:
            raise InputError(f"AKD min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not (self.ce or self.token_kd or self.feature_kd):
            raise InputError("AKD needs at least one of the terms ce, token_kd, feature_kd")
        import pywt

        if self.wavelet not in pywt.wavelist(kind="discrete"):
            raise InputError(f"unknown discrete wavelet {self.wavelet!r} (PyWavelets names, e.g. 'db6')")

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# -- adapters ----------------------------------------------------------------------------------


def add_adapters(model: torch.nn.Module, cfg: AKDConfig | None = None) -> torch.nn.Module:
    """``model`` (in place) with LoRA on :data:`LORA_TARGETS` through ``peft``; returns the
    transformers model itself (the LoRA layers live inside it), not a ``PeftModel`` wrapper.

    LoRA's B starts at zero, so the model computes exactly what it did; a device and the cloud's
    copy add the same adapters and then share one trainable state (:func:`adapter_names`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = cfg or AKDConfig()
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise InputError("this model already has LoRA adapters")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                        target_modules=cfg.lora_targets, bias="none")
    # The seeded generator makes LoRA A (random) identical on every side that adds adapters.
    with _seeded(cfg.seed):
        try:
            inject_adapter_in_model(config, model)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            raise InputError(f"no linear layer of this model matches the LoRA targets {cfg.lora_targets!r}: {exc}") from None
    return model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's generators for a block and restore them after (CPU and any CUDA devices)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The trainable set AKD updates and DWC ships: LoRA, norms and biases outside the vision encoder."""
    return [n for n in dwc.trainable_names(n for n, _ in model.named_parameters()) if not FROZEN.search(n)]


def _set_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    names = set(adapter_names(model))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    return params


# -- losses ------------------------------------------------------------------------------------


def wavelet_details(x: torch.Tensor, wavelet: str = "db6", levels: int = 3, mode: str = "zero") -> list[torch.Tensor]:
    """The ``levels`` detail bands (coarsest first) of a DWT of ``x`` ``[..., L]`` along its last axis."""
    import ptwt

    coeffs = ptwt.wavedec(x, wavelet, mode=mode, level=levels, axis=-1)
    return list(coeffs[1:])


def query_kd(student: torch.Tensor, teacher: torch.Tensor, align: torch.nn.Module, *, wavelet: str = "db6",
             levels: int = 3, mode: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """``(spatial, frequency)`` QueryKD terms of ``student`` ``[B, L, C_s]`` against ``teacher`` ``[B, L, C_t]``."""
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise InputError(f"QueryKD needs [B, L, C] tensors of one length, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    ys = align(student.transpose(1, 2).float())
    yt = teacher.transpose(1, 2).float()
    spatial = F.mse_loss(ys, yt)
    freq = ys.new_zeros(())
    for hs, ht in zip(wavelet_details(ys, wavelet, levels, mode), wavelet_details(yt, wavelet, levels, mode)):
        freq = freq + F.l1_loss(hs, ht)
    return spatial, freq


class QueryKD(torch.nn.Module):
    """The alignment conv of one QueryKD term (C_s → C_t, kernel 1); call it for ``spatial + frequency``."""

    def __init__(self, c_student: int, c_teacher: int, *, wavelet: str = "db6", levels: int = 3,
                 mode: str = "zero") -> None:
        super().__init__()
        self.align_module = torch.nn.Conv1d(c_student, c_teacher, kernel_size=1)
        self.wavelet, self.levels, self.mode = wavelet, levels, mode

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        spatial, freq = query_kd(student, teacher, self.align_module, wavelet=self.wavelet, levels=self.levels,
                                 mode=self.mode)
        return spatial + freq


# -- data --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One uplinked sample on the cloud: the question, its encoder tokens ``[N, C]`` (zeros
    where the device masked them), and the answer to learn (the teacher's, unless a baseline
    supplies the true one)."""

    question: str
    tokens: torch.Tensor
    answer: str | None = None
    sample_id: str = ""
    #: the answer's token ids as taught (set by :meth:`Distiller.pseudo_label`: the teacher's
    #: generated ids up to and including its end-of-turn token); ``None``: ``answer`` + end token
    answer_ids: list[int] | None = None
    #: whether the distillation terms (L_token, L_feature) apply; replayed source clips, which
    #: carry the cloud's own labels, are learnt with L_CE and (``AKDConfig.anchor``) L_anchor
    distil: bool = True


class Distiller:
    """The cloud's side of one device: the teacher, the student (a copy of the device model
    with :func:`add_adapters`) and the alignment convs.

    ``processor`` is the (shared) processor of both models; ``prompt(question)`` turns a
    question into the chat prompt with one video placeholder.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, processor: Any,
                 prompt: Callable[[str], str], cfg: AKDConfig | None = None) -> None:
        from ..models import get_adapter

        self.cfg = cfg or AKDConfig()
        self.student, self.teacher, self.processor, self.prompt = student, teacher, processor, prompt
        self.adapter = get_adapter(student)
        if type(get_adapter(teacher)) is not type(self.adapter):
            raise InputError("the teacher and the student must be of one model family")
        self.teacher.eval().requires_grad_(False)
        if not any("lora_" in n for n, _ in student.named_parameters()):
            raise InputError("the student has no adapters: build it with add_adapters(copy_of_device_model)")
        s_dim = student.config.text_config.hidden_size
        t_dim = teacher.config.text_config.hidden_size
        with _seeded(self.cfg.seed + 1):
            kw = {"wavelet": self.cfg.wavelet, "levels": self.cfg.levels, "mode": self.cfg.wavelet_mode}
            self.align = torch.nn.ModuleDict({"token": QueryKD(s_dim, t_dim, **kw), "feature": QueryKD(s_dim, t_dim, **kw)})
        self.align.to(next(student.parameters()).device)
        self.end_id = self._end_id()
        self._anchor: torch.nn.Module | None = None

    # -- inputs ------------------------------------------------------------------------------

    def _end_id(self) -> int:
        eos = self.student.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if not isinstance(eos, int):
            raise InputError("the student's generation config has no end-of-turn (eos) token id")
        return int(eos)

    def _prompts(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and mask, with each video placeholder expanded for its tokens."""
        import numpy as np

        shapes = {tuple(s.tokens.shape) for s in samples}
        if len(shapes) != 1:
            raise InputError(f"the samples of one batch must have tokens of one shape [N, C], got {sorted(shapes)}")
        frames = self.adapter.uplink_frames(self.student, int(samples[0].tokens.shape[0]))
        side = int(self.student.config.vision_config.image_size)
        blank = np.zeros((frames, side, side, 3), np.uint8)  # only sizes the placeholders; never encoded
        batch = self.processor(text=[self.prompt(s.question) for s in samples], videos=[blank] * len(samples),
                               return_tensors="pt", padding=True)
        if bool((batch["attention_mask"][:, -1] == 0).any()):
            raise InputError("AKD builds prompts with left padding; the processor pads on the right")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        return [int(i) for i in ids] + [self.end_id]

    def _with_answers(self, prompts: dict[str, torch.Tensor], answers: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Prompts followed by each answer's tokens (right-padded with masked pad tokens), labels and positions."""
        b, p = prompts["input_ids"].shape
        k = max(len(a) for a in answers)
        pad = int(self.processor.tokenizer.pad_token_id)
        tail = torch.full((b, k), pad, dtype=torch.long)
        tail_mask = torch.zeros((b, k), dtype=torch.long)
        labels = torch.full((b, p + k), -100, dtype=torch.long)
        for i, a in enumerate(answers):
            tail[i, : len(a)] = torch.tensor(a)
            tail_mask[i, : len(a)] = 1
            labels[i, p - 1 : p - 1 + len(a)] = torch.tensor(a)  # position t predicts token t+1
        ids = torch.cat([prompts["input_ids"], tail], 1)
        mask = torch.cat([prompts["attention_mask"], tail_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], tokens: torch.Tensor, *,
                 logits: bool = True, every_layer: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(logits or None, projected uplink tokens, hidden states)`` of ``model``: the hidden
        states are the final normed ones alone, or with ``every_layer`` the input embeddings and
        each decoder layer's output (transformers' ``hidden_states``, whose last entry is normed).

        The base model's ``last_hidden_state`` is the decoder's output after its final norm."""
        embeds, projected = self.adapter.embeds_from_uplink(model, batch["input_ids"], tokens)
        device = embeds.device
        out = model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                          position_ids=batch["position_ids"].to(device), use_cache=False,
                          output_hidden_states=every_layer)
        hidden = out.last_hidden_state
        states = tuple(out.hidden_states) if every_layer else (hidden,)
        return (model.lm_head(hidden) if logits else None), projected, states

    # -- the cloud's steps -------------------------------------------------------------------

    @torch.no_grad()
    def pseudo_label(self, samples: Sequence[Sample], *, batch_size: int = 16, max_new_tokens: int = 2,
                     progress: Callable[[int], None] | None = None) -> list[str]:
        """The teacher's greedy answers to the uplinked samples (set as each sample's ``answer``)."""
        out: list[str] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            prompts = self._prompts(chunk)
            tokens = torch.stack([s.tokens for s in chunk]).float()
            embeds, _ = self.adapter.embeds_from_uplink(self.teacher, prompts["input_ids"], tokens)
            gen = self.teacher.generate(inputs_embeds=embeds, attention_mask=prompts["attention_mask"],
                                        max_new_tokens=max_new_tokens, do_sample=False)
            texts = [t.strip() for t in self.processor.batch_decode(gen, skip_special_tokens=True)]
            for s, t, ids in zip(chunk, texts, gen.tolist()):
                s.answer = t
                s.answer_ids = ids[: ids.index(self.end_id) + 1] if self.end_id in ids else ids
            out.extend(texts)
            if progress is not None:
                progress(len(chunk))
        return out

    def _lr(self, step: int, total: int, per_epoch: int) -> float:
        warm = max(1, int(round(self.cfg.warmup * per_epoch)))
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return self.cfg.min_lr + (self.cfg.lr - self.cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def fit(self, samples: Sequence[Sample], *, progress: Callable[[dict[str, float]], None] | None = None
            ) -> dict[str, Any]:
        """Train the student's adapters (and the alignment convs) on ``samples`` (each with an
        ``answer``) for ``cfg.epochs``; returns the mean of each loss term per epoch and the time."""
        if not samples:
            raise InputError("AKD needs at least one uplinked sample")
        if any(s.answer is None for s in samples):
            raise InputError("every sample needs an answer: call pseudo_label first (or supply true answers)")
        cfg = self.cfg
        # L_anchor's reference: the student as it is now (the device's current weights), frozen
        self._anchor = (copy.deepcopy(self.student).eval().requires_grad_(False)
                        if cfg.anchor > 0 and any(not s.distil for s in samples) else None)
        params = _set_trainable(self.student)
        align_params = list(self.align.parameters()) if (cfg.token_kd or cfg.feature_kd) else []
        decay = [p for p in params + align_params if p.ndim >= 2]
        no_decay = [p for p in params + align_params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        per_epoch = math.ceil(len(samples) / cfg.batch_size)
        total = per_epoch * cfg.epochs
        history: list[dict[str, float]] = []
        began = time.perf_counter()
        self.student.train()
        step = 0
        try:
            for _epoch in range(cfg.epochs):
                order = torch.randperm(len(samples), generator=generator).tolist()
                sums: dict[str, float] = {}
                for start in range(0, len(order), cfg.batch_size):
                    chunk = [samples[i] for i in order[start : start + cfg.batch_size]]
                    terms = self._losses(chunk)
                    loss = sum(terms.values())
                    for g in optimizer.param_groups:
                        g["lr"] = self._lr(step, total, per_epoch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params + align_params, cfg.clip_grad)
                    optimizer.step()
                    step += 1
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v * len(chunk)
                    if progress is not None:
                        progress(values)
                history.append({k: v / len(samples) for k, v in sums.items()})
        finally:
            self._anchor = None
            self.student.eval()
            for p in self.student.parameters():
                p.requires_grad_(False)
        return {"epochs": history, "steps": step, "seconds": time.perf_counter() - began}

    def _losses(self, chunk: Sequence[Sample]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        answers = [s.answer_ids if s.answer_ids is not None else self._answer_ids(str(s.answer)) for s in chunk]
        batch = self._with_answers(self._prompts(chunk), answers)
        tokens = torch.stack([s.tokens for s in chunk]).float()
        kept = [i for i, smp in enumerate(chunk) if not smp.distil]
        anchored = self._anchor is not None and bool(kept)
        logits, projected, states = self._forward(self.student, batch, tokens, logits=cfg.ce, every_layer=anchored)
        hidden = states[-1]
        terms: dict[str, torch.Tensor] = {}
        if cfg.ce:
            assert logits is not None
            labels = batch["labels"]
            terms["ce"] = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                                          ignore_index=-100)
        distil = [i for i, smp in enumerate(chunk) if smp.distil]
        if (cfg.token_kd or cfg.feature_kd) and distil:
            idx = torch.tensor(distil)
            sub = {k: v[idx] for k, v in batch.items()}
            with torch.no_grad():
                _, t_projected, (t_hidden,) = self._forward(self.teacher, sub, tokens[idx], logits=False)
            if cfg.token_kd:
                s_tok, t_tok = projected[idx.to(projected.device)], t_projected
                if cfg.token_norm:  # the reference's projector ends in a LayerNorm
                    s_tok = F.layer_norm(s_tok, s_tok.shape[-1:])
                    t_tok = F.layer_norm(t_tok, t_tok.shape[-1:])
                terms["token"] = self.align["token"](s_tok, t_tok)
            if cfg.feature_kd:
                mask = sub["attention_mask"].bool()
                per = [self.align["feature"](hidden[i][mask[j]][None], t_hidden[j][mask[j]][None])
                       for j, i in enumerate(distil)]
                terms["feature"] = torch.stack(per).mean()
        if anchored:
            assert self._anchor is not None
            idx = torch.tensor(kept)
            sub = {k: v[idx] for k, v in batch.items()}
            with torch.no_grad():
                _, _, a_states = self._forward(self._anchor, sub, tokens[idx], logits=False, every_layer=True)
            mask = sub["attention_mask"].bool().to(hidden.device)
            rel = [((h[idx.to(h.device)][mask].float() - a[mask].float()) ** 2).mean()
                   / a[mask].float().pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)
                   for h, a in zip(states, a_states)]
            terms["anchor"] = cfg.anchor * torch.stack(rel).mean()
        return terms

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The student's shipped state (``norm | bias | lora`` outside the vision encoder), for DWC."""
        params = dict(self.student.named_parameters())
        return {n: params[n] for n in adapter_names(self.student)}
