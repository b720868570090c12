"""One N-d patchify for 2D images and 3D volumes, any channel count.

Shapes: ``B`` batch, ``C`` channels, ``S`` spatial sizes (H, W) or (D, H, W), ``G`` patch-grid sizes (S / p),
``L`` tokens (prod G), ``P`` voxels per patch (p ** spatial_dims).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch


def grid_size(spatial_size: Sequence[int], patch_size: int) -> tuple[int, ...]:
    """Patch-grid size per spatial axis; raises ValueError if a size is not a multiple of ``patch_size``."""
    if any(s % patch_size for s in spatial_size):
        raise ValueError(f"spatial size {tuple(spatial_size)} is not divisible by patch size {patch_size}")
    return tuple(s // patch_size for s in spatial_size)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images or volumes into flattened non-overlapping patches.

    Args:
        x: (B, C, *S) tensor, each spatial size divisible by ``patch_size``.
        patch_size: edge length p of a cubic (square) patch.

    Returns:
        (B, L, P * C) tensor; tokens in row-major grid order, each patch flattened spatially with channels last.
    """
    batch, channels, *spatial = x.shape
    grid = grid_size(spatial, patch_size)
    dims = len(spatial)
    # (B, C, G1, p, G2, p, ...) -> (B, G1, G2, ..., p, p, ..., C)
    x = x.reshape(batch, channels, *[v for g in grid for v in (g, patch_size)])
    grid_axes = [2 + 2 * i for i in range(dims)]
    patch_axes = [3 + 2 * i for i in range(dims)]
    x = x.permute(0, *grid_axes, *patch_axes, 1)
    return x.reshape(batch, prod(grid), patch_size**dims * channels)


def unpatchify(tokens: torch.Tensor, patch_size: int, spatial_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, P * C) -> (B, C, *S)."""
    grid = grid_size(spatial_size, patch_size)
    dims = len(grid)
    batch = tokens.shape[0]
    expected = (prod(grid), patch_size**dims * channels)
    if tuple(tokens.shape[1:]) != expected:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit grid {grid} x patch {patch_size} x C {channels}")
    # (B, G1, G2, ..., p, p, ..., C) -> (B, C, G1, p, G2, p, ...)
    x = tokens.reshape(batch, *grid, *([patch_size] * dims), channels)
    order = [0, 2 * dims + 1]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    x = x.permute(*order)
    return x.reshape(batch, channels, *spatial_size)
