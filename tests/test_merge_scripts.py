"""The merge-versus-drop scripts: scripts/plot_sweep.py on a fabricated sweep result (the PNG is
written and is a PNG; the summary it plots is the sweep's mean per-domain change)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def plot_sweep():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("plot_sweep")
    finally:
        sys.path.remove(str(SCRIPTS))


def _row(testbed, method, ratio, code, prose, seeds=1):
    return {"testbed": testbed, "method": method, "ratio": ratio, "experts_kept": 8, "routed_kept": None,
            "seeds": seeds, "ppl": {"code": code, "prose": prose}, "ppl_min": {"code": code, "prose": prose},
            "ppl_max": {"code": code, "prose": prose}, "mean_ppl": (code * prose) ** 0.5}


def test_plot_sweep_writes_one_png_per_testbed(plot_sweep, tmp_path):
    rows = [_row("tiny", "dense", 0.0, 10.0, 20.0)]
    for ratio, scale in ((0.25, 1.1), (0.5, 1.5)):
        rows += [_row("tiny", "reap", ratio, 10 * scale, 20 * scale), _row("tiny", "random", ratio, 30, 40, seeds=3),
                 _row("tiny", "hc_smoe", ratio, 12, 24), _row("tiny", "hc_smoe@router=exact", ratio, 11, 22),
                 _row("tiny", "dern", ratio, 13, 26)]
    first = tmp_path / "a.json"
    first.write_text(json.dumps({"aggregated": rows}))
    second = tmp_path / "b.json"  # another testbed, plus a duplicate row that must not override the first file's
    second.write_text(json.dumps({"aggregated": [_row("other", "dense", 0.0, 5, 5), _row("other", "reap", 0.5, 6, 7),
                                                 _row("tiny", "reap", 0.5, 99, 99)]}))
    out = tmp_path / "docs" / "{testbed}-rebuilt"
    assert plot_sweep.main([str(first), str(second), "--out", str(out)]) == 0
    for testbed in ("tiny", "other"):
        png = tmp_path / "docs" / f"{testbed}-rebuilt" / plot_sweep.PNG_NAME
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    aggregated = plot_sweep.load_aggregated([first, second])
    kept = [r for r in aggregated if r["testbed"] == "tiny" and r["method"] == "reap" and r["ratio"] == 0.5]
    assert len(kept) == 1 and kept[0]["ppl"]["code"] == 15.0
    # mean over domains of ppl / dense - 1: (12/10 - 1 + 24/20 - 1) / 2
    assert plot_sweep.mean_increase(_row("tiny", "hc_smoe", 0.5, 12, 24), rows[0]) == pytest.approx(0.2)
    table = plot_sweep.summary_table(rows, "tiny")
    assert "| random | +150.0% | +150.0% |" in table  # (30/10 - 1 + 40/20 - 1) / 2
    assert "| hc_smoe | +20.0% (0.13x random) | +20.0% (0.13x random) |" in table
    assert [plot_sweep.line_style(m) for m in ("hc_smoe", "hc_smoe@router=exact", "ream@router=vanilla", "dern", "reap")] \
        == ["--", "-", "--", "-.", "-"]


def test_merge_vs_drop_summary_by_hand():
    sys.path.insert(0, str(SCRIPTS))
    try:
        tasks = importlib.import_module("merge_vs_drop_tasks")
    finally:
        sys.path.remove(str(SCRIPTS))
    assert tasks.common_prefix_length(" def f(x):", " def g(x):") == 5
    assert tasks.common_prefix_length("", "abc") == 0 and tasks.common_prefix_length("ab", "ab") == 2
    mc = lambda a, c1, c2, c3: {"arith_mc": a, "cont_code": c1, "cont_prose": c2, "cont_legal": c3}
    results = [{"testbed": "t", "method": "dense", "ppl": {"code": 10.0, "math": 2.0}, "arith_em": 0.5,
                "generated": {"code": 4.0, "prose": 2.0, "legal": 0.0}, "mc": mc(0.5, 0.6, 0.3, 0.3)},
               {"testbed": "t", "method": "reap", "ppl": {"code": 12.0, "math": 3.0}, "arith_em": 0.25,
                "generated": {"code": 1.0, "prose": 2.0, "legal": 0.0}, "mc": mc(0.25, 0.3, 0.3, 0.3)}]
    dense, reap = tasks.summary_rows(results)
    assert reap["ppl_change"] == pytest.approx((0.2 + 0.5) / 2)
    assert reap["gen_chars"] == pytest.approx(1.0) and reap["d_gen_chars"] == pytest.approx(-1.0)
    assert reap["cont_mc"] == pytest.approx(0.3) and reap["d_cont_mc"] == pytest.approx(-0.1)
    assert reap["d_arith_em"] == pytest.approx(-0.25) and reap["d_arith_mc"] == pytest.approx(-0.25)
    assert dense["d_cont_mc"] == 0.0
    table = tasks.markdown([dense, reap])
    assert "| t | reap | +35.0% | 1.00 (-1.00) | 25.0% (-25.0) | 25.0% (-25.0) | 30.0% (-10.0) |" in table
