"""Batched augmentations on tensors (one affine resample per batch, no per-image Python loop).

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop (area ``crop_scale``, aspect ``crop_ratio``), rotation up to ``rotate_degrees``,
    horizontal flip with ``flip_probability``, and brightness/contrast jitter of relative size ``intensity``."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    rotate_degrees: float = 10.0
    flip_probability: float = 0.0
    intensity: float = 0.1


def random_affine(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (B, C, *S) in place of an image library's per-image transforms.

    The random numbers are drawn on the CPU from ``generator`` so a seeded epoch is the same on any device.
    """
    batch, spatial_dims = x.shape[0], x.ndim - 2

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    area = uniform(*config.crop_scale)
    log_ratio = uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    extent = torch.stack([area.sqrt() * log_ratio.exp().sqrt(), area.sqrt() / log_ratio.exp().sqrt()], dim=1)
    if spatial_dims == 3:
        extent = torch.cat([extent, area.sqrt().unsqueeze(1)], dim=1)
    extent = extent.clamp(max=1.0)  # (B, dims): crop size relative to the image, per axis (x, y[, z])
    centre = (1.0 - extent) * (2 * torch.rand(batch, spatial_dims, generator=generator) - 1)
    theta = torch.zeros(batch, spatial_dims, spatial_dims + 1)
    angle = uniform(-1, 1) * math.radians(config.rotate_degrees)
    rotation = torch.eye(spatial_dims).repeat(batch, 1, 1)
    rotation[:, 0, 0], rotation[:, 0, 1] = angle.cos(), -angle.sin()
    rotation[:, 1, 0], rotation[:, 1, 1] = angle.sin(), angle.cos()
    flip = torch.where(torch.rand(batch, generator=generator) < config.flip_probability, -1.0, 1.0)
    scale = torch.diag_embed(extent)
    scale[:, 0, 0] *= flip
    theta[:, :, :spatial_dims] = rotation @ scale
    theta[:, :, spatial_dims] = centre
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if config.intensity > 0:
        shape = (batch,) + (1,) * (x.ndim - 1)
        gain = uniform(1 - config.intensity, 1 + config.intensity).view(shape).to(x.device, x.dtype)
        bias = uniform(-config.intensity, config.intensity).view(shape).to(x.device, x.dtype)
        out = out * gain + bias
    return out
