"""``torch.distributed`` set-up for runs launched with ``torchrun`` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" -> the local CUDA device if there is one, else CPU; otherwise the named device."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(requested)


def setup(requested_device: str = "auto") -> Context:
    """Join the process group if ``torchrun`` started us (WORLD_SIZE > 1), else run alone."""
    device = pick_device(requested_device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world_size, backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank=rank, world_size=world_size, device=device)


def mean_across(value: float, context: Context) -> float:
    """Average a scalar over all processes (for logging a loss that every rank computed on its shard)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def all_true(value: bool, context: Context) -> bool:
    """True only if ``value`` is True on every process (one tiny all-reduce; no communication when alone)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([1 if value else 0], dtype=torch.int32, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(tensor: torch.Tensor, context: Context | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every process along dim 0, rank order, without gradient.

    Alone (no process group) it returns ``tensor`` detached. Every process must pass the same shape.
    """
    tensor = tensor.detach()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
