"""Mutation check: does the test suite notice a planted bug?

Each mutant below changes one thing in a temporary copy of the source (a bug that really
changes kept tokens, counts, positions or logits), then runs the tests that should notice it.
A mutant the tests do not fail is a *survivor*: a hole in the suite.

    python scripts/mutants.py              # every mutant, its named tests (a few minutes)
    python scripts/mutants.py -k fastv     # mutants whose name contains "fastv"
    python scripts/mutants.py --full       # every mutant against the whole suite (slow)
    python scripts/mutants.py --list

Exit status: 0 when every mutant was killed, 1 when some survived, 2 when a mutant no longer
applies (its source line changed: update the mutant).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    file: str  # under src/tokensieve
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files under tests/


MUTANTS = (
    Mutant(
        "fastv-least-attended", "FastV keeps the least-attended visual tokens", "methods/inllm.py",
        '''        return head_mean_rows(attn, ctx.layout.visual)


@dataclass
class PDrop(InLLMMethod):''',
        '''        return -head_mean_rows(attn, ctx.layout.visual)


@dataclass
class PDrop(InLLMMethod):''',
        ("tests/test_inllm.py::test_inllm_selections_are_the_methods_own_choice",),
    ),
    Mutant(
        "fastv-wrong-query", "FastV ranks from the token before the last prompt token", "methods/inllm.py",
        '''            return layout.text
        return torch.tensor([layout.last], dtype=torch.long''',
        '''            return layout.text
        return torch.tensor([layout.last - 1], dtype=torch.long''',
        ("tests/test_inllm.py::test_inllm_selections_are_the_methods_own_choice",),
    ),
    Mutant(
        "dycoke-decode-inverted", "DyCoke's decode stage re-selects on stable steps instead of changed ones",
        "methods/inllm.py",
        "        if sim < self.threshold:\n",
        "        if sim >= self.threshold:\n",
        ("tests/test_inllm.py::test_dycoke_decode_choices_are_the_methods_own",),
    ),
    Mutant(
        "sparsevlm-ignores-raters", "SparseVLM ranks with every text token instead of its raters",
        "methods/sparsevlm.py",
        "        return text[raters[raters < text.numel()]]\n",
        "        return text\n",
        ("tests/test_inllm.py::test_inllm_selections_are_the_methods_own_choice",),
    ),
    Mutant(
        "inllm-keep-rounds-down", "in-LLM keep counts round down (77.5 -> 77, 76.6 -> 76)", "methods/inllm.py",
        "    k = int(math.floor(value + 0.5))\n",
        "    k = int(math.floor(value))\n",
        ("tests/test_inllm.py::test_inllm_keep_counts_are_the_published_formulas",),
    ),
    Mutant(
        "preserve-positions-off-by-one",
        "1-D preserve positions: the second half of each kept sequence is shifted by one (a uniform shift of "
        "every id would be an equivalent mutant: RoPE sees only differences)",
        "runtime/trim.py",
        "            rp = pos[:, b, keep] if mrope else pos[b, keep]\n",
        "            rp = pos[:, b, keep] if mrope else pos[b, keep] + (torch.arange(n) >= n // 2).long()\n",
        ("tests/test_runtime.py::test_position_modes_match_reference",),
    ),
    Mutant(
        "fca-frames-swapped", "the shared FCA budget swaps frames 0 and 1", "methods/budget.py",
        "    k = apportion(quotas, K, upper, priority=sc.p)\n    return k, weights\n",
        "    k = apportion(quotas, K, upper, priority=sc.p)\n    if T > 1:\n        k[[0, 1]] = k[[1, 0]]\n"
        "    return k, weights\n",
        ("tests/test_methods.py",),
    ),
    Mutant(
        "labels-wrong-rows", "labels are gathered from the next sample's row", "runtime/patch.py",
        "    return repad([t[b, keep] for b, keep in enumerate(trimmed.stats.emitted)]",
        "    return repad([t[(b + 1) % t.shape[0], keep] for b, keep in enumerate(trimmed.stats.emitted)]",
        ("tests/test_runtime.py::test_labels_are_gathered_with_the_tokens",),
    ),
    Mutant(
        "pre-llm-drops-first-prompt-token", "pre-LLM pruning drops each sample's first prompt token",
        "runtime/trim.py",
        "        keep = keep_mask.nonzero(as_tuple=True)[0]\n",
        "        keep_mask[valid.nonzero(as_tuple=True)[0][0]] = False\n        keep = keep_mask.nonzero(as_tuple=True)[0]\n",
        ("tests/test_runtime.py::test_pruned_matches_reference",),
    ),
    Mutant(
        "emission-order-ignored", "a method's emission order (DyCoke ttm_keep_order) is ignored", "runtime/trim.py",
        "                orders.append((kept_pos, sel.order.to(kept_pos.device)))\n",
        "                pass\n",
        ("tests/test_runtime.py::test_a_methods_emission_order_reaches_the_language_model",),
    ),
    Mutant(
        "sparsevlm-bound-v", "SparseVLM's scheduled keep is bounded by V instead of V - 1", "methods/sparsevlm.py",
        "    return V if V <= 1 else min(int(keep), V - 1)\n",
        "    return V if V <= 1 else min(int(keep), V)\n",
        ("tests/test_inllm.py::test_sparsevlm_keeps_at_most_v_minus_one_like_the_reference",),
    ),
    Mutant(
        "dycoke-count-float32", "DyCoke's merging ratio read as float32", "methods/dycoke.py",
        "        q = min(M, max(1, int((1.0 - float(dycoke_k)) * M)))\n",
        "        q = min(M, max(1, int((1.0 - float(torch.tensor(dycoke_k, dtype=torch.float32))) * M)))\n",
        ("tests/test_methods_peers.py",),
    ),
    Mutant(
        "cache-not-passed", "the in-LLM layer loop does not hand the layers the KV cache", "runtime/compat.py",
        "        return {self.cache: cache}\n",
        "        return {}\n",
        ("tests/test_inllm.py::test_full_retain_is_token_identical",),
    ),
    Mutant(
        "no-call-lock", "compressed calls on one model are not serialised", "runtime/patch.py",
        "        with state.lock:\n",
        "        with contextlib.nullcontext():\n",
        ("tests/test_hardening.py::test_threads_sharing_one_compressed_model_get_their_own_answers",),
    ),
    Mutant(
        "akd-label-shift", "AKD's cross-entropy reads each answer token one position late", "collab/akd.py",
        "            labels[i, p - 1 : p - 1 + len(a)] = torch.tensor(a)  # position t predicts token t+1",
        "            labels[i, p : p + len(a)] = torch.tensor(a)",
        ("tests/test_collab_akd.py::test_loss_terms_against_the_pixel_forward",),
    ),
    Mutant(
        "akd-wavelet-lowpass", "the frequency term also compares the wavelet approximation band", "collab/akd.py",
        "    return list(coeffs[1:])",
        "    return list(coeffs)",
        ("tests/test_collab_akd.py::test_query_kd_against_pywavelets",),
    ),
    Mutant(
        "uplink-newline-dropped", "the uplinked-token path leaves the video's newline token unfilled",
        "models/llava_onevision.py",
        "            out[b, pos] = video[i].to(out.dtype)",
        "            out[b, pos[:-1]] = video[i][:-1].to(out.dtype)",
        ("tests/test_collab_akd.py::test_uplinked_tokens_reproduce_the_pixel_forward",),
    ),
    Mutant(
        "anchor-last-layer-only", "L_anchor compares only the final normed hidden state, not every layer's",
        "collab/akd.py",
        "                   for h, a in zip(states, a_states)]",
        "                   for h, a in zip(states[-1:], a_states[-1:])]",
        ("tests/test_collab_akd.py::test_replayed_samples_keep_the_features_the_student_had_before_the_fit",),
    ),
    Mutant(
        "uplink-budget-overshoots", "the byte budget keeps one clip more than fits",
        "collab/rounds.py",
        "        return encode(lo)",
        "        return encode(min(lo + 1, len(examples)))",
        ("tests/test_collab_akd.py::test_the_uplink_holds_the_least_confident_clips_that_fit_its_byte_budget",),
    ),
    Mutant(
        "deepstack-not-injected", "pre-LLM: the language model's prefill gets no DeepStack levels (Qwen3-VL)",
        "runtime/patch.py",
        "        if extras is not None and kwargs.get(key) is None and embeds is not None \\\n",
        "        if False and extras is not None and kwargs.get(key) is None and embeds is not None \\\n",
        ("tests/test_qwen3_vl.py::test_compressed_prefill_equals_the_unpatched_language_model_on_the_kept_tokens",),
    ),
    Mutant(
        "deepstack-skipped-in-layer-loop", "in-LLM: the layer loop does not add the DeepStack levels",
        "runtime/inllm.py",
        "            h_out = deepstack.add(idx, h_out, mask, origin)",
        "            h_out = h_out",
        ("tests/test_qwen3_vl.py::test_in_llm_methods_equal_the_unpatched_layers_with_deepstack_by_hand",),
    ),
    Mutant(
        "deepstack-rows-by-slot", "in-LLM: DeepStack rows found by current slot, not by LM-input index",
        "runtime/inllm.py",
        "            safe = o.clamp(min=0)",
        "            safe = torch.arange(o.numel(), device=o.device).clamp(max=self.visual.shape[1] - 1)",
        ("tests/test_qwen3_vl.py::test_in_llm_methods_equal_the_unpatched_layers_with_deepstack_by_hand",),
    ),
    Mutant(
        "internvl-frames-as-images", "InternVL: one-tile runs never group into a video",
        "models/internvl.py",
        "            if out and one_tile:",
        "            if False and out and one_tile:",
        ("tests/test_internvl.py::test_tiles_frames_and_thumbnails_are_read_from_the_runs",),
    ),
    Mutant(
        "internvl-tiles-reversed", "InternVL: tile features scattered in reverse order",
        "models/internvl.py",
        "                    embeds[b, run] = flat[used : used + run.numel()]",
        "                    embeds[b, run] = flat.flip(0)[used : used + run.numel()]",
        ("tests/test_internvl.py::test_pre_llm_generate_equals_the_unpatched_decoder_by_hand",),
    ),
    Mutant(
        "hybrid-ranking-unchecked", "Qwen3.5: a method may rank at a linear-attention layer",
        "runtime/inllm.py",
        '        if ranked < len(kinds) and kinds[ranked] == "linear_attention":',
        "        if False:",
        ("tests/test_qwen3_vl.py::test_qwen3_5_ranking_at_a_linear_attention_layer_is_refused_naming_the_full_ones",),
    ),
    Mutant(
        "hybrid-linear-mask-ignored", "Qwen3.5: linear-attention layers get no padding mask in the layer loop",
        "runtime/compat.py",
        "        return create_recurrent_attention_mask(config=config, inputs_embeds=h, attention_mask=mask2d,",
        "        return None and create_recurrent_attention_mask(config=config, inputs_embeds=h, attention_mask=mask2d,",
        ("tests/test_qwen3_vl.py::test_qwen3_5_in_llm_methods_equal_the_unpatched_hybrid_layers_by_hand",),
    ),
    # The lmms-eval plugin (run these with an environment that has lmms-eval: the README's
    # ci:test-eval command, then `python scripts/mutants.py -k lmms`).
    Mutant(
        "lmms-answers-shuffled", "the plugin returns a batch's answers in reverse order",
        "eval/lmms_model.py",
        "                    for i, result in zip(chunk, self._answer(",
        "                    for i, result in zip(chunk[::-1], self._answer(",
        ("tests/test_lmms_eval.py::test_batch_1_and_batch_4_answer_alike",),
    ),
    Mutant(
        "lmms-right-padding", "the plugin pads batches on the right",
        "eval/lmms_model.py",
        '        tokenizer.padding_side = "left"',
        '        tokenizer.padding_side = "right"',
        ("tests/test_lmms_eval.py::test_batch_1_and_batch_4_answer_alike",),
    ),
    Mutant(
        "lmms-stats-first-sample", "every stats line of a batch describes its first sample",
        "eval/lmms_model.py",
        "            sample = samples[j] if samples is not None else None",
        "            sample = samples[0] if samples is not None else None",
        ("tests/test_lmms_eval.py::test_batch_1_and_batch_4_answer_alike",),
    ),
    Mutant(
        "lmms-until-ignored", "the plugin does not cut answers at the task's stop strings",
        "eval/lmms_model.py",
        "        if stop in text:\n",
        "        if False:\n",
        ("tests/test_lmms_eval.py::test_generation_settings_and_stop_strings",),
    ),
    Mutant(
        "lmms-frames-resampled", "the task's clips are written at a different size than rendered",
        "eval/synth_task.py",
        "        stream.width, stream.height = int(array.shape[2]), int(array.shape[1])",
        "        stream.width, stream.height = int(array.shape[2]) + 2, int(array.shape[1])",
        ("tests/test_lmms_eval.py::test_written_task_round_trips_the_frames",),
    ),
    Mutant(
        "flashvid-adts-repeats", "ADTS may pick a token twice (no mask on the picks)", "methods/flashvid.py",
        "        s = nearest.masked_fill(taken, -float(\"inf\"))",
        "        s = nearest.clone()",
        ("tests/test_methods_sota.py",),
    ),
    Mutant(
        "flashvid-tree-links-below", "tree links are made below the threshold, not above", "methods/flashvid.py",
        "    linked = link > threshold",
        "    linked = (link < threshold) & (link > -float(\"inf\"))",
        ("tests/test_methods_sota.py",),
    ),
    Mutant(
        "dpc-noisy-tie", "DPC density ties go to the larger index", "methods/cluster.py",
        "(idx[None, :] < idx[:, None])",
        "(idx[None, :] > idx[:, None])",
        ("tests/test_methods_sota.py",),
    ),
    Mutant(
        "fastvid-merge-weight", "FastVID's context keeps weight 1 - beta on itself", "methods/fastvid.py",
        "        merged = w.unsqueeze(-1) * c + (1 - w).unsqueeze(-1) * mean",
        "        merged = (1 - w).unsqueeze(-1) * c + w.unsqueeze(-1) * mean",
        ("tests/test_methods_sota.py",),
    ),
    Mutant(
        "holitom-ties-to-longer-window", "HoliTom's windows: ties go to the longer window", "methods/holitom.py",
        "            if cand > best:",
        "            if cand >= best:",
        ("tests/test_methods_sota.py",),
    ),
    Mutant(
        "holitom-inner-plain-mean", "the inner merge weighs every absorbed token equally", "methods/inllm.py",
        "        w = torch.pow(2.0, -(r + 1))",
        "        w = torch.pow(2.0, -(0 * r + 1))",
        ("tests/test_methods_sota.py::test_holitom_inner_merge_closed_form",
         "tests/test_inllm.py::test_pre_llm_method_with_an_in_llm_stage_matches_reference"),
    ),
    Mutant(
        "received-unscaled", "the tower's received attention forgets the 1/sqrt(d) scale",
        "models/llava_onevision.py",
        "            q = (q.float() * attn.scale)",
        "            q = (q.float() * 1.0)",
        ("tests/test_signals.py::test_siglip_received_attention_is_the_towers_own",),
    ),
    Mutant(
        "encoder-frames-misplaced", "the encoded frames' features land on the wrong frames", "models/base.py",
        "    rows = (kept.to(encoded.device)[:, None] * per_frame",
        "    rows = (kept.flip(0).to(encoded.device)[:, None] * per_frame",
        ("tests/test_encoder_stage.py::test_skipping_frames_matches_the_unpatched_model_on_the_kept_tokens",),
    ),
    Mutant(
        "encoder-keep-not-mapped", "kept indices among the encoded frames are not mapped back to the video",
        "runtime/trim.py",
        "    keep = frames.to(sel.keep.device)[sel.keep // M] * M + sel.keep % M",
        "    keep = sel.keep",
        ("tests/test_encoder_stage.py::test_skipping_frames_matches_the_unpatched_model_on_the_kept_tokens",),
    ),
    Mutant(
        "encoder-dp-latest-tie", "the frame DP takes the latest of equal-cost next frames", "methods/encoder.py",
        "                j = int(idx[i + 1 : T][cand == best][0])",
        "                j = int(idx[i + 1 : T][cand == best][-1])",
        ("tests/test_encoder_stage.py::test_dp_keeps_one_frame_per_scene_and_ties_go_early",),
    ),
    Mutant(
        "tome-no-proportional-attention", "merged tokens attend as one token, not by their size",
        "methods/tome.py",
        "        if bool((self.sizes == 1).all()):",
        "        if True:",
        ("tests/test_encoder_merge.py::test_merged_tower_equals_duplication_through_the_unpatched_blocks",),
    ),
    Mutant(
        "tome-least-similar", "ToMe merges the least similar A tokens", "methods/tome.py",
        "    order = torch.sort(-best, dim=-1, stable=True).indices",
        "    order = torch.sort(best, dim=-1, stable=True).indices",
        ("tests/test_encoder_merge.py::test_merged_tower_equals_duplication_through_the_unpatched_blocks",),
    ),
)


def _copy_tree(dest: Path) -> None:
    for part in ("src", "tests", "pyproject.toml", "README.md"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / part)


def apply(mutant: Mutant, root: Path) -> bool:
    path = root / "src" / "tokensieve" / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return False
    new = mutant.new
    if "contextlib." in new and "import contextlib" not in text:
        text = "import contextlib\n" + text if not text.startswith('"""') else text.replace(
            "\nimport ", "\nimport contextlib\nimport ", 1)
    path.write_text(text.replace(mutant.old, new))
    return True


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """pytest's exit code, the seconds it took and the first failing test (``-rf`` summary)."""
    env = dict(os.environ, PYTHONPATH=str(root / "src"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired:
        code, output = -1, ""
    failed = next((line[len("FAILED "):] for line in output.splitlines() if line.startswith("FAILED ")), "")
    return code, time.perf_counter() - start, failed[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--full", action="store_true", help="run the whole suite against every mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.what}")
        return 0
    survivors, stale = [], []
    with tempfile.TemporaryDirectory(prefix="tokensieve-mutants-") as tmp:
        base = Path(tmp) / "clean"
        _copy_tree(base)
        probe = subprocess.run([sys.executable, "-c", "import tokensieve; print(tokensieve.__file__)"],
                               env=dict(os.environ, PYTHONPATH=str(base / "src")), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(base)):
            print(f"error: the copy's tokensieve is not the one imported ({probe.stdout.strip()})", file=sys.stderr)
            return 2
        named = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, secs, _ = run_tests(base, ("tests",) if args.full else named, args.timeout)
        print(f"[control] the unmutated copy: {'passes' if code == 0 else f'FAILS (pytest exit {code})'} "
              f"in {secs:.0f}s", flush=True)
        if code != 0:
            print("error: the tests fail without any mutant; fix them first", file=sys.stderr)
            return 2
        for i, m in enumerate(chosen, 1):
            work = Path(tmp) / m.name
            shutil.copytree(base, work)
            if not apply(m, work):
                stale.append(m.name)
                print(f"[{i}/{len(chosen)}] {m.name}: STALE (its source line is gone; update the mutant)", flush=True)
                continue
            code, secs, failed = run_tests(work, ("tests",) if args.full else m.tests, args.timeout)
            verdict = "killed" if code not in (0, 5) else "SURVIVED"
            if code == 5:
                verdict = "SURVIVED (no tests ran: check the test ids)"
            if code not in (0, 5) and code != 1:
                verdict = f"killed (pytest exit {code})"
            print(f"[{i}/{len(chosen)}] {m.name}: {verdict} in {secs:.0f}s — {m.what}", flush=True)
            if failed:
                print(f"        by {failed}", flush=True)
            if verdict.startswith("SURVIVED"):
                survivors.append(m.name)
            shutil.rmtree(work, ignore_errors=True)
    killed = len(chosen) - len(survivors) - len(stale)
    print(f"{killed} of {len(chosen)} mutants killed" + (f"; survivors: {', '.join(survivors)}" if survivors else "")
          + (f"; stale: {', '.join(stale)}" if stale else ""))
    return 2 if stale else (1 if survivors else 0)


if __name__ == "__main__":
    sys.exit(main())
