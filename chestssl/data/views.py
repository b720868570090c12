"""Augmented views of a batch, made on the batch's device in one call (no per-image Python loop), 2D and 3D.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W). A method asks for as many views as it
needs: one for MAE, two augmented views for contrastive methods, more (some smaller) for multi-crop. The random
numbers are drawn on the CPU from the epoch's generator, so a seeded epoch is the same on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewConfig:
    """One view: random resized crop (area share ``crop_scale``, aspect ``crop_ratio``; a cube's depth follows the
    area), in-plane rotation up to ``rotate_degrees``, a flip of each axis in ``flip_axes`` with
    ``flip_probability`` (-1 is left-right, -2 up-down, -3 the CT's z), brightness/contrast jitter of relative
    size ``intensity``, and an output side ``size`` (None keeps the input's; multi-crop asks for smaller ones)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # area share of the random resized crop
    crop_ratio: tuple[float, float] = (0.8, 1.25)  # its aspect-ratio range
    rotate_degrees: float = 10.0  # in-plane rotation up to this
    flip_probability: float = 0.0  # probability of each flip
    flip_axes: tuple[int, ...] = (-1,)  # axes flipped: -1 left-right, -2 up-down, -3 z
    intensity: float = 0.1  # brightness/contrast jitter
    size: int | None = None  # output side (null: the input's)

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {list(self.crop_ratio)}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if not set(self.flip_axes) <= {-1, -2, -3}:
            raise ValueError(f"flip_axes must be among -1 (left-right), -2 (up-down), -3 (z), got {list(self.flip_axes)}")
        if self.rotate_degrees < 0 or self.intensity < 0:
            raise ValueError(f"rotate_degrees and intensity must be >= 0, got {self.rotate_degrees}, {self.intensity}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")


def random_view(x: torch.Tensor, config: ViewConfig, generator: torch.Generator,
                lung_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One augmented view of a float batch (B, C, *S), and the lung mask (B, 1, *S) moved the same way.

    Every random number is drawn whatever the settings, so changing one setting does not shift the others.
    """
    batch, spatial_dims = x.shape[0], x.ndim - 2
    if spatial_dims == 2 and -3 in config.flip_axes:
        raise ValueError("flip axis -3 (z) needs volumes; 2D images have axes -1 and -2")

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    area = uniform(*config.crop_scale)
    log_ratio = uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    offset = 2 * torch.rand(batch, spatial_dims, generator=generator) - 1
    angle = uniform(-1, 1) * math.radians(config.rotate_degrees)
    flips = torch.rand(batch, 3, generator=generator) < config.flip_probability  # (B, axes -1, -2, -3)
    gain = uniform(1 - config.intensity, 1 + config.intensity)
    bias = uniform(-config.intensity, config.intensity)

    for axis in config.flip_axes:  # exact flips of image and mask together
        flip = flips[:, -axis - 1].to(x.device).view((batch,) + (1,) * (x.ndim - 1))
        x = torch.where(flip, x.flip(axis), x)
        if lung_mask is not None:
            lung_mask = torch.where(flip, lung_mask.flip(axis), lung_mask)

    size = config.size or x.shape[-1]
    geometric = config.crop_scale != (1.0, 1.0) or config.rotate_degrees > 0 or size != x.shape[-1]
    if geometric:
        extent = torch.stack([area.sqrt() * log_ratio.exp().sqrt(), area.sqrt() / log_ratio.exp().sqrt()], dim=1)
        if spatial_dims == 3:
            extent = torch.cat([extent, area.sqrt().unsqueeze(1)], dim=1)
        extent = extent.clamp(max=1.0)  # (B, dims): crop size relative to the input, per axis (x, y[, z])
        centre = (1.0 - extent) * offset
        rotation = torch.eye(spatial_dims).repeat(batch, 1, 1)
        rotation[:, 0, 0], rotation[:, 0, 1] = angle.cos(), -angle.sin()
        rotation[:, 1, 0], rotation[:, 1, 1] = angle.sin(), angle.cos()
        theta = torch.cat([rotation @ torch.diag_embed(extent), centre.unsqueeze(-1)], dim=2)  # (B, dims, dims + 1)
        shape = [batch, x.shape[1]] + [size] * spatial_dims
        grid = F.affine_grid(theta.to(x.device, x.dtype), shape, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if lung_mask is not None:
            moved = F.grid_sample(lung_mask.to(grid.dtype), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False)
            lung_mask = moved > 0.5
    if config.intensity > 0:
        shape = (batch,) + (1,) * (x.ndim - 1)
        x = x * gain.view(shape).to(x.device, x.dtype) + bias.view(shape).to(x.device, x.dtype)
    return x, lung_mask
