"""The cloud–device round trip of CD-CCA (arXiv 2312.16279 §3), end to end over the real service.

Each round:

1. **Device** (:class:`Device`) answers a stream of clips from the current domain with greedy
   ``generate``; UTS-1 keeps the samples it answered unsurely (confidence Π_t max softmax(z_t/T)
   below the threshold), least confident first, at most ``max_uplink`` of them and as many as
   fit ``uplink_share`` of the streamed clips' raw frame bytes; UTS-2 keeps
   ⌊(1 − mask_ratio)·N⌋ of each one's vision-encoder tokens; the payload (safetensors +
   manifest, :mod:`tokensieve.collab.uplink`) goes up through :class:`~.service.client.CloudClient`.
2. **Cloud** (:class:`Cloud`) downloads and verifies it, pseudo-labels the samples with the
   teacher (which shares the device's vision encoder, so it reads the uplinked tokens), trains
   the student's adapters (:mod:`tokensieve.collab.akd`), encodes ``student − mirror`` with DWC
   (:mod:`tokensieve.collab.dwc`) under the downlink budget and publishes it.
3. **Device** pulls the update, verifies it (SHA-256 over HTTP, CRC and state hashes in DWC) and
   applies it; its trainable state then hashes to the cloud's mirror.

A *variant* changes one thing, for the comparison (``tokensieve bench collab``):
``akd`` (all of the above), ``pseudo-label`` (L_CE only on the uplinked samples; the replay as
in ``akd``), ``akd-no-replay`` (AKD on the uplinked samples alone, as the paper; by default the
cloud mixes in ``replay`` of its own labelled source-domain clips per uplinked one, learnt with
L_CE and L_anchor, so the device does not forget the source),
``akd-all`` (no UTS: every streamed clip and every token goes up), ``oracle`` (the device's
adapters trained with L_CE on the true answers of every streamed clip; meant as an upper bound,
it is beaten by ``akd-all``: the teacher's features teach more than the answers do), ``none``
(no adaptation) and ``teacher`` (the teacher's own accuracy).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from ..methods.uts import UTS
from . import dwc
from .akd import AKDConfig, Distiller, Sample, adapter_names, add_adapters
from .uplink import Uplink, decode_uplink, encode_uplink

__all__ = ["VARIANTS", "Cloud", "Device", "RoundsConfig", "run_rounds"]

VARIANTS = ("none", "pseudo-label", "akd", "akd-no-replay", "akd-all", "oracle", "teacher")


@dataclass
class RoundsConfig:
    """What a run does (the commands in :mod:`tokensieve.collab.demo` set their own stream sizes)."""

    domains: tuple[str, ...] = ("dusk",)
    stream: int = 1000
    max_uplink: int = 400
    uplink_share: float = 0.05
    uplink_dtype: str = "int8"
    eval_n: int = 300
    batch_size: int = 25
    uts: UTS = field(default_factory=lambda: UTS(temperature=1.0, threshold=0.9, mask_ratio=0.75, payload="sparse",
                                                 scope="per_sample"))
    akd: AKDConfig = field(default_factory=AKDConfig)
    downlink_share: float = 0.01
    quant: str = "int4"
    replay: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        from ..zoo import synthvid

        for d in self.domains:
            if d not in synthvid.DOMAINS:
                raise InputError(f"unknown domain {d!r}; expected one of {', '.join(synthvid.DOMAINS)}")
        for name in ("stream", "max_uplink", "eval_n", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("uplink_share", "downlink_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InputError(f"{name} must be in (0, 1], got {value!r}")
        from .uplink import DTYPES

        if self.uplink_dtype not in DTYPES:
            raise InputError(f"uplink_dtype must be one of {', '.join(DTYPES)}, got {self.uplink_dtype!r}")
        if self.quant not in dwc.QUANTS:
            raise InputError(f"quant must be one of {', '.join(dwc.QUANTS)}, got {self.quant!r}")
        if not (isinstance(self.replay, (int, float)) and 0 <= self.replay <= 10):
            raise InputError(f"replay must be a number of replayed clips per uplinked one in [0, 10], got {self.replay!r}")


def _frames_bytes(frames: Any) -> int:
    return int(frames.size) * int(frames.itemsize)


def uplink_bytes(blob: bytes, manifest: dict[str, Any]) -> int:
    """What an uplink costs on the wire: its tensors plus its manifest as compact JSON."""
    return len(blob) + len(json.dumps(manifest, separators=(",", ":")).encode())


def model_fp16_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's own parameters in fp16 (adapters excluded): the downlink's yardstick."""
    return sum(2 * p.numel() for n, p in model.named_parameters() if "lora_" not in n)


class Device:
    """The device: its model (with adapters), the UTS filter and (optionally) a client to the cloud."""

    def __init__(self, model: torch.nn.Module, processor: Any, uts: UTS, *, batch_size: int = 25,
                 client: Any = None, token_dtype: str = "as-is") -> None:
        from ..models import get_adapter
        from .uplink import DTYPES

        if token_dtype not in DTYPES:
            raise InputError(f"uplink token dtype must be one of {', '.join(DTYPES)}, got {token_dtype!r}")
        self.model, self.processor, self.uts, self.batch_size, self.client = model, processor, uts, batch_size, client
        self.token_dtype = token_dtype
        self.adapter = get_adapter(model)

    def state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in adapter_names(self.model)}

    def _batches(self, examples: Sequence[Any]) -> Any:
        from ..zoo.evaluate import iter_batches

        return iter_batches(self.processor, examples, batch_size=self.batch_size)

    @torch.no_grad()
    def answer(self, examples: Sequence[Any], progress: Callable[[int], None] | None = None
               ) -> tuple[list[str], torch.Tensor]:
        """Greedy answers and UTS-1 confidences of ``examples``."""
        answers: list[str] = []
        confidences = []
        for inputs in self._batches(examples):
            out = self.model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
            new = out.sequences[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True))
            eos = self.model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
            ended = torch.zeros(new.shape[0], dtype=torch.bool)
            valid = torch.zeros(new.shape, dtype=torch.bool)
            for t in range(new.shape[1]):  # steps up to and including each answer's end token
                valid[:, t] = ~ended
                ended |= torch.tensor([int(x) in eos_ids for x in new[:, t]])
            confidences.append(self.uts.samples_to_uplink(out.logits, valid=valid)[1])
            if progress is not None:
                progress(int(new.shape[0]))
        return answers, torch.cat(confidences)

    @torch.no_grad()
    def tokens(self, examples: Sequence[Any]) -> torch.Tensor:
        """The vision-encoder tokens ``[B, N, C]`` of ``examples`` (what the uplink carries)."""
        return torch.cat([self.adapter.uplink_tokens(self.model, inputs) for inputs in self._batches(examples)])

    def choose(self, confidence: torch.Tensor, limit: int) -> list[int]:
        """UTS-1: the uncertain samples, least confident first, at most ``limit``."""
        from ..methods.uts import uncertain_samples

        mask = uncertain_samples(confidence, score=self.uts.sample_score, threshold=self.uts.threshold)
        order = torch.argsort(confidence if self.uts.sample_score != "mean_entropy" else -confidence, stable=True)
        return [int(i) for i in order if bool(mask[i])][:limit]

    def make_uplink(self, device_id: str, round_: int, examples: Sequence[Any], answers: Sequence[str],
                    confidence: torch.Tensor, *, mask_tokens: bool = True, max_bytes: float = math.inf
                    ) -> tuple[bytes, dict[str, Any]]:
        """UTS-2 on the chosen samples and the uplink payload (tokens in fp16, or int8 with
        ``token_dtype="int8"``).

        With ``max_bytes`` the payload (tensors + compact JSON manifest) holds the longest prefix
        of ``examples`` (least confident first, as :meth:`choose` orders them) that fits; the
        manifest's ``sample_ids`` say which went up."""
        tokens = self.tokens(examples)
        if not mask_tokens:
            keep = torch.ones(tokens.shape[:2], dtype=torch.bool)
        elif self.uts.scope == "per_sample":  # in chunks: MC dropout holds `samples` copies of what it scores
            keep = torch.cat([self.uts.tokens_to_keep(tokens[s : s + self.batch_size])
                              for s in range(0, len(tokens), self.batch_size)])
        else:
            keep = self.uts.tokens_to_keep(tokens)
        tokens = tokens.to(torch.float16)

        def encode(n: int) -> tuple[bytes, dict[str, Any]]:
            up = Uplink(device_id=device_id, round=round_, sample_ids=[str(e.seed) for e in examples[:n]],
                        tokens=tokens[:n], keep=keep[:n], answers=list(answers[:n]),
                        confidences=[float(c) for c in confidence[:n]],
                        extra={"questions": [e.question for e in examples[:n]],
                               "domain": examples[0].domain if examples else ""})
            return encode_uplink(up, self.uts.payload, self.token_dtype)

        out = encode(len(examples))
        if uplink_bytes(*out) <= max_bytes:
            return out
        lo, hi = 0, len(examples)  # the longest prefix that fits: bytes grow with every sample
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if uplink_bytes(*encode(mid)) <= max_bytes else (lo, mid)
        if lo == 0:
            raise InputError(f"the uplink budget ({max_bytes:,.0f} bytes) is smaller than one sample's payload "
                             f"({uplink_bytes(*encode(1)):,} bytes)")
        return encode(lo)

    def apply(self, data: bytes) -> Any:
        """Verify and apply a DWC update to the device's trainable state (all or nothing)."""
        return dwc.apply_update(self.state(), data)


class Cloud:
    """The cloud's side for one device: teacher, student (device copy with adapters), DWC mirror."""

    def __init__(self, device_model: torch.nn.Module, teacher: torch.nn.Module, processor: Any,
                 akd: AKDConfig, *, budget: float = math.inf, quant: str = "int4") -> None:
        from ..zoo.model import prompt_for

        student = copy.deepcopy(device_model)
        self.distiller = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q), akd)
        self.mirror = {n: t.detach().clone() for n, t in self.distiller.trainable_state().items()}
        self.budget, self.quant = budget, quant

    @torch.no_grad()
    def replay_samples(self, examples: Sequence[Any], batch_size: int = 25) -> list[Sample]:
        """Samples of the cloud's own source-domain clips (data like the device was trained on):
        whole token sets through the shared vision encoder, mixed in with their true answers so
        the student keeps what it knew (experience replay, with L_anchor; not distilled from the
        teacher, which is weaker than the device on the source domain)."""
        from ..zoo.evaluate import iter_batches

        teacher, adapter = self.distiller.teacher, self.distiller.adapter
        tokens = torch.cat([adapter.uplink_tokens(teacher, batch)
                            for batch in iter_batches(self.distiller.processor, examples, batch_size=batch_size)])
        return [Sample(e.question, tokens[i], None, f"replay-{e.seed}") for i, e in enumerate(examples)]

    @staticmethod
    def samples(up: Uplink) -> list[Sample]:
        questions = up.extra.get("questions")
        if not isinstance(questions, list) or len(questions) != len(up.sample_ids):
            raise InputError("the uplink's manifest must carry one question per sample (extra.questions)")
        return [Sample(str(q), up.tokens[i].float(), None, sid) for i, (q, sid) in enumerate(zip(questions, up.sample_ids))]

    def adapt(self, samples: Sequence[Sample], progress: Callable[[dict[str, float]], None] | None = None
              ) -> dict[str, Any]:
        return self.distiller.fit(samples, progress=progress)

    def update(self, round_: int) -> dwc.Encoded:
        enc = dwc.encode_update(self.distiller.trainable_state(), self.mirror, round=round_, budget=self.budget,
                                quant=self.quant)
        self.mirror = enc.mirror
        return enc


def evaluate(model: torch.nn.Module, processor: Any, domain: str, n: int, heldout: int,
             batch_size: int = 25) -> dict[str, Any]:
    """Accuracy of ``model`` on ``n`` held-out clips (held-out set ``heldout``) in ``domain``."""
    from ..zoo import synthvid
    from ..zoo.evaluate import answer, score

    examples = [synthvid.make_example(s, domain=domain) for s in synthvid.heldout_seeds(n, heldout)]
    return score(examples, answer(model, processor, examples, batch_size=batch_size)).as_dict()


#: Held-out set numbers (``synthvid.heldout_seeds(n, k)``): evaluation on the source domain uses
#: set 0 (as the rest of the package), evaluation on a shifted domain set 1, the stream of round
#: ``r`` set ``STREAM_SET + r``: no clip is both streamed and evaluated, none was trained on.
SOURCE_SET, TARGET_SET, STREAM_SET = 0, 1, 10
#: First training seed of the cloud's replayed source clips (round ``r`` starts ``r``·100,000 later).
REPLAY_START = 900_000_000


def run_rounds(
    device_model: torch.nn.Module,
    teacher: torch.nn.Module,
    processor: Any,
    cfg: RoundsConfig,
    variant: str,
    *,
    service_root: Any,
    log: Callable[[str], None] = lambda _m: None,
    bar: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """One run of ``variant`` over ``cfg.domains`` (one round each) through a service on loopback.

    ``device_model`` is left untouched (the device works on a copy). Returns per round: the
    device's held-out accuracy on the source and on every domain of the run, bytes up and down
    (and their ratios to the streamed clips' raw frames and to the device model in fp16), the
    uplinked samples' count and pseudo-label accuracy, the hash check and time per stage.
    """
    from ..zoo import synthvid
    from .service.client import CloudClient
    from .service.local import LocalService

    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if bar is None:
        from tqdm.auto import tqdm as bar  # type: ignore[no-redef]
    eval_domains = ["source"] + [d for d in dict.fromkeys(cfg.domains) if d != "source"]
    result: dict[str, Any] = {"variant": variant, "config": _config_dict(cfg), "rounds": []}

    def evaluate_all(model: torch.nn.Module) -> dict[str, Any]:
        return {d: evaluate(model, processor, d, cfg.eval_n, SOURCE_SET if d == "source" else TARGET_SET,
                            cfg.batch_size)["accuracy"] for d in eval_domains}

    if variant == "teacher":
        began = time.perf_counter()
        result["initial"] = evaluate_all(teacher)
        result["seconds"] = time.perf_counter() - began
        return result
    model = add_adapters(copy.deepcopy(device_model), cfg.akd)
    model.eval()
    began = time.perf_counter()
    result["initial"] = evaluate_all(model)
    log(f"[{variant}] before adaptation: " + _fmt_acc(result["initial"]))
    if variant == "none":
        result["seconds"] = time.perf_counter() - began
        return result
    fp16 = model_fp16_bytes(model)
    akd_cfg = cfg.akd
    if variant in ("pseudo-label", "oracle"):
        akd_cfg = AKDConfig(**{**asdict(cfg.akd), "token_kd": False, "feature_kd": False})
    cloud = Cloud(model, teacher, processor, akd_cfg, budget=cfg.downlink_share * fp16, quant=cfg.quant)
    # Room for the variants that uplink every clip whole (hundreds of MB); the defaults suit UTS.
    limits = {"max_body": 4 << 30, "device_quota": 16 << 30}
    with LocalService(service_root, **limits) as svc, svc.admin_client(timeout=120) as admin:
        reg = admin.create_device(f"device-{variant}")
        with CloudClient(svc.url, reg["token"], timeout=120) as client:
            device = Device(model, processor, cfg.uts, batch_size=cfg.batch_size, client=client,
                            token_dtype=cfg.uplink_dtype)
            for r, domain in enumerate(cfg.domains, start=1):
                row: dict[str, Any] = {"round": r, "domain": domain, "seconds": {}}
                t0 = time.perf_counter()
                stream = [synthvid.make_example(s, domain=domain) for s in synthvid.heldout_seeds(cfg.stream, STREAM_SET + r)]
                with bar(total=len(stream), desc=f"{variant} r{r}: device answers {domain}", unit="clip",
                         leave=False) as b:
                    answers, conf = device.answer(stream, progress=b.update)
                if variant in ("akd-all", "oracle"):
                    chosen = list(range(len(stream)))
                else:
                    chosen = device.choose(conf, cfg.max_uplink)
                row["stream"] = len(stream)
                row["device_stream_accuracy"] = sum(synthvid.check_answer(e, a) for e, a in zip(stream, answers)) / len(stream)
                row["uncertain"] = len(chosen)
                row["seconds"]["device_infer"] = time.perf_counter() - t0
                if not chosen:
                    log(f"[{variant}] round {r}: nothing uncertain to uplink")
                    row["uplinked"] = 0
                    row["accuracy"] = evaluate_all(model)
                    result["rounds"].append(row)
                    continue
                t0 = time.perf_counter()
                raw = sum(_frames_bytes(e.frames) for e in stream)
                whole = variant in ("akd-all", "oracle")  # the baselines that send everything, unmasked
                blob, manifest = device.make_uplink(reg["device_id"], r, [stream[i] for i in chosen],
                                                    [answers[i] for i in chosen], conf[chosen], mask_tokens=not whole,
                                                    max_bytes=math.inf if whole else cfg.uplink_share * raw)
                chosen = chosen[: len(manifest["sample_ids"])]
                picked = [stream[i] for i in chosen]
                row["uplinked"] = len(picked)
                sent = client.upload(blob, manifest)
                row["seconds"]["uplink"] = time.perf_counter() - t0
                up_bytes = uplink_bytes(blob, manifest)
                row["bytes_up"] = up_bytes
                row["uplink_vs_raw_stream"] = up_bytes / raw
                row["uplink_vs_raw_uplinked"] = up_bytes / sum(_frames_bytes(e.frames) for e in picked)

                # -- cloud ----------------------------------------------------------------------
                t0 = time.perf_counter()
                info = admin.upload_info(sent["upload_id"], reg["device_id"])
                data = admin.upload_data(sent["upload_id"], reg["device_id"])
                up = decode_uplink(data, info["manifest"])
                samples = cloud.samples(up)
                if variant == "oracle":
                    truth = {str(e.seed): e.answer for e in picked}
                    for s in samples:
                        s.answer = truth[s.sample_id]
                    row["pseudo_label_accuracy"] = 1.0
                else:
                    with bar(total=len(samples), desc=f"{variant} r{r}: teacher labels", unit="clip", leave=False) as b:
                        cloud.distiller.pseudo_label(samples, progress=b.update)
                    truth = {str(e.seed): e for e in picked}
                    row["pseudo_label_accuracy"] = sum(
                        synthvid.check_answer(truth[s.sample_id], str(s.answer)) for s in samples) / len(samples)
                # as many replayed clips per uplinked one as cfg.replay says, at most that many per max_uplink
                n_replay = 0 if variant == "akd-no-replay" else int(round(cfg.replay * min(len(samples), cfg.max_uplink)))
                if n_replay:
                    first = REPLAY_START + r * 100_000
                    clips = [synthvid.make_example(s) for s in synthvid.train_seeds(first, n_replay)]
                    replay = cloud.replay_samples(clips)
                    for smp, clip in zip(replay, clips):  # the cloud's own labelled data: L_CE and L_anchor
                        smp.answer, smp.distil = clip.answer, False
                    samples = samples + replay
                row["replayed"] = n_replay
                row["seconds"]["cloud_label"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                steps = math.ceil(len(samples) / akd_cfg.batch_size) * akd_cfg.epochs
                with bar(total=steps, desc=f"{variant} r{r}: AKD", unit="step", leave=False) as b:
                    fit = cloud.adapt(samples, progress=lambda terms: (b.update(1), b.set_postfix(
                        {k: f"{v:.3f}" for k, v in terms.items()})))
                row["akd"] = {"epochs": fit["epochs"], "steps": fit["steps"]}
                row["seconds"]["cloud_akd"] = time.perf_counter() - t0
                row["cloud_student_accuracy"] = evaluate_all(cloud.distiller.student)  # before the downlink
                t0 = time.perf_counter()
                enc = cloud.update(r)
                admin.put_update(reg["device_id"], r, enc.data)
                row["seconds"]["cloud_dwc"] = time.perf_counter() - t0
                row["tensors_sent"] = len(enc.sent)
                row["tensors_total"] = len(cloud.mirror)

                # -- device pulls ------------------------------------------------------------------
                t0 = time.perf_counter()
                update = client.pull("latest")
                device.apply(update)
                row["seconds"]["device_apply"] = time.perf_counter() - t0
                row["bytes_down"] = len(update)
                row["downlink_vs_model_fp16"] = len(update) / fp16
                row["device_matches_mirror"] = dwc.state_hash(device.state()) == dwc.state_hash(cloud.mirror)
                row["accuracy"] = evaluate_all(model)
                log(f"[{variant}] round {r} ({domain}): {_fmt_acc(row['accuracy'])}; uplinked {len(picked)}/{len(stream)} "
                    f"({100 * row['uplink_vs_raw_stream']:.2f}% of raw frames), downlink {len(update)} B "
                    f"({100 * row['downlink_vs_model_fp16']:.2f}% of the model), pseudo-labels "
                    f"{100 * row['pseudo_label_accuracy']:.0f}% right")
                result["rounds"].append(row)
    result["seconds"] = time.perf_counter() - began
    return result


def _fmt_acc(acc: dict[str, float]) -> str:
    return ", ".join(f"{d} {100 * a:.1f}%" for d, a in acc.items())


def _config_dict(cfg: RoundsConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["domains"] = list(cfg.domains)
    return out
