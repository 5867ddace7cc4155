"""AKD (specs/cdcca.md §3), the uplinked-token path and one real round trip over a loopback service.

References are computed independently of the code under test: the wavelet term against
PyWavelets (not the differentiable library AKD uses), the cross-entropy and feature terms from
the models' ordinary pixel forward (not the uplinked-token path), the update from the decoded
DWC records.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
pytest.importorskip("ptwt")
pywt = pytest.importorskip("pywt")

from tokensieve.collab import dwc  # noqa: E402
from tokensieve.collab.akd import (  # noqa: E402
    AKDConfig,
    Distiller,
    QueryKD,
    Sample,
    adapter_names,
    add_adapters,
    query_kd,
)
from tokensieve.errors import InputError  # noqa: E402
from tokensieve.models import get_adapter  # noqa: E402
from tokensieve.zoo import synthvid  # noqa: E402
from tokensieve.zoo.model import build_model, load_device, prompt_for  # noqa: E402


@pytest.fixture(scope="module")
def device():
    torch.manual_seed(0)
    return load_device()


@pytest.fixture(scope="module")
def teacher(device):
    """An untrained teacher *wider* than the device (192 vs 128 channels, 6 layers), sharing its
    vision tower: only its shapes and arithmetic matter here, and a width that differs from the
    student's catches any mix-up of the two sides."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from tokensieve.zoo.model import embedded_config

    model, processor = device
    cfg = embedded_config(processor.tokenizer)
    for key, value in {"hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 6,
                       "num_attention_heads": 6, "num_key_value_heads": 6}.items():
        setattr(cfg.text_config, key, value)
    cfg.text_config.layer_types = ["full_attention"] * 6
    torch.manual_seed(3)
    t = LlavaOnevisionForConditionalGeneration(cfg)
    t.generation_config = copy.deepcopy(model.generation_config)
    t.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    return t.eval()


def _clips(n, domain="dusk", heldout=5):
    return [synthvid.make_example(s, domain=domain) for s in synthvid.heldout_seeds(n, heldout)]


# -- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [40, 64])
def test_query_kd_against_pywavelets(length):
    g = torch.Generator().manual_seed(length)
    ys = torch.randn(2, length, 3, generator=g)
    yt = torch.randn(2, length, 5, generator=g)
    conv = torch.nn.Conv1d(3, 5, 1)
    spatial, freq = query_kd(ys, yt, conv)
    # by hand: 1x1 conv = per-position linear map of channels
    w, b = conv.weight.detach()[:, :, 0], conv.bias.detach()
    aligned = torch.einsum("oc,blc->bol", w, ys) + b[None, :, None]  # [B, C_t, L]
    target = yt.transpose(1, 2)
    torch.testing.assert_close(spatial, ((aligned - target) ** 2).mean())
    a = pywt.wavedec(aligned.double().numpy(), "db6", mode="zero", level=3, axis=-1)
    t = pywt.wavedec(target.double().numpy(), "db6", mode="zero", level=3, axis=-1)
    expected = sum(np.abs(x - y).mean() for x, y in zip(a[1:], t[1:]))  # detail bands only
    assert float(freq) == pytest.approx(expected, rel=1e-5)
    module = QueryKD(3, 5)
    module.align_module.load_state_dict(conv.state_dict())
    torch.testing.assert_close(module(ys, yt), spatial + freq)


def test_query_kd_refuses_mismatched_lengths():
    with pytest.raises(InputError, match="one length"):
        query_kd(torch.zeros(1, 4, 2), torch.zeros(1, 5, 2), torch.nn.Conv1d(2, 2, 1))


def test_config_is_checked():
    with pytest.raises(InputError, match="at least one"):
        AKDConfig(ce=False, token_kd=False, feature_kd=False)
    with pytest.raises(InputError, match="lora_rank"):
        AKDConfig(lora_rank=0)
    with pytest.raises(InputError, match="wavelet"):
        AKDConfig(wavelet="nope")
    with pytest.raises(InputError, match="min_lr"):
        AKDConfig(lr=1e-4, min_lr=1e-3)


# -- the uplinked-token path -------------------------------------------------------------------


def test_uplinked_tokens_reproduce_the_pixel_forward(device):
    model, processor = device
    clips = _clips(3)
    batch = processor(text=[prompt_for(processor, e.question) for e in clips], videos=[e.frames for e in clips],
                      return_tensors="pt", padding=True)
    adapter = get_adapter(model)
    with torch.no_grad():
        ref = model(**batch).logits  # the model's own forward from pixels
        tokens = adapter.uplink_tokens(model, batch)
        embeds, projected = adapter.embeds_from_uplink(model, batch["input_ids"], tokens)
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        got = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=pos).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert tokens.shape == (3, synthvid.FRAMES * 64, model.config.vision_config.hidden_size)
    assert projected.shape == (3, synthvid.FRAMES * 64, model.config.text_config.hidden_size)


# -- adapters and the trainable set ------------------------------------------------------------


def _expected_trainable(model):
    """By hand: LoRA A/B, and norm weights and biases of the projector and the language model."""
    out = []
    for n, _ in model.named_parameters():
        if "vision_tower" in n:
            continue
        if ".lora_A." in n or ".lora_B." in n:
            out.append(n)
        elif n.startswith("model.multi_modal_projector.") and n.endswith(".bias"):
            out.append(n)
        elif n.startswith("model.language_model.") and (n.endswith("norm.weight") or n.endswith(".bias")):
            out.append(n)
    return sorted(out)


def test_adapters_start_as_the_identity_and_the_trainable_set_is_exact(device):
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    assert adapter_names(student) == _expected_trainable(student)
    assert any(".lora_A." in n for n in adapter_names(student))
    assert not any("vision_tower" in n or "embed_tokens" in n or "lm_head" in n for n in adapter_names(student))
    clips = _clips(2)
    batch = processor(text=[prompt_for(processor, e.question) for e in clips], videos=[e.frames for e in clips],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, model(**batch).logits)
    with pytest.raises(InputError, match="already has LoRA"):
        add_adapters(student)


def _samples(model, processor, clips, answers=None):
    batch = processor(text=[prompt_for(processor, e.question) for e in clips], videos=[e.frames for e in clips],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = get_adapter(model).uplink_tokens(model, batch)
    answers = answers or [None] * len(clips)
    return [Sample(e.question, tokens[i], a, str(e.seed)) for i, (e, a) in enumerate(zip(clips, answers))]


def test_fit_changes_exactly_the_trainable_set(device, teacher):
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    d = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q), AKDConfig(epochs=1, batch_size=2))
    clips = _clips(4)
    samples = _samples(model, processor, clips, [e.answer for e in clips])
    report = d.fit(samples)
    assert report["steps"] == 2 and set(report["epochs"][0]) == {"ce", "token", "feature"}
    changed = sorted(n for n, p in student.named_parameters() if not torch.equal(p, before[n]))
    expected = set(_expected_trainable(student))
    assert changed and set(changed) <= expected
    assert any(".lora_B." in n for n in changed)  # B moved off zero: the adapters learned
    assert not any(p.requires_grad for p in student.parameters())  # left frozen after fitting
    assert set(d.trainable_state()) == expected
    assert not any("align_module" in n for n in d.trainable_state())  # alignment convs never ship
    assert any("align_module" in n for n, _ in d.align.named_parameters())


def test_loss_terms_against_the_pixel_forward(device, teacher):
    """L_CE and L_feature from the models' ordinary forward on pixels, with the answer appended."""
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    d = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q), AKDConfig())
    clips = _clips(2)
    answers = ["red circle", "three"]  # two tokens and one: the answers are right-padded in the batch
    samples = _samples(model, processor, clips, answers)
    with torch.no_grad():
        terms = d._losses(samples)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ce_sum, count, feats = 0.0, 0, []
    for e, a in zip(clips, answers):  # batch 1 each: no padding, the reference needs no masks
        prompt = processor(text=[prompt_for(processor, e.question)], videos=[e.frames], return_tensors="pt")
        ans = processor.tokenizer(a, add_special_tokens=False)["input_ids"] + [end]
        ids = torch.cat([prompt["input_ids"], torch.tensor([ans])], 1)
        with torch.no_grad():  # the base models' last_hidden_state is after the final norm
            s_h = student.model(input_ids=ids, pixel_values_videos=prompt["pixel_values_videos"]).last_hidden_state
            t_h = teacher.model(input_ids=ids, pixel_values_videos=prompt["pixel_values_videos"]).last_hidden_state
            logits = student.lm_head(s_h)
        p = prompt["input_ids"].shape[1]
        ce_sum += float(F.cross_entropy(logits[0, p - 1 : p - 1 + len(ans)], torch.tensor(ans), reduction="sum"))
        count += len(ans)
        feats.append((s_h, t_h))
    assert float(terms["ce"]) == pytest.approx(ce_sum / count, rel=1e-4)
    conv = d.align["feature"].align_module
    expected = np.mean([float(sum(query_kd(s, t, conv))) for s, t in feats])
    assert float(terms["feature"]) == pytest.approx(expected, rel=1e-4)
    # L_token: the uplinked tokens through each model's own projector, whole batch
    tokens = torch.stack([s.tokens for s in samples])
    with torch.no_grad():
        s_proj = student.model.multi_modal_projector(tokens)
        t_proj = teacher.model.multi_modal_projector(tokens)
        ln_s, ln_t = F.layer_norm(s_proj, s_proj.shape[-1:]), F.layer_norm(t_proj, t_proj.shape[-1:])
        expected_token = sum(query_kd(ln_s, ln_t, d.align["token"].align_module))
    assert s_proj.shape[-1] != t_proj.shape[-1]
    assert float(terms["token"]) == pytest.approx(float(expected_token), rel=1e-4)


def test_pseudo_labels_are_the_teachers_greedy_answers_from_pixels(device, teacher):
    """On whole (unmasked) uplinked tokens the teacher answers exactly as its own ``generate`` on
    the clips' pixels does."""
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    d = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q), AKDConfig())
    clips = _clips(3, heldout=9)
    samples = _samples(model, processor, clips)
    d.pseudo_label(samples)
    batch = processor(text=[prompt_for(processor, e.question) for e in clips], videos=[e.frames for e in clips],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = teacher.generate(**batch, max_new_tokens=2, do_sample=False)
    new = gen[:, batch["input_ids"].shape[1] :]
    expected = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    assert [s.answer for s in samples] == expected
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for s, ids in zip(samples, new.tolist()):
        assert s.answer_ids == (ids[: ids.index(end) + 1] if end in ids else ids)


def test_replayed_samples_are_not_distilled_from_the_teacher(device, teacher):
    """A sample with ``distil=False`` counts in L_CE and nowhere in the distillation terms
    (outside ``fit`` there is no anchor, the term of the next test)."""
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    d = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q), AKDConfig())
    clips = _clips(3, heldout=11)
    samples = _samples(model, processor, clips, [e.answer for e in clips])
    samples[2].distil = False
    with torch.no_grad():
        mixed = d._losses(samples)
        first_two = d._losses(samples[:2])
        alone = d._losses(samples[2:])
    torch.testing.assert_close(mixed["token"], first_two["token"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed["feature"], first_two["feature"], rtol=1e-4, atol=1e-5)
    assert set(alone) == {"ce"}
    assert float(mixed["ce"]) != pytest.approx(float(first_two["ce"]))


def test_replayed_samples_keep_the_features_the_student_had_before_the_fit(device, teacher):
    """L_anchor: on ``distil=False`` samples, for each of the decoder's hidden states (the input
    embeddings, every layer's output, the last one normed), the mean squared difference from the
    model the student was when ``fit`` began, relative to that model's mean square; averaged
    over the layers. By hand, from both models' pixel forward over each replayed sample's real
    positions; distilled samples do not count in it, and it is zero while the student has not moved."""
    model, processor = device
    student = add_adapters(copy.deepcopy(model))
    d = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q),
                  AKDConfig(epochs=1, batch_size=4, anchor=2.5))
    clips = _clips(4, heldout=13)
    answers = ["red circle", "three", "left", "blue"]
    samples = _samples(model, processor, clips, answers)
    samples[1].distil = samples[3].distil = False
    seen = []
    d.fit(samples, progress=seen.append)  # one step, taken from the student as it was
    assert seen[0]["anchor"] == 0.0 and d._anchor is None
    d._anchor = add_adapters(copy.deepcopy(model))  # the fit moved the student: now it differs from its anchor
    with torch.no_grad():
        terms = d._losses(samples)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    layers = model.config.text_config.num_hidden_layers + 1
    diffs, refs = [[] for _ in range(layers)], [[] for _ in range(layers)]
    for e, a in [(clips[1], answers[1]), (clips[3], answers[3])]:
        prompt = processor(text=[prompt_for(processor, e.question)], videos=[e.frames], return_tensors="pt")
        ids = torch.cat([prompt["input_ids"], torch.tensor([processor.tokenizer(a, add_special_tokens=False)
                                                            ["input_ids"] + [end]])], 1)
        kw = {"input_ids": ids, "pixel_values_videos": prompt["pixel_values_videos"], "output_hidden_states": True}
        with torch.no_grad():
            s_h, a_h = student.model(**kw).hidden_states, model.model(**kw).hidden_states
        assert len(s_h) == layers
        for layer in range(layers):
            diffs[layer].append(((s_h[layer] - a_h[layer]) ** 2).flatten())
            refs[layer].append((a_h[layer] ** 2).flatten())
    expected = 2.5 * float(np.mean([float(torch.cat(diffs[i]).mean() / torch.cat(refs[i]).mean())
                                    for i in range(layers)]))
    assert expected > 0 and float(terms["anchor"]) == pytest.approx(expected, rel=1e-4)
    d._anchor = None
    no_anchor = Distiller(student, teacher, processor, lambda q: prompt_for(processor, q),
                          AKDConfig(epochs=1, batch_size=4, anchor=0))
    seen.clear()
    no_anchor.fit(samples, progress=seen.append)
    assert "anchor" not in seen[0]


def test_distiller_refuses_a_student_without_adapters(device, teacher):
    model, processor = device
    with pytest.raises(InputError, match="no adapters"):
        Distiller(copy.deepcopy(model), teacher, processor, lambda q: q)


# -- one round over the real service -----------------------------------------------------------


def test_one_round_trip_over_a_loopback_service(device, teacher, tmp_path):
    """Device answers, uplinks over HTTP; cloud labels, distils, publishes; the device's weights
    then differ from before by exactly the decoded update and hash to the cloud's mirror."""
    from tokensieve.collab.rounds import Cloud, Device
    from tokensieve.collab.service.client import CloudClient
    from tokensieve.collab.service.local import LocalService
    from tokensieve.collab.uplink import decode_uplink
    from tokensieve.methods.uts import UTS

    model, processor = device
    cfg = AKDConfig(epochs=1, batch_size=4)
    dev_model = add_adapters(copy.deepcopy(model), cfg)
    cloud = Cloud(dev_model, teacher, processor, cfg, budget=40_000)
    with LocalService(tmp_path / "svc") as svc, svc.admin_client() as admin:
        reg = admin.create_device("camera")
        with CloudClient(svc.url, reg["token"]) as client:
            dev = Device(dev_model, processor, UTS(temperature=1.0, threshold=1.01, mask_ratio=0.5,
                                                   payload="sparse", scope="per_sample"), batch_size=4)
            stream = _clips(6, heldout=7)
            answers, conf = dev.answer(stream)
            chosen = dev.choose(conf, 4)
            assert len(chosen) == 4 and [float(conf[i]) for i in chosen] == sorted(float(conf[i]) for i in chosen)
            picked = [stream[i] for i in chosen]
            blob, manifest = dev.make_uplink(reg["device_id"], 1, picked, [answers[i] for i in chosen], conf[chosen])
            sent = client.upload(blob, manifest)
            up = decode_uplink(admin.upload_data(sent["upload_id"], reg["device_id"]),
                               admin.upload_info(sent["upload_id"], reg["device_id"])["manifest"])
            assert int(up.keep.sum()) == 4 * (up.tokens.shape[1] // 2)  # UTS-2 kept half of each
            samples = cloud.samples(up)
            cloud.distiller.pseudo_label(samples)
            cloud.adapt(samples)
            enc = cloud.update(1)
            admin.put_update(reg["device_id"], 1, enc.data)
            assert len(enc.data) <= 40_000
            before = {n: t.detach().clone() for n, t in dev.state().items()}
            data = client.pull("latest")
            assert data == enc.data
            dev.apply(data)
    decoded = dwc.decode_update(data)
    assert decoded.records, "the update is empty"
    after = dev.state()
    for rec in decoded.records:  # by hand: old + dequantised delta at the record's positions
        expected = before[rec.name].float().flatten().clone()
        idx = torch.arange(expected.numel()) if rec.positions is None else rec.positions.long()
        expected[idx] += rec.values().float()
        torch.testing.assert_close(after[rec.name].float().flatten(), expected.to(before[rec.name].dtype).float())
    untouched = set(before) - {r.name for r in decoded.records}
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    assert dwc.state_hash(after) == dwc.state_hash(cloud.mirror)


def test_the_uplink_holds_the_least_confident_clips_that_fit_its_byte_budget(device):
    """``max_bytes``: the longest prefix of the chosen clips (least confident first) whose payload
    and manifest fit; a budget below one clip's payload is refused."""
    from tokensieve.collab.rounds import Device, uplink_bytes
    from tokensieve.methods.uts import UTS

    model, processor = device
    dev = Device(add_adapters(copy.deepcopy(model)), processor,
                 UTS(temperature=1.0, threshold=1.01, mask_ratio=0.5, payload="sparse", scope="per_sample"),
                 batch_size=4)
    stream = _clips(4, heldout=8)
    answers, conf = dev.answer(stream)
    chosen = dev.choose(conf, 4)
    args = ([stream[i] for i in chosen], [answers[i] for i in chosen], conf[chosen])

    def up(n, budget=float("inf")):
        return dev.make_uplink("d", 1, *(a[:n] for a in args), max_bytes=budget)

    sizes = [uplink_bytes(*up(n)) for n in (1, 2, 3, 4)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    for budget, n in [(sizes[3], 4), (sizes[2], 3), (sizes[2] - 1, 2), (sizes[0], 1)]:
        blob, manifest = up(4, budget)
        assert manifest["sample_ids"] == [str(stream[i].seed) for i in chosen[:n]]
        assert uplink_bytes(blob, manifest) <= budget
    with pytest.raises(InputError, match="smaller than one sample"):
        up(4, sizes[0] - 1)


# -- the commands ------------------------------------------------------------------------------


def test_bench_collab_runs_end_to_end_and_reports(tmp_path):
    """A miniature `tokensieve bench collab` (shipped teacher, a real loopback service): every
    round's device state equals the cloud's mirror, the report and charts are written."""
    import json

    from tokensieve.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "collab", "--out", str(out), "--stream", "12", "--max-uplink", "3", "--eval-n", "5",
               "--epochs", "1", "--replay", "1", "--threads", "1", "--variants", "akd,teacher"])
    assert rc == 0
    result = json.loads((out / "collab.json").read_text())
    rounds = result["runs"]["akd"]["rounds"]
    assert [r["domain"] for r in rounds] == ["dusk", "fog"]
    for r in rounds:
        assert r["uplinked"] == 3 and r["replayed"] == 3 and r["device_matches_mirror"] is True
        assert r["bytes_up"] > 0 and 0 < r["downlink_vs_model_fp16"] <= 0.01
        assert set(r["accuracy"]) == {"source", "dusk", "fog"}
    assert set(result["runs"]["teacher"]["initial"]) == {"source", "dusk", "fog"}
    for name in ("report.html", "collab.md", "accuracy_dusk.png", "uplink.png", "downlink.png"):
        assert (out / name).is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["collab", "demo", "--domains", "night"], "shifted domains"),
    (["collab", "demo", "--replay", "-1"], "replay"),
    (["bench", "collab", "--variants", "akd,magic"], "variants"),
])
def test_collab_command_arguments_are_checked(args, message, capsys):
    from tokensieve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_teacher_that_does_not_share_the_vision_tower_is_refused(tmp_path, capsys, device):
    from tokensieve.cli import main
    from tokensieve.zoo.model import save_model

    model, processor = device
    other = build_model(5, processor.tokenizer, "teacher")  # a fresh vision tower
    save_model(other, processor, tmp_path / "t")
    rc = main(["collab", "demo", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vision encoder" in err[0]
