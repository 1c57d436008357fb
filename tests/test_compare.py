"""examples/compare.py (what `make demo` runs), end to end on a few images: files, keys, plots, invariants."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compare  # noqa: E402
import report  # noqa: E402


def test_compare_smoke(tmp_path):
    compare.main(["--out", str(tmp_path), "--epochs", "1", "--limit", "32", "--depths", "1,3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for mode in compare.MODES:
        r = summary[mode]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds_per_epoch"] > 0
        assert 1 <= r["mean_forward_iterations"] <= compare.DEMO.max_iter
        assert r["peak_saved_bytes"] > 0
        assert (tmp_path / mode / "log.json").exists() and (tmp_path / mode / "params.pt").exists()
    depth = summary["details"]
    # Unrolled keeps every iteration for backward; the implicit modes do not depend on depth.
    assert depth["unrolled"]["saved_bytes_vs_depth"]["3"] > depth["unrolled"]["saved_bytes_vs_depth"]["1"]
    for mode in ("jfb", "ift", "neumann"):
        assert depth[mode]["saved_bytes_vs_depth"]["3"] == depth[mode]["saved_bytes_vs_depth"]["1"]
    assert all(len(depth[m]["epochs"]) == 1 for m in compare.MODES)
    assert set(summary["checks"]) == {"jfb_test_accuracy", "ift_minus_jfb_accuracy_points", "jfb_over_ift_seconds_per_epoch"}
    for name in report.PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "REPORT.md").read_text()
    assert "| JFB |" in text and "| Unrolled |" in text and "accuracy_vs_time.png" in text


def test_compare_rejects_unknown_mode(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--modes", "jfb,backprop"])
    assert "unknown ['backprop']" in capsys.readouterr().err
