"""``tokensieve bench quality``: accuracy per method × retain × family, JSON + Markdown + PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokensieve.bench.quality import markdown_report, parse_retains
from tokensieve.cli import main
from tokensieve.errors import InputError
from tokensieve.zoo.synthvid import FAMILIES


def test_parse_retains() -> None:
    assert parse_retains("0.5, 0.25,0.1") == [0.5, 0.25, 0.1]
    for bad in ("0", "1.2", "x", ""):
        with pytest.raises(InputError):
            parse_retains(bad)


def test_quality_small_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code = main(["bench", "quality", "--methods", "vidcom2,uniform", "--retain", "0.5,0.1", "--n", "10",
                 "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["method"], r["retain"]) for r in rows] == [
        ("none", 1.0), ("vidcom2", 0.5), ("vidcom2", 0.1), ("uniform", 0.5), ("uniform", 0.1)
    ]
    for r in rows:
        assert set(r["scores"]["families"]) == set(FAMILIES)
        assert r["scores"]["n"] == 10
    assert rows[2]["visual_tokens_after"] == round(0.1 * 256)
    # seeded and deterministic (the same on the lowest and newest supported transformers): pinned
    assert [round(r["scores"]["accuracy"] * 10) for r in rows] == [10, 5, 3, 4, 2]
    saved = json.loads((out / "quality.json").read_text())
    assert saved["rows"] == rows
    md = (out / "quality.md").read_text()
    assert md == markdown_report(saved) and "| vidcom2 | 0.1 |" in md
    assert (out / "quality.png").stat().st_size > 1000
    assert all((out / f"quality_{f}.png").is_file() for f in FAMILIES)


def test_quality_positions_reach_every_method(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import tokensieve

    seen: list[object] = []
    real = tokensieve.compress

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("positions"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokensieve, "compress", spy)
    code = main(["bench", "quality", "--methods", "vidcom2,random", "--retain", "0.5", "--n", "5",
                 "--positions", "preserve", "--out", str(tmp_path / "q"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert seen == ["preserve", "preserve"]
    assert result["meta"]["positions"] == "preserve" and result["meta"]["command"].endswith("--positions preserve")
    assert "positions `preserve`" in markdown_report(result)


def test_quality_user_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "quality", "--methods", "nosuch", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "quality", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
