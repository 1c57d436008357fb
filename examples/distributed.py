"""Data parallelism for examples/train.py without nn.Module: join torchrun's group, average gradients of a params pytree."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_ddp(config) -> tuple[int, int, torch.device]:
    """Join the torchrun process group; ``(rank, world_size, device)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--ddp needs torchrun, e.g. torchrun --standalone --nproc_per_node 2 examples/train.py --ddp ...")
    cuda = config.device.startswith("cuda")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if cuda else torch.device(config.device)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_grads(leaves: list[torch.Tensor], world: int) -> None:
    """Average ``.grad`` of every leaf across ranks with one all-reduce of the flattened gradients."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in leaves]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(leaves, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = chunk.view_as(p)
