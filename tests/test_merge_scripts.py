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
    assert [plot_sweep.line_style(m) for m in ("hc_smoe", "hc_smoe@router=exact", "ream@router=vanilla", "dern", "reap")] \
        == ["--", "-", "--", "-.", "-"]
