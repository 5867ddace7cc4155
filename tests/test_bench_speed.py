"""The speed benchmark runs end to end on a tiny shape and reports every field (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tokensieve.bench import speed
from tokensieve.cli import main

pytestmark = pytest.mark.harness  # CI runs these on the newest transformers only (.ci/run)


def test_speed_benchmark_runs_and_reports_every_field(tmp_path, capsys):
    code = main(["bench", "speed", "--arch", "tiny", "--frames", "2", "--methods", "vidcom2,fastv",
                 "--retain", "0.9", "--repeats", "1", "--new-tokens", "2", "--threads", "1",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"machine", "command", "rows", "frames", "retain", "repeats"} <= set(result)
    assert {"cpu", "threads", "torch", "transformers"} <= set(result["machine"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "vidcom2", "fastv"}
    for name, row in rows.items():
        assert "error" not in row, row
        for field in speed.FIELDS:
            assert field in row and {"median", "min", "max"} <= set(row[field]), (name, field)
        if name != "none":
            for key in ("prefill_speedup", "flop_ideal_speedup", "efficiency", "peak_vs_baseline_mb",
                        "score_share_of_baseline_prefill"):
                assert key in row
    assert rows["vidcom2"]["visual_kept"]["median"] < rows["none"]["visual_kept"]["median"]
    assert rows["vidcom2"]["llm_prefill_tflops"]["median"] < rows["none"]["llm_prefill_tflops"]["median"]
    assert "equivalent_tokens" in rows["fastv"]
    assert (tmp_path / "speed-tiny.json").exists() and (tmp_path / "speed-tiny.png").exists()
    assert "| uncompressed |" in (tmp_path / "speed-tiny.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--arch", "llava-ov-99b"], "unknown arch"),
    (["--arch", "tiny", "--retain", "0,0.5"], "retain must be in (0, 1]"),
    (["--arch", "tiny", "--retain", "1.5"], "retain must be in (0, 1]"),
    (["--arch", "tiny", "--frames", "0"], "frames must be integers >= 1"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "speed", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_needs_a_model_and_known_methods(capsys):
    assert main(["bench", "speed", "--frames", "2"]) == 2
    assert "needs --arch" in capsys.readouterr().err
    assert main(["bench", "speed", "--arch", "tiny", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_failed_configurations_make_the_benchmark_exit_non_zero(capsys):
    """A configuration that fails (FastV cannot reach retain 0.1 on 4 layers) is reported in its row
    and the command exits 1, not 0."""
    code = main(["bench", "speed", "--arch", "tiny", "--frames", "2", "--methods", "fastv", "--retain", "0.1",
                 "--repeats", "1", "--new-tokens", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "1 of 2 configurations failed" in err and "retain=0.1 leaves no visual token" in err


@pytest.mark.parametrize("arch", ["tiny-qwen3-vl", "tiny-internvl"])
def test_new_family_shapes_run_every_stage(arch, tmp_path, capsys):
    """Qwen3-VL (timestamped frames, DeepStack) and InternVL (frames as context-token runs) shapes:
    a pre-LLM and an in-LLM method compress, and the visual tokens counted are the video's."""
    code = main(["bench", "speed", "--arch", arch, "--frames", "4", "--methods", "vidcom2,fastv",
                 "--retain", "0.9", "--repeats", "1", "--new-tokens", "2", "--threads", "1",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    total = rows["none"]["visual_tokens"]["median"]
    assert total > 0 and rows["vidcom2"]["visual_kept"]["median"] == round(0.9 * total)
