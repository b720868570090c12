"""What the joint-embedding methods share: MLP heads (projectors, predictors) and the EMA update of a momentum
target (BYOL, MoCo v2), so each method says only its sizes and rates.

Legend: ``B`` batch, ``F`` encoder features.
"""

from __future__ import annotations

import torch
from torch import nn


def projection_mlp(in_features: int, hidden: int, out_features: int, layers: int = 2, last_norm: bool = False) -> nn.Sequential:
    """``layers`` linear layers, batch norm and ReLU between them: (B, in_features) -> (B, out_features).

    SimCLR and MoCo v2 use 2 layers; BYOL's projector and predictor 2 layers with a hidden batch norm; SwAV 2
    layers. ``last_norm`` adds an affine-free batch norm on the output (as SimCLR v2 / MoCo v3 do).
    """
    if layers < 1:
        raise ValueError(f"a projection needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    modules.append(nn.Linear(width, out_features, bias=not last_norm))
    if last_norm:
        modules.append(nn.BatchNorm1d(out_features, affine=False))
    return nn.Sequential(*modules)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for every parameter of two same-shaped modules.

    Buffers (batch-norm running statistics) are left alone: the target, run in training mode, keeps its own.
    """
    for target_parameter, online_parameter in zip(target.parameters(), online.parameters(), strict=True):
        target_parameter.mul_(momentum).add_(online_parameter, alpha=1.0 - momentum)
