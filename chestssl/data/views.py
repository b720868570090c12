"""Augmented views of a batch, made on the batch's device in one call (no per-image Python loop), 2D and 3D.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``K`` kernel taps. A method asks for as
many views as it needs: one for MAE, two augmented views for contrastive methods, more (some smaller) for
multi-crop. The random numbers are drawn on the CPU from the epoch's generator, so a seeded epoch is the same on
any device (all but the Gaussian noise field, which is drawn on the batch's device).

Chest images are grayscale, so there is no colour jitter: the photometric part of a view is brightness/contrast,
a random gamma, a Gaussian blur and Gaussian noise (the grayscale counterparts of SimCLR's colour distortion and
blur), each off by default.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewConfig:
    """One view: random resized crop (area share ``crop_scale``, aspect ``crop_ratio``; a cube's depth follows the
    area), in-plane rotation up to ``rotate_degrees``, a flip of each axis in ``flip_axes`` with
    ``flip_probability`` (-1 is left-right, -2 up-down, -3 the CT's z), brightness/contrast jitter of relative
    size ``intensity``, and an output side ``size`` (None keeps the input's; multi-crop asks for smaller ones).

    The grayscale augmentations, all off by default: a random ``gamma`` (log-uniform in the range) applied to each
    view's own [min, max] range, so it bends the intensity curve whatever the normalisation and keeps the
    darkest and brightest values; a Gaussian blur with probability ``blur_probability`` and a sigma drawn in
    ``blur_sigma`` (output pixels or voxels, separable, in 3D along z too); Gaussian noise whose std is drawn per
    image in [0, ``noise_std``], in units of the (normalised) model input."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # area share of the random resized crop
    crop_ratio: tuple[float, float] = (0.8, 1.25)  # its aspect-ratio range
    rotate_degrees: float = 10.0  # in-plane rotation up to this
    flip_probability: float = 0.0  # probability of each flip
    flip_axes: tuple[int, ...] = (-1,)  # axes flipped: -1 left-right, -2 up-down, -3 z
    intensity: float = 0.1  # brightness/contrast jitter
    size: int | None = None  # output side (null: the input's)
    gamma: tuple[float, float] = (1.0, 1.0)  # random gamma range on each view's own min-max range ([1, 1]: off)
    blur_probability: float = 0.0  # probability of a Gaussian blur of each view (0: off)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # the blur's sigma range in output pixels (voxels)
    noise_std: float = 0.0  # Gaussian noise, std drawn in [0, this] per image, in model-input units (0: off)

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
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma must satisfy 0 < low <= high, got {list(self.gamma)}")
        if not 0 <= self.blur_probability <= 1:
            raise ValueError(f"blur_probability must be in [0, 1], got {self.blur_probability}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {list(self.blur_sigma)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def grayscale(self) -> bool:
        """Whether any of gamma, blur or noise is on."""
        return self.gamma != (1.0, 1.0) or self.blur_probability > 0 or self.noise_std > 0


# How a joint-embedding method makes its views from the run's ``views.*``: "medical" turns them into contrastive
# views (contrastive_view: stronger crop and intensity, gamma, blur, noise), "base" uses them as set.
VIEW_PRESETS = ("medical", "base")


def contrastive_view(base: ViewConfig) -> ViewConfig:
    """``base`` made strong enough for contrastive learning on chest images; rotation, flips and size are kept.

    Crops down to 30% of the area (with colour distortion, the crop is SimCLR's key augmentation; its 8% can cut a
    small lesion out of a 28-pixel X-ray), brightness/contrast 0.3, gamma 0.7-1.4, a blur half of the time with
    sigma 0.1-1 pixel and light noise: the grayscale stand-ins for SimCLR's colour distortion and blur.
    """
    return replace(base, crop_scale=(0.3, 1.0), intensity=0.3, gamma=(0.7, 1.4), blur_probability=0.5,
                   blur_sigma=(0.1, 1.0), noise_std=0.1)


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Gamma curve of each image on its own [min, max]: (B, C, *S), gamma (B,) -> (B, C, *S).

    ``low + (high - low) * ((x - low) / (high - low)) ** gamma`` with ``low``, ``high`` the image's extremes, so
    the curve is the same on normalised and raw pixels; a constant image is returned unchanged.
    """
    dims = tuple(range(1, x.ndim))
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    span = high - low
    unit = ((x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)).clamp(0, 1)
    curved = low + span * unit.pow(gamma.view(shape).to(x.device, x.dtype))
    return torch.where(span > 0, curved, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, along every spatial axis (2D or 3D), in one grouped
    convolution per axis: (B, C, *S), sigma (B,) in pixels (voxels) -> (B, C, *S).

    ``radius`` (kernel taps ``K = 2 radius + 1``) defaults to 3 sigma of the largest sigma; edges are reflected.
    """
    batch, channels, *spatial = x.shape
    spatial_dims = len(spatial)
    if radius is None:
        radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, min(spatial) - 1)  # reflection needs a pad shorter than the side
    if radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.device, x.dtype).repeat_interleave(channels)  # one kernel per (image, channel)
    kernel = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B C, K)
    convolve = F.conv2d if spatial_dims == 2 else F.conv3d
    y = x.reshape(1, batch * channels, *spatial)  # images as channels of one sample: a grouped convolution
    for axis in range(spatial_dims):
        shape = [batch * channels, 1] + [1] * spatial_dims
        shape[2 + axis] = kernel.shape[1]
        pad = [0] * (2 * spatial_dims)  # F.pad lists the last axis first
        pad[2 * (spatial_dims - 1 - axis)] = pad[2 * (spatial_dims - 1 - axis) + 1] = radius
        y = convolve(F.pad(y, pad, mode="reflect"), kernel.view(shape), groups=batch * channels)
    return y.reshape(x.shape)


def _derived_generator(generator: torch.Generator) -> torch.Generator:
    """A generator seeded from ``generator``'s state, which it does not advance.

    The grayscale augmentations draw from it, so their numbers never shift the draws of later views and
    batches: a config without them gives exactly what it gave before they existed, and switching one on changes
    nothing else of the epoch.
    """
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def random_view(x: torch.Tensor, config: ViewConfig, generator: torch.Generator,
                lung_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One augmented view of a float batch (B, C, *S), and ``lung_mask`` moved the same way: a bool mask or an
    integer label map (B, M, *S), moved by nearest neighbour (no value is blended into another), zero outside.

    Every random number is drawn whatever the settings, so changing one setting does not shift the others; the
    grayscale augmentations draw theirs, after the others, from a generator derived from ``generator`` (see
    :func:`_derived_generator`). Order: flips, crop and rotation, gamma, brightness/contrast, blur, noise.
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
    if config.grayscale:
        own = _derived_generator(generator)
        log_gamma = [math.log(g) for g in config.gamma]
        gamma = (log_gamma[0] + (log_gamma[1] - log_gamma[0]) * torch.rand(batch, generator=own)).exp()
        blurred = torch.rand(batch, generator=own) < config.blur_probability
        sigma = config.blur_sigma[0] + (config.blur_sigma[1] - config.blur_sigma[0]) * torch.rand(batch, generator=own)
        noise_std = config.noise_std * torch.rand(batch, generator=own)
        noise_seed = int(torch.randint(2**62, (1,), generator=own))

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
            lung_mask = moved > 0.5 if lung_mask.dtype == torch.bool else moved.round().to(lung_mask.dtype)
    shape = (batch,) + (1,) * (x.ndim - 1)
    if config.gamma != (1.0, 1.0):
        x = adjust_gamma(x, gamma)
    if config.intensity > 0:
        x = x * gain.view(shape).to(x.device, x.dtype) + bias.view(shape).to(x.device, x.dtype)
    if config.blur_probability > 0 and bool(blurred.any()):
        chosen = blurred.nonzero().squeeze(1)
        radius = max(1, math.ceil(3 * config.blur_sigma[1]))  # from the config, so no image depends on another
        on_device = chosen.to(x.device)
        x = x.index_copy(0, on_device, gaussian_blur(x.index_select(0, on_device), sigma[chosen], radius))
    if config.noise_std > 0:
        # the field is drawn on the batch's device, not copied from the CPU (volumes: millions of voxels a view),
        # so it repeats for a seed on one kind of device but differs between CPU and GPU
        noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(noise_seed), device=x.device,
                            dtype=x.dtype)
        x = x + noise * noise_std.view(shape).to(x.device, x.dtype)
    return x, lung_mask
