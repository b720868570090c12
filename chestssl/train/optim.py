"""Parameter groups and learning-rate schedules as small pure functions (MAE ``util/lr_sched.py``,
``util/lr_decay.py``; nanoGPT ``configure_optimizers``)."""

from __future__ import annotations

import math

from collections.abc import Callable

import torch
from torch import nn


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warm-up, then half-cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    depth: int = 0,
    layer_of: Callable[[str], int] | None = None,
    part_of: Callable[[str], str] | None = None,
) -> list[dict]:
    """AdamW groups: no weight decay for ``ndim < 2`` (biases, norms, tokens); with ``layer_decay`` < 1 the
    parameter at layer ``i`` of ``depth + 1`` gets ``lr_scale = layer_decay ** (depth + 1 - i)`` (BEiT/MAE).

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: decay for matrices and kernels.
        layer_decay: per-layer factor; 1.0 switches layer-wise decay off.
        depth: number of layer groups below the head (an encoder's ``num_layers``; needed when layer_decay < 1).
        layer_of: maps a parameter name to its layer index in 0..depth+1 (an encoder's ``layer_id``).
        part_of: maps a parameter name to a part ("encoder", "head"); parts never share a group, and each
            group records its ``part`` (for schedules that treat the encoder apart, e.g. freeze-then-unfreeze).
    """
    groups: dict[tuple[str, int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_of(name) if (layer_of is not None and layer_decay != 1.0) else depth + 1
        decay = parameter.ndim >= 2 and not name.endswith(("cls_token", "pos_embed", "mask_token"))
        part = part_of(name) if part_of is not None else ""
        key = (part, layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "part": part,
            }
        groups[key]["params"].append(parameter)
    return list(groups.values())


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> float:
    """Write ``base_lr * multiplier * lr_scale`` into each group; returns the unscaled rate for logging."""
    lr = base_lr * multiplier
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
