"""examples/train.py: a tiny run writes its log and checkpoints; --resume continues exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import require_examples_extra

from deq_functional._tree import named_leaves
from deq_functional.gradients import GRAD_MODES

require_examples_extra()
pytestmark = pytest.mark.examples
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train  # noqa: E402

TINY = ["--dataset", "synthetic", "--limit", "96", "--batch-size", "32", "--width", "8", "--blocks", "1",
        "--max-iter", "20", "--quiet"]


def _params(out: Path) -> list[tuple[str, torch.Tensor]]:
    return named_leaves(torch.load(out / "params.pt", weights_only=True))


@pytest.mark.parametrize("mode", sorted(GRAD_MODES))
def test_one_epoch_writes_log_and_params(tmp_path, mode):
    out = tmp_path / mode
    train.main(TINY + ["--grad-mode", mode, "--epochs", "1", "--out", str(out)])
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["grad_mode"] == mode and len(log["epochs"]) == 1
    record = log["epochs"][0]
    for key in ("train_loss", "train_accuracy", "test_accuracy", "mean_forward_iterations", "mean_residual", "seconds"):
        assert key in record and record[key] == record[key]  # present and not NaN
    assert 1 <= record["mean_forward_iterations"] <= 20
    params = dict(_params(out))
    assert "latent.block0.conv1.weight" in params and params["latent.block0.conv1.weight"].shape == (8, 8, 3, 3)
    assert log["num_params"] == sum(t.numel() for t in params.values())
    # The run changed the params: compare with a fresh init from the same seed.
    config = train.Config(dataset="synthetic", width=8, blocks=1)
    fresh = train.build_model(config, train.datasets.load("synthetic"), torch.device("cpu"))[1]
    assert not torch.equal(params["readout.fc.weight"], fresh["readout"]["fc"]["weight"].detach())


def test_training_learns_synthetic(tmp_path):
    train.main(["--dataset", "synthetic", "--width", "8", "--blocks", "1", "--epochs", "3", "--batch-size", "32",
                "--lr", "5e-3", "--quiet", "--out", str(tmp_path)])
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["epochs"][-1]["test_accuracy"] > 0.8  # chance is 0.1


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(TINY + ["--epochs", "2", "--out", str(straight)])
    train.main(TINY + ["--epochs", "1", "--out", str(resumed)])
    train.main(TINY + ["--epochs", "2", "--out", str(resumed), "--resume"])
    for (name, a), (_, b) in zip(_params(straight), _params(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    logs = [json.loads((p / "log.json").read_text())["epochs"] for p in (straight, resumed)]
    assert [e["epoch"] for e in logs[1]] == [1, 2]
    assert logs[0][1]["train_loss"] == pytest.approx(logs[1][1]["train_loss"], abs=1e-6)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(TINY + ["--epochs", "1", "--out", str(tmp_path), "--resume"])


@pytest.mark.parametrize("model", ["mlp", "multiscale"])
def test_other_models_train(tmp_path, model):
    train.main(TINY + ["--model", model, "--epochs", "1", "--out", str(tmp_path), "--solver", "anderson"])
    assert json.loads((tmp_path / "log.json").read_text())["config"]["model"] == model


def test_missing_dataset_files_exit_with_instructions(tmp_path):
    with pytest.raises(SystemExit, match="--download"):
        train.main(["--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                    "--quiet"])


def test_ddp_flag_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun"):
        train.main(TINY + ["--ddp", "--out", str(tmp_path)])


def test_grad_mode_and_solver_come_from_the_library():
    import deq_functional as dq

    for name, cls in GRAD_MODES.items():
        assert type(train.make_grad_mode(train.Config(grad_mode=name))) is cls
    assert train.make_grad_mode(train.Config(grad_mode="neumann", neumann_k=3)) == dq.Neumann(3)
    assert train.make_solver(train.Config(solver="broyden", max_iter=7, tol=1e-5)) == dq.Broyden(max_iter=7, tol=1e-5)
