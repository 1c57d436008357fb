"""Train a reference implicit network with a chosen gradient mode.

    python examples/train.py --dataset digits --model conv --grad-mode jfb --epochs 10 --out runs/jfb
    python examples/train.py --dataset mnist --data-dir ~/data --download --device cuda --out runs/mnist
    torchrun --standalone --nproc_per_node 2 examples/train.py --ddp --dataset digits --out runs/ddp

Everything is functional: the params are a nested dict of tensors, the forward
pass is ``deq_functional.models.predict`` (``N(d) = S(z*)``, ``z* = R(z*, Q(d))``)
and ``loss.backward()`` reaches the params through ``dq.fixed_point``'s grad mode.
Per epoch: a tqdm bar (loss, accuracy, mean forward iterations, mean residual),
then ``OUT/log.json`` (config + one record per epoch), ``OUT/params.pt``
(``torch.save`` of the params dict) and ``OUT/checkpoint.pt`` (params, optimiser,
Lipschitz-rescaling state, epoch) for ``--resume``.

Forward solves use ``per_sample=True`` (each image is its own fixed-point problem,
converged images are frozen), so a sample's result does not depend on what else is
in its batch; that is what makes a ``--ddp`` run equal a single-process run on the
same global batches. After every optimiser step the latent weights are projected
back to ``Lip_z(R) ≤ --lipschitz`` (the JFB paper's rescaling; ``conv`` and ``mlp``).

``--ddp`` (under ``torchrun``): gloo on CPU, nccl on CUDA; params broadcast from
rank 0, the gradients of the params pytree all-reduced (averaged) by hand after
``backward()``, data sharded by ``DistributedSampler``; ``--batch-size`` is the
global batch. Rank 0 evaluates and writes the files; each rank also writes its
final replica to ``OUT/params.rank{r}.pt``.

This script calls ``torch.set_flush_denormal(True)`` (CPU speed: the tails of
converging iterations produce denormals); the library itself does not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as datasets  # noqa: E402
from distributed import all_reduce_grads, init_ddp  # noqa: E402

import deq_functional as dq  # noqa: E402
from deq_functional._tree import named_leaves, tree_map  # noqa: E402
from deq_functional.gradients import GRAD_MODES, as_grad_mode  # noqa: E402
from deq_functional.models import MODELS, count_params, predict  # noqa: E402
from deq_functional.solvers import SOLVERS  # noqa: E402


@dataclass
class Config:
    dataset: str = "digits"
    model: str = "conv"
    grad_mode: str = "jfb"
    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    neumann_k: int = 5
    width: int = 32
    blocks: int = 1
    lipschitz: float = 0.9
    gamma: float = 0.5
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    out: str = "runs/train"
    resume: bool = False
    ddp: bool = False
    data_dir: str | None = None
    download: bool = False
    limit: int = 0
    quiet: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    c = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=datasets.DATASETS, default=c.dataset)
    p.add_argument("--model", choices=sorted(MODELS), default=c.model)
    p.add_argument("--grad-mode", choices=sorted(GRAD_MODES), default=c.grad_mode)
    p.add_argument("--solver", choices=sorted(SOLVERS), default=c.solver)
    p.add_argument("--max-iter", type=int, default=c.max_iter, help="forward (and IFT adjoint) iteration budget")
    p.add_argument("--tol", type=float, default=c.tol, help="relative-residual tolerance")
    p.add_argument("--neumann-k", type=int, default=c.neumann_k, help="terms of Neumann(k)")
    p.add_argument("--width", type=int, default=c.width, help="latent channels (conv, multiscale) or units (mlp)")
    p.add_argument("--blocks", type=int, default=c.blocks, help="latent residual blocks (conv)")
    p.add_argument("--lipschitz", type=float, default=c.lipschitz, help="bound kept on Lip_z(R) (conv, mlp); 0: off")
    p.add_argument("--gamma", type=float, default=c.gamma, help="γ of the conv model's R = γ·(u + res(u))")
    p.add_argument("--epochs", type=int, default=c.epochs)
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=c.lr, help="Adam learning rate")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=c.schedule, help="per-epoch learning-rate schedule")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--device", default=c.device)
    p.add_argument("--compile", action="store_true", help="torch.compile the loss function")
    p.add_argument("--out", default=c.out, help="output folder (log.json, params.pt, checkpoint.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt up to --epochs")
    p.add_argument("--ddp", action="store_true", help="data-parallel under torchrun (gloo on CPU, nccl on CUDA)")
    p.add_argument("--data-dir", default=c.data_dir, help="folder of the mnist/svhn/cifar10 files")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-dir")
    p.add_argument("--limit", type=int, default=c.limit, help="use only the first N training samples (0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = Config(**{k: v for k, v in vars(args).items()})
    for name in ("max_iter", "epochs", "batch_size", "width", "blocks"):
        if getattr(config, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return config


# ----------------------------------------------------------------------------- model, solver, grad mode
def build_model(config: Config, data: datasets.Data, device: torch.device):
    """``(model module, params with requires_grad leaves, projection or None)``."""
    g = torch.Generator().manual_seed(config.seed)
    model = MODELS[config.model]
    if config.model == "conv":
        model = SimpleNamespace(embed=model.embed, readout=model.readout, apply=partial(model.apply, gamma=config.gamma))
        params = MODELS["conv"].init(
            g, data.in_shape, channels=config.width, latent_blocks=config.blocks, num_classes=data.num_classes
        )
    elif config.model == "mlp":
        params = model.init(g, math.prod(data.in_shape), config.width, data.num_classes, contraction=config.lipschitz or None)
    else:
        params = model.init(g, data.in_shape[0], channels=config.width, num_classes=data.num_classes)
    params = tree_map(lambda t: t.to(device).requires_grad_(True), params)
    project = None
    if config.lipschitz and config.model in ("conv", "mlp"):
        gen = torch.Generator().manual_seed(config.seed + 1)

        def project(p, state):
            if config.model == "conv":
                return MODELS["conv"].rescale(p, config.lipschitz, gamma=config.gamma, n_iter=20 if state is None else 2,
                                              state=state, generator=gen)
            return MODELS["mlp"].rescale(p, config.lipschitz, n_iter=20 if state is None else 2, state=state)

    return model, params, project


def make_solver(config: Config):
    return SOLVERS[config.solver](max_iter=config.max_iter, tol=config.tol)


def make_grad_mode(config: Config) -> dq.GradMode:
    """The library's grad mode named ``config.grad_mode``; ``--neumann-k`` sets Neumann's number of terms."""
    return dq.Neumann(config.neumann_k) if config.grad_mode == "neumann" else as_grad_mode(config.grad_mode)


# ----------------------------------------------------------------------------- training
class Trainer:
    """Holds the state of one run: params pytree, optimiser, loaders, rescaling state, log."""

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.config, self.rank, self.world = config, rank, world
        self.device = device or torch.device(config.device)
        if config.batch_size % world:
            raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
        torch.manual_seed(config.seed)
        self.data = datasets.load(config.dataset, config.data_dir, config.download)
        train = self.data.train
        if config.limit:
            train = torch.utils.data.Subset(train, range(min(config.limit, len(train))))
        self.sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
        self.train_loader = DataLoader(train, batch_size=config.batch_size // world, sampler=self.sampler)
        self.test_loader = DataLoader(self.data.test, batch_size=256)
        self.model, self.params, self.project = build_model(config, self.data, self.device)
        self.leaves = [t for _, t in named_leaves(self.params)]
        self.solver, self.grad_mode = make_solver(config), make_grad_mode(config)
        self.opt = torch.optim.Adam(self.leaves, lr=config.lr)
        self.rescale_state, self.epoch = None, 0
        self.log = {"config": asdict(config), "num_params": count_params(self.params), "world_size": world,
                    "torch": str(torch.__version__), "threads": torch.get_num_threads(), "epochs": []}
        if world > 1:
            for t in self.leaves:
                dist.broadcast(t.data, src=0)
        self._project()
        loss_fn = self.loss_fn
        self.step_fn = torch.compile(loss_fn) if config.compile else loss_fn

    def loss_fn(self, params: dict, d: torch.Tensor, y: torch.Tensor):
        logits, info = predict(self.model, params, d, solver=self.solver, grad_mode=self.grad_mode, per_sample=True)
        return F.cross_entropy(logits, y), logits, info

    @torch.no_grad()
    def _project(self) -> None:
        if self.project is None:
            return
        new, self.rescale_state = self.project(self.params, self.rescale_state)
        for (_, old), (_, value) in zip(named_leaves(self.params), named_leaves(new), strict=True):
            if value is not old:
                old.copy_(value)

    def lr_at(self, epoch: int) -> float:
        if self.config.schedule == "constant":
            return self.config.lr
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.config.epochs))

    def train_epoch(self) -> dict:
        c, epoch = self.config, self.epoch
        self.begin_epoch()
        sums = torch.zeros(6, dtype=torch.float64)  # loss·n, correct, n, iterations, residual, rel_residual
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{c.epochs} [{c.grad_mode}]", disable=c.quiet or self.rank != 0,
                   leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for d, y in bar:
            sums += self.train_step(d, y)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                            iters=f"{sums[3] / sums[2]:.1f}", res=f"{sums[4] / sums[2]:.2e}")
        return self.epoch_record(sums, time.perf_counter() - start)

    def begin_epoch(self) -> None:
        """Reshuffle (per-epoch seed) and set this epoch's learning rate."""
        self.sampler.set_epoch(self.epoch)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.epoch)

    def train_step(self, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns float64 sums (loss·n, correct, n, iterations, residual, rel_residual)."""
        d, y = d.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        loss, logits, info = self.step_fn(self.params, d, y)
        loss.backward()
        if self.world > 1:
            all_reduce_grads(self.leaves, self.world)
        self.opt.step()
        self._project()
        n = y.shape[0]
        return torch.stack([loss.detach() * n, (logits.argmax(1) == y).sum(), torch.tensor(n, device=y.device),
                            info.nstep.sum(), info.residual.sum(), info.rel_residual.sum()]).double().cpu()

    def epoch_record(self, sums: torch.Tensor, seconds: float) -> dict:
        """The epoch's log record from the summed step statistics (all-reduced across ranks)."""
        epoch = self.epoch
        if self.world > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        n = sums[2].item()
        return {"epoch": epoch + 1, "lr": self.lr_at(epoch), "seconds": seconds, "train_loss": sums[0].item() / n,
                "train_accuracy": sums[1].item() / n, "mean_forward_iterations": sums[3].item() / n,
                "mean_residual": sums[4].item() / n, "mean_rel_residual": sums[5].item() / n}

    @torch.no_grad()
    def evaluate(self) -> dict:
        sums = torch.zeros(4, dtype=torch.float64)
        for d, y in self.test_loader:
            d, y = d.to(self.device), y.to(self.device)
            logits, info = predict(self.model, self.params, d, solver=self.solver, grad_mode="jfb", per_sample=True)
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                 torch.tensor(y.shape[0], device=y.device), info.nstep.sum()]).double().cpu()
        n = sums[2].item()
        return {
            "test_loss": sums[0].item() / n,
            "test_accuracy": sums[1].item() / n,
            "test_forward_iterations": sums[3].item() / n,
        }

    def save(self, out: Path) -> None:
        params = tree_map(lambda t: t.detach().cpu().clone(), self.params)
        torch.save(params, out / "params.pt")
        torch.save({"params": params, "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                    "rescale_state": self.rescale_state, "log": self.log}, out / "checkpoint.pt")
        (out / "log.json").write_text(json.dumps(self.log, indent=1))

    def resume(self, out: Path) -> None:
        path = out / "checkpoint.pt"
        if not path.exists():
            raise SystemExit(f"--resume: no checkpoint at {path}; run once without --resume first")
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        with torch.no_grad():
            for (_, t), (_, v) in zip(named_leaves(self.params), named_leaves(ckpt["params"]), strict=True):
                t.copy_(v)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.rescale_state, self.epoch = ckpt["rescale_state"], ckpt["epoch"]
        self.log["epochs"] = ckpt["log"]["epochs"]

    def end_epoch(self, record: dict) -> dict:
        """Count the epoch; on rank 0 evaluate, append ``record`` to the log and write the files."""
        self.epoch += 1
        if self.rank == 0:
            previous = self.log["epochs"][-1]["wall_clock"] if self.log["epochs"] else 0.0
            record.update(self.evaluate(), wall_clock=previous + record["seconds"])
            self.log["epochs"].append(record)
            self.save(Path(self.config.out))
            if not self.config.quiet:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        return record

    def fit(self) -> dict:
        """Train from the current epoch up to ``config.epochs``; returns the log."""
        out = Path(self.config.out)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if self.config.resume:
            self.resume(out)
        while self.epoch < self.config.epochs:
            self.end_epoch(self.train_epoch())
        if self.world > 1:
            torch.save(tree_map(lambda t: t.detach().cpu(), self.params), out / f"params.rank{self.rank}.pt")
        return self.log


def run(config: Config) -> Trainer:
    """Train per ``config``; returns the ``Trainer`` (``.params``, ``.log``)."""
    if config.ddp:
        rank, world, device = init_ddp(config)
        try:
            trainer = Trainer(config, rank, world, device)
            trainer.fit()
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return trainer
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def main(argv: list[str] | None = None) -> None:
    torch.set_flush_denormal(True)
    config = parse_args(argv)
    try:
        run(config)
    except datasets.DataNotFoundError as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
