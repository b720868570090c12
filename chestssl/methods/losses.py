"""Losses as pure functions. Shapes: ``B`` batch, ``L`` tokens, ``P`` values per patch (voxels x channels)."""

from __future__ import annotations

import torch


def normalise_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixel target (He et al. 2022, ``norm_pix_loss``): each patch to zero mean, unit var.

    Args:
        target: (B, L, P) patch values.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def masked_patch_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean error (MAE: "loss only on masked patches").

    Args:
        prediction: (B, L, P) reconstructed patches.
        target: (B, L, P) true patches (already normalised if a normalised target is wanted).
        mask: bool (B, L), True where the patch was hidden.
        kind: "mse" or "l1".
    """
    if kind == "mse":
        per_patch = (prediction - target).pow(2).mean(dim=-1)
    elif kind == "l1":
        per_patch = (prediction - target).abs().mean(dim=-1)
    else:
        raise ValueError(f"loss kind must be 'mse' or 'l1', got {kind!r}")
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)
