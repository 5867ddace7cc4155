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
    assert [round(r["scores"]["accuracy"] * 10) for r in rows] == [9, 10, 9, 4, 4]
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
    assert result["meta"]["positions"] == "preserve" and "--positions preserve" in result["meta"]["command"]
    assert "positions `preserve`" in markdown_report(result)


def test_quality_user_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "quality", "--methods", "nosuch", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "quality", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_methods_take_per_method_options() -> None:
    from tokensieve.bench.quality import parse_methods, split_method

    assert split_method("sparsevlm:equivalent=output:recycle=false") == (
        "sparsevlm", {"equivalent": "output", "recycle": False})
    assert split_method("random") == ("random", {})
    import tokensieve

    names = tokensieve.methods.names()
    assert parse_methods("vidcom2,all,sparsevlm:equivalent=output") == (
        ["vidcom2"] + [n for n in names if n != "vidcom2"] + ["sparsevlm:equivalent=output"])
    for bad, message in (("sparsevlm:nosuch=1", "does not accept"), ("nosuch:x=1", "unknown method"),
                         ("fastv:layer", "KEY=VALUE"), ("sparsevlm:equivalent=sideways", "equivalent")):
        with pytest.raises(InputError, match=message):
            parse_methods(bad)


def test_inllm_rows_report_equivalent_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-LLM rows carry E_in / E_out (visual tokens entering / leaving each layer, averaged over
    the layers) and the tables show E_in marked ``eq``; a ratio the schedule cannot reach is a
    row with its reason, not a silently different schedule."""
    out = tmp_path / "q"
    code = main(["bench", "quality", "--methods", "fastv,sparsevlm,sparsevlm:equivalent=output", "--retain", "0.25,0.1",
                 "--n", "4", "--out", str(out), "--json"])
    assert code == 0
    rows = {(r["method"], r["retain"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    fastv = rows[("fastv", 0.25)]
    assert fastv["error"] is None and abs(fastv["equivalent_in"] - 0.25 * 256) <= 256 / 16
    assert rows[("none", 1.0)]["equivalent_in"] is None
    # SparseVLM's layers 2/6/15 of 32 go to 1/3/8 of 16: layers 0 and 1 see all 256 tokens, so by
    # the input count it cannot reach 0.1; by its own (output) count it can
    assert rows[("sparsevlm", 0.1)]["error"] is not None and "minimum" in rows[("sparsevlm", 0.1)]["error"]
    e_out = rows[("sparsevlm:equivalent=output", 0.1)]
    assert e_out["error"] is None and abs(e_out["equivalent_out"] - 25.6) <= 4
    assert e_out["equivalent_in"] > e_out["equivalent_out"]
    md = (out / "quality.md").read_text()
    assert " eq |" in md and "sparsevlm` at retain 0.1" in md
