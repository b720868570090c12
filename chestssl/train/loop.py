"""The one training loop, shared by pretraining and fine-tuning (nanoGPT ``train.py``; MAE ``engine_pretrain``).

Per-iteration learning rate, a stop on a non-finite loss (every process together under ``torchrun``), autocast
only on GPU, periodic atomic checkpoints, ``metrics.jsonl`` in the run directory, and an exact resume: every
epoch's randomness is derived from ``(seed, epoch)``, so a run restarted from its last checkpoint continues as if
it had never stopped. The loop knows nothing of the method it trains: ``model(batch)`` gives the loss (or the
loss and a dict of scalars to log) and ``model.after_step(progress)``, where defined, runs after each step.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from chestssl.config import to_dict
from chestssl.errors import ChestSSLError
from chestssl.train.checkpoint import load_training_state, remove_stale_temporaries, save_training_state
from chestssl.train.distributed import Context, all_true, barrier, mean_across
from chestssl.train.optim import cosine_schedule, set_learning_rate

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"


class NonFiniteLossError(ChestSSLError, RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is kept for a resume with other settings."""


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: ``epochs`` of ``steps_per_epoch``, base ``lr``, warm-up, cosine to ``min_lr_ratio``."""

    epochs: int
    steps_per_epoch: int
    lr: float
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0


@dataclass(frozen=True)
class Progress:
    """Where the run is, handed to a method's ``after_step``: ``step`` of ``total_steps`` (0-based, counted after
    the step), in ``epoch``."""

    step: int
    total_steps: int
    epoch: int

    @property
    def fraction(self) -> float:
        """Share of training done, in (0, 1]."""
        return (self.step + 1) / max(1, self.total_steps)


# Settings that change where or how often a run writes, not what it computes: a resume may change them.
RUN_ONLY_KEYS = ("run_dir", "device", "checkpoint_every", "grid_every", "num_workers", "overwrite", "trace_test")


def resume_identity(config: Any, unused: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config without :data:`RUN_ONLY_KEYS` and without the
    sections named in ``unused`` (settings the run never reads, such as other methods'), plus ``extra``."""
    left_out = set(RUN_ONLY_KEYS) | set(unused)
    settings = {key: value for key, value in to_dict(config).items() if key not in left_out}
    return {**extra, "config": settings}


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed the global torch/numpy generators for one epoch (dropout, drop-path and mask draws use them)."""
    state = np.random.SeedSequence([seed, epoch, 1000 + rank]).generate_state(1)[0]
    torch.manual_seed(int(state))
    np.random.seed(int(state) % (2**32))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """Drop records of epochs a resumed run will redo, so metrics.jsonl holds each epoch once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("epoch", -1) < start_epoch]
    path.write_text("".join(line + "\n" for line in kept))


def peak_memory_mib(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident memory so far (MiB) and, on a CUDA device, the peak memory allocated on it."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and device.type == "cuda":
        peak["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def train_step(trained: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, context: Context,
               grad_clip: float = 0.0) -> tuple[float, dict[str, Any]]:
    """One optimiser step of the loop: forward (bf16 autocast on GPU only), the non-finite check agreed by every
    process, backward, clipping, step. Returns the loss and the method's extra scalars.

    Benchmarks time this function, so their figures describe what users run.
    """
    with torch.autocast(device_type=context.device.type, dtype=torch.bfloat16, enabled=context.device.type == "cuda"):
        output = trained(batch)
    loss, logged = output if isinstance(output, tuple) else (output, {})
    # every process learns whether any loss was non-finite, so all stop together instead of hanging
    if not all_true(bool(torch.isfinite(loss.detach())), context):
        value = loss.item()
        where = "here" if not math.isfinite(value) else "on another process"
        raise NonFiniteLossError(f"loss is not finite {where} (this process: {value})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        parameters = trained.module.parameters() if hasattr(trained, "module") else trained.parameters()
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    return loss.item(), logged


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[Any]],
    schedule: Schedule,
    context: Context,
    run_dir: Path,
    seed: int,
    identity: dict[str, Any],
    *,
    checkpoint_every: int = 1,
    checkpoint_seconds: float = 60.0,
    on_epoch_end: Callable[[int], dict[str, Any]] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    state: dict[str, Any] | None = None,
    description: str = "train",
) -> dict[str, Any]:
    """Train ``model`` whose ``forward(batch)`` returns a scalar loss, or ``(loss, {name: scalar})``.

    Args:
        model: the method (MAE, classifier...) to train; wrapped in DDP here when the run is distributed. Its
            optional ``after_step(progress)`` is called after every optimiser step with a :class:`Progress`.
        optimizer: built on ``model``'s parameters, groups may carry an ``lr_scale``.
        batches: ``epoch -> iterable of batches`` for this process.
        schedule: epochs, steps and learning-rate schedule.
        context: rank, world size and device (``chestssl.train.distributed.setup``).
        run_dir: where ``checkpoint.safetensors`` and ``metrics.jsonl`` are written.
        seed: the run's seed.
        identity: architecture and config; a checkpoint from a run with another identity is refused.
        checkpoint_every: epochs between checkpoints (the last epoch always writes one).
        checkpoint_seconds: and at least this long between two checkpoints, so runs of many tiny epochs
            (1% of the labels) do not spend their time writing state.
        on_epoch_end: called on every rank after each epoch with the epoch index; returns metrics to log.
        on_epoch_start: called on every rank before each epoch (after ``model.train()``) with its index; a
            schedule that depends only on the epoch (freeze-then-unfreeze) stays exact across a resume.
        state: a JSON-able dict the caller keeps across epochs (e.g. best score); saved in checkpoints.

    Returns:
        The final ``state`` dict, with ``epoch`` and ``step`` filled in.
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    metrics_path = run_dir / "metrics.jsonl"
    state = state if state is not None else {}
    start_epoch = 0
    if checkpoint.exists():
        progress = load_training_state(checkpoint, model, optimizer, identity)
        start_epoch = progress["epoch"]
        state.update(progress.get("state", {}))
        log.info("resumed from %s at epoch %d", checkpoint, start_epoch)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        _truncate_metrics(metrics_path, start_epoch)

    trained = DistributedDataParallel(model) if context.distributed else model
    after_step = getattr(model, "after_step", None)
    total_steps = schedule.epochs * schedule.steps_per_epoch
    warmup_steps = int(schedule.warmup_epochs * schedule.steps_per_epoch)
    last_saved = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_epoch * schedule.steps_per_epoch, desc=description,
               disable=not context.is_main, dynamic_ncols=True, mininterval=2.0)
    for epoch in range(start_epoch, schedule.epochs):
        seed_everything(seed, epoch, context.rank)
        trained.train()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        started, losses, extras = time.perf_counter(), [], {}
        for index, batch in enumerate(batches(epoch)):
            step = epoch * schedule.steps_per_epoch + index
            lr = set_learning_rate(optimizer, schedule.lr, cosine_schedule(step, total_steps, warmup_steps, schedule.min_lr_ratio))
            try:
                loss, logged = train_step(trained, optimizer, batch, context, schedule.grad_clip)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(f"{error} at epoch {epoch} step {step}; the last checkpoint in {run_dir} is "
                                         "kept (resume with a lower learning rate or check the input data)") from None
            if after_step is not None:
                after_step(Progress(step, total_steps, epoch))
            losses.append(loss)
            for name, value in logged.items():
                extras.setdefault(name, []).append(float(value))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": (epoch + 1) * schedule.steps_per_epoch,
            "train_loss": mean_across(float(np.mean(losses)) if losses else float("nan"), context),
            "lr": lr if losses else None,
            "epoch_seconds": round(time.perf_counter() - started, 3),
            **peak_memory_mib(context.device),
            **{name: mean_across(float(np.mean(values)), context) for name, values in sorted(extras.items())},
        }
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch))
        if context.is_main:
            _append_jsonl(metrics_path, record)
            due = (checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0
                   and time.perf_counter() - last_saved >= checkpoint_seconds)  # 0: only the last epoch
            if due or epoch + 1 == schedule.epochs:
                save_training_state(checkpoint, model, optimizer, {"epoch": epoch + 1, "state": state}, identity)
                last_saved = time.perf_counter()
        barrier(context)
    bar.close()
    state.update(epoch=schedule.epochs, step=total_steps)
    return state
