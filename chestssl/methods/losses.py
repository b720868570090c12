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


def paste_prediction(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalised: bool,
                     denormalise: bool = True) -> torch.Tensor:
    """Predicted patches where ``mask`` hides them, true ones elsewhere: (B, L, P), for a reconstruction picture.

    With a ``normalised`` (per-patch) target the prediction is de-normalised with each true patch's mean and std
    (MAE's visualisation, which hands the picture the hidden patch's brightness and contrast), or, with
    ``denormalise=False``, every patch is shown normalised: only what the model predicts.
    """
    if normalised and denormalise:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        prediction = prediction * std + mean
    elif normalised:
        target = normalise_patches(target)
    return torch.where(mask.unsqueeze(-1), prediction, target)


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


def lung_patches(lung_mask: torch.Tensor, patch_size: int, threshold: float = 0.25) -> torch.Tensor:
    """Which patches are lung: more than ``threshold`` of their voxels inside the lung mask.

    The grid follows ``patch_size`` (the model's), so 8^3 and 16^3 patches are both assigned correctly.

    Args:
        lung_mask: (B, 1, *S) bool or {0, 1} lung mask on the model's input grid.
        patch_size: the model's patch edge p.

    Returns:
        bool (B, L), True where the patch is lung.
    """
    from chestssl.models.patches import patchify

    return patchify(lung_mask.float(), patch_size).mean(dim=-1) > threshold


def lung_weighted_l1(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    is_lung: torch.Tensor,
    lung_weight: float = 0.01,
    normalise: bool = False,
) -> torch.Tensor:
    """Lung-region-weighted reconstruction loss (Dack et al. 2025, "Unmasking Interstitial Lung Diseases").

    Dack et al.: ``mean L1 over hidden lung patches + lung_weight * mean L1 over hidden non-lung patches``, each
    mean pooled over the batch. That sum is not plain L1 at ``lung_weight=1`` (it is the lung mean plus the
    non-lung mean); ``normalise=True`` gives the weighted mean ``(sum_lung + w sum_other) / (n_lung + w n_other)``
    instead, which is exactly the plain masked L1 at ``w=1``. A term with no patch in the batch counts 0.

    Args:
        prediction: (B, L, P) reconstructed patches.
        target: (B, L, P) true patches.
        mask: bool (B, L), True where hidden.
        is_lung: bool (B, L) from :func:`lung_patches`.
        lung_weight: weight w of the non-lung patches.
        normalise: weighted mean instead of the sum of two means.
    """
    per_patch = (prediction - target).abs().mean(dim=-1)  # (B, L)
    lung = (mask & is_lung).to(per_patch.dtype)
    other = (mask & ~is_lung).to(per_patch.dtype)
    lung_sum, other_sum = (per_patch * lung).sum(), (per_patch * other).sum()
    if normalise:
        return (lung_sum + lung_weight * other_sum) / (lung.sum() + lung_weight * other.sum()).clamp_min(1e-12)
    return lung_sum / lung.sum().clamp_min(1.0) + lung_weight * other_sum / other.sum().clamp_min(1.0)
