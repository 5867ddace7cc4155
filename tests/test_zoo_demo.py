"""A 20-question smoke run of ``tokensieve demo`` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokensieve.cli import main


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--n", "20", "--methods", "vidcom2,dycoke,random", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    table = result["table"]
    assert [r["method"] for r in table] == ["none"] + [m for m in ("vidcom2", "dycoke", "random") for _ in (0, 1)]
    base = table[0]
    assert base["visual_tokens"] == 256 and base["accuracy"] >= 0.8  # 0.965 on the demo's 200
    for row in table[1:]:
        if row["method"] != "dycoke":  # DyCoke keeps every 4th frame whole
            assert row["visual_tokens"] == round(256 * row["retain"])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["prefill_ms"] > 0
    # the run is seeded and deterministic: its correct answers out of 20 are pinned (same on the
    # lowest and newest supported transformers); a change here is a change in what methods keep
    correct = [(r["method"], r["retain"], round(r["accuracy"] * 20)) for r in table]
    assert correct == [("none", 1.0, 20), ("vidcom2", 0.25, 12), ("vidcom2", 0.1, 10), ("dycoke", 0.25, 14),
                       ("dycoke", 0.1, 14), ("random", 0.25, 9), ("random", 0.1, 4)]
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    assert (out / "kept_vidcom2_r0.1.png").is_file()
    kept = result["example"]["kept_per_frame"]
    assert sum(kept["vidcom2@0.1"]) == round(256 * 0.1) and min(kept["vidcom2@0.1"]) >= 1


def test_demo_table_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--n", "5", "--methods", "uniform", "--retain", "0.5", "--no-report"])
    assert code == 0
    text = capsys.readouterr().out
    assert "uncompressed" in text and "uniform" in text and "speed-up" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--methods", "nosuch"], "unknown method"),
        (["demo", "--retain", "1.5"], "(0, 1]"),
        (["demo", "--n", "0"], "--n"),
    ],
)
def test_demo_user_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
