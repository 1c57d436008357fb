"""examples/compare.py (what `make demo` runs), end to end on a few images: files, keys, plots, invariants.

The smoke run trains every mode for one epoch (4 steps) on 256 ``synthetic``
images, which is enough to learn them: chance is 10%, each mode scores ≥ 80% on
the 256 test images (100% when measured). The reported accuracy is checked
against a re-evaluation of the saved params, and the timing fields against the
per-mode logs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from helpers import require_examples_extra

require_examples_extra()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compare  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402

from deq_functional.models import predict  # noqa: E402

pytestmark = pytest.mark.examples

SMOKE = ["--dataset", "synthetic", "--limit", "256", "--epochs", "1", "--depths", "1,3"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    compare.main(["--out", str(out), *SMOKE])
    torch.set_flush_denormal(False)  # compare.main sets it; the module-scoped run must not leak it
    return out, json.loads((out / "summary.json").read_text())


def test_demo_defaults_to_mnist5k():
    args = compare.parse_args([])
    assert compare.DEMO.dataset == args.dataset == "mnist5k" and args.epochs == compare.DEMO.epochs
    assert "mnist5k" in train.datasets.DATASETS


def test_compare_smoke_files_and_keys(smoke):
    out, summary = smoke
    assert summary["config"]["dataset"] == "synthetic" and summary["data"] == {"train_images": 256, "test_images": 256}
    for mode in compare.MODES:
        r = summary[mode]
        assert {"test_accuracy", "seconds_per_epoch", "mean_forward_iterations", "peak_saved_bytes"} <= set(r)
        assert 1 <= r["mean_forward_iterations"] <= compare.DEMO.max_iter and r["peak_saved_bytes"] > 0
        assert (out / mode / "log.json").exists() and (out / mode / "params.pt").exists()
        assert len(summary["details"][mode]["epochs"]) == 1
    for name in report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "REPORT.md").read_text()
    assert "| JFB |" in text and "| Unrolled |" in text and "accuracy_vs_time.png" in text
    assert "| paper, Table 2, MNIST | 60,000 / 10,000 |" in text and "| 99.4% | 17.6 | 28.4 | 0.62 |" in text
    assert "| this run, synthetic | 256 / 256 |" in text and "256 training images instead of MNIST's 60,000" in text


def test_compare_smoke_learns_and_reports_what_the_saved_params_score(smoke):
    out, summary = smoke
    data = train.datasets.load("synthetic")
    d, y = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
    config = train.Config(**summary["config"])
    for mode in compare.MODES:
        r, log = summary[mode], json.loads((out / mode / "log.json").read_text())
        assert r["test_accuracy"] >= 0.8, (mode, r["test_accuracy"])  # chance: 0.1
        # The reported accuracy is the final params' (params.pt) on the test set, evaluated afresh.
        model, _, _ = train.build_model(config, data, torch.device("cpu"))
        params = torch.load(out / mode / "params.pt", weights_only=True)
        with torch.no_grad():
            logits, _ = predict(model, params, d, solver=train.make_solver(config), grad_mode="jfb", per_sample=True)
        assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(r["test_accuracy"], abs=1e-9)
        # The summary's timing fields come from the log's epochs.
        seconds = [e["seconds"] for e in log["epochs"]]
        assert r["seconds_per_epoch"] == statistics.median(seconds) and r["train_seconds"] == pytest.approx(sum(seconds))
        assert summary["details"][mode]["epochs"] == log["epochs"]


def test_compare_smoke_memory_flat_in_depth_except_unrolled(smoke):
    _, summary = smoke
    depth = summary["details"]
    # Unrolled keeps every iteration for backward; the implicit modes do not depend on depth.
    assert depth["unrolled"]["saved_bytes_vs_depth"]["3"] > depth["unrolled"]["saved_bytes_vs_depth"]["1"]
    for mode in ("jfb", "ift", "neumann"):
        assert depth[mode]["saved_bytes_vs_depth"]["3"] == depth[mode]["saved_bytes_vs_depth"]["1"]
    checks = summary["checks"]
    assert set(checks) == {"jfb_test_accuracy", "ift_minus_jfb_accuracy_points", "jfb_over_ift_seconds_per_epoch",
                           "implicit_saved_bytes_deepest_over_shallowest", "unrolled_saved_bytes_deepest_over_shallowest"}
    assert checks["implicit_saved_bytes_deepest_over_shallowest"] == {"value": 1.0, "target": "== 1 (flat)", "ok": True}
    assert checks["unrolled_saved_bytes_deepest_over_shallowest"]["ok"]


def _mode(acc: float, seconds: float, depth_bytes: dict) -> dict:
    return {"test_accuracy": acc, "seconds_per_epoch": seconds, "saved_bytes_vs_depth": depth_bytes}


def test_checks_fail_when_targets_are_missed():
    flat, grows = {1: 100, 8: 100}, {1: 100, 8: 800}
    good = {"jfb": _mode(0.97, 1.0, flat), "ift": _mode(0.975, 2.0, flat), "neumann": _mode(0.97, 1.2, flat),
            "unrolled": _mode(0.97, 3.0, grows)}
    assert all(c["ok"] for c in report.checks(good, "mnist5k").values())
    bad = {"jfb": _mode(0.95, 1.5, flat), "ift": _mode(0.97, 2.0, flat), "neumann": _mode(0.97, 1.2, {1: 100, 8: 101}),
           "unrolled": _mode(0.97, 3.0, flat)}
    checks = report.checks(bad, "mnist5k")
    assert not any(c["ok"] for c in checks.values()), checks
    assert checks["jfb_test_accuracy"]["target"] == ">= 0.96"
    assert report.checks(good, "digits")["jfb_test_accuracy"]["target"] == ">= 0.97"
    assert checks["ift_minus_jfb_accuracy_points"]["value"] == pytest.approx(2.0)
    assert checks["jfb_over_ift_seconds_per_epoch"]["value"] == pytest.approx(0.75)


def test_compare_rejects_unknown_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--modes", "jfb,backprop"])
    assert "unknown ['backprop']" in capsys.readouterr().err
