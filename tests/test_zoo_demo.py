"""A 20-question smoke run of ``tokensieve demo`` through the command line, on both shipped models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokensieve.cli import main

METHODS = ("vidcom2", "fastv", "sparsevlm:equivalent=output")


@pytest.mark.harness
def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--n", "20", "--methods", ",".join(METHODS), "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in result["models"]] == ["embedded", "embedded-qwen2-vl"]
    correct = {}
    for model, visual in zip(result["models"], (256, 128)):
        table = model["table"]
        assert [r["method"] for r in table] == ["none"] + [m for m in METHODS for _ in (0, 1)]
        base = table[0]
        assert base["visual_tokens"] == visual and base["accuracy"] >= 0.8
        for row in table[1:]:
            assert row.get("error") is None, row
            assert 0.0 <= row["accuracy"] <= 1.0 and row["prefill_ms"] > 0
            if row["method"] == "vidcom2":
                assert row["visual_tokens"] == round(visual * row["retain"]) and row["equivalent_in"] is None
            elif row["method"] == "fastv":  # in-LLM: the equivalent count (tokens entering each layer)
                assert abs(row["equivalent_in"] - visual * row["retain"]) <= visual / 16
        kept = model["example"]["kept_per_frame"]
        per_frame = sum(kept["vidcom2@0.1"]) // (2 if model["arch"] == "qwen2-vl" else 1)
        assert per_frame == round(visual * 0.1) and min(kept["vidcom2@0.1"]) >= 1
        correct[model["model"]] = [(r["method"], r["retain"], round(r["accuracy"] * 20)) for r in table]
    # the run is seeded and deterministic: its correct answers out of 20 are pinned (same on the
    # lowest and newest supported transformers); a change here is a change in what methods keep
    assert correct == PINNED
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    assert (out / "kept_embedded_vidcom2_r0.1.png").is_file()
    assert (out / "kept_embedded-qwen2-vl_fastv_r0.25.png").is_file()
    assert (out / "kept_embedded_sparsevlm-equivalent-output_r0.1.png").is_file()


PINNED: dict[str, list[tuple[str, float, int]]] = {
    "embedded": [("none", 1.0, 18), ("vidcom2", 0.25, 20), ("vidcom2", 0.1, 17), ("fastv", 0.25, 20),
                 ("fastv", 0.1, 10), ("sparsevlm:equivalent=output", 0.25, 19), ("sparsevlm:equivalent=output", 0.1, 12)],
    "embedded-qwen2-vl": [("none", 1.0, 20), ("vidcom2", 0.25, 20), ("vidcom2", 0.1, 18), ("fastv", 0.25, 13),
                          ("fastv", 0.1, 6), ("sparsevlm:equivalent=output", 0.25, 18),
                          ("sparsevlm:equivalent=output", 0.1, 7)],
}


def test_demo_table_text(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--n", "5", "--methods", "uniform,sparsevlm", "--retain", "0.1", "--no-report",
                 "--model", "embedded"])
    assert code == 0
    text = capsys.readouterr().out
    assert "uncompressed" in text and "uniform" in text and "speed-up" in text
    assert "not run: sparsevlm at 0.1" in text and "minimum" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--methods", "nosuch"], "unknown method"),
        (["demo", "--retain", "1.5"], "(0, 1]"),
        (["demo", "--n", "0"], "--n"),
        (["demo", "--model", "nosuch-model"], "--model"),
        (["demo", "--methods", "fastv:nosuch=1"], "does not accept"),
    ],
)
def test_demo_user_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
