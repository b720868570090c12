"""Group-masked modelling (Atito et al. 2022, "GMML is All you Need"; Anwar et al., SPCXR, for chest X-rays),
2D and 3D.

The input is corrupted in connected rectangular blocks (boxes in 3D), filled with noise or zeros, or with
content copied from another image of the batch ("alien" blocks); the encoder sees every token of the
corrupted input, and a light head reconstructs the pixels; the L1 loss counts the corrupted pixels only.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``G`` patch grid, ``L`` tokens,
``D`` encoder width, ``E`` head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from chestssl.data.batch import Batch
from chestssl.models.vit import ViT

FILLS = ("noise", "zeros")
CORRUPTIONS = FILLS + ("alien",)
MAX_BLOCKS = 100_000  # internal safety stop of the block loop; far above what any ratio below 1 needs

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (start per axis, size per axis) in pixels


def group_mask_with_boxes(batch: int, spatial_shape: Sequence[int], max_side_fraction: float,
                          ratio_range: tuple[float, float], generator: torch.Generator | None = None,
                          align_to: int | None = None, device: torch.device | str | None = None,
                          ) -> tuple[torch.Tensor, list[list[Box]]]:
    """:func:`group_mask`, also returning the boxes drawn for each image (start and size per axis, pixels)."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    low, high = ratio_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high < 1, got {ratio_range}")
    if not 0.0 < max_side_fraction <= 1.0:
        raise ValueError(f"max_side_fraction must be in (0, 1], got {max_side_fraction}")
    unit = 1
    if align_to is not None:
        if align_to < 1 or any(s % align_to for s in spatial_shape):
            raise ValueError(f"align_to {align_to} must be at least 1 and divide the spatial shape {spatial_shape}")
        unit = align_to
    grid = tuple(s // unit for s in spatial_shape)  # blocks are drawn on this grid (pixels when unaligned)
    dims = len(grid)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = generator.device if generator is not None else device
    max_side = torch.tensor([max(1, int(max_side_fraction * g)) for g in grid], device=device)
    sizes = torch.tensor(grid, device=device)

    # built where the model runs: a 3D mask at full resolution is large
    target = low + (high - low) * torch.rand(batch, generator=generator, device=draw_device).to(device)  # (B,)
    mask = torch.zeros(batch, *grid, dtype=torch.bool, device=device)
    axes = [torch.arange(g, device=device) for g in grid]
    boxes: list[list[Box]] = [[] for _ in range(batch)]
    for _ in range(MAX_BLOCKS):
        active = mask.flatten(1).float().mean(dim=1) < target  # (B,) images still below their target
        if not active.any():
            break
        # one block for every image at once: side in 1..max_side, start so that it fits
        uniform = torch.rand(2, batch, dims, generator=generator, device=draw_device).to(device)
        side = 1 + (uniform[0] * max_side).long().clamp(max=max_side - 1)  # (B, dims)
        start = (uniform[1] * (sizes - side + 1)).long().clamp(min=0)  # (B, dims)
        block = active.view(batch, *([1] * dims))
        for axis, coords in enumerate(axes):
            inside = (coords >= start[:, axis, None]) & (coords < start[:, axis, None] + side[:, axis, None])  # (B, G_a)
            shape = [batch] + [1] * dims
            shape[1 + axis] = grid[axis]
            block = block & inside.view(shape)
        mask |= block
        starts, sides = (start * unit).tolist(), (side * unit).tolist()
        for index in active.nonzero().flatten().tolist():
            boxes[index].append((tuple(starts[index]), tuple(sides[index])))
    else:
        raise RuntimeError("group masking did not reach its target ratio")  # internal invariant
    if unit > 1:  # grid cells -> pixels
        for axis in range(dims):
            mask = mask.repeat_interleave(unit, dim=1 + axis)
    return mask.unsqueeze(1), boxes  # (B, 1, *S)


def group_mask(batch: int, spatial_shape: Sequence[int], max_side_fraction: float,
               ratio_range: tuple[float, float], generator: torch.Generator | None = None,
               align_to: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Group masks of connected rectangular blocks (boxes in 3D), True where a pixel is corrupted.

    For each image a target ratio is drawn uniformly from ``ratio_range``; blocks, each side between 1 and
    ``max(1, floor(max_side_fraction * side))`` and placed uniformly inside the image, are added until the
    corrupted fraction reaches the target. Guarantee: ``low <= fraction < high + max_block / N``, where the
    overshoot is at most one block (``max_block`` the largest block's pixel count, ``N`` the image's).
    With ``align_to`` (the patch size) blocks are drawn on the patch grid: every box edge lies on it.

    Args:
        batch: B.
        spatial_shape: S, (H, W) or (D, H, W).
        max_side_fraction: largest block side as a share of each image side.
        ratio_range: (low, high) of the corrupted fraction, 0 < low <= high < 1.
        generator: optional torch.Generator; the draws are reproducible with it.
        align_to: optional grid cell (patch size) that block edges snap to.
        device: where the mask is returned.

    Returns:
        bool (B, 1, *S), True where corrupted.
    """
    return group_mask_with_boxes(batch, spatial_shape, max_side_fraction, ratio_range, generator, align_to, device)[0]


def corrupt(x: torch.Tensor, mask: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (B, C, *S) with the pixels where ``mask`` (B, 1, *S) is True replaced.

    ``noise``: standard Gaussian noise (inputs are normalised); ``zeros``: 0; ``alien``: the same pixels of
    another image of the batch, image b taking image b - 1 (a roll by one: no image copies itself). A batch of
    one has no other image, so ``alien`` raises.
    """
    if mode not in CORRUPTIONS:
        raise ValueError(f"corruption mode must be one of {CORRUPTIONS}, got {mode!r}")
    if mode == "noise":
        draw_device = generator.device if generator is not None else x.device
        fill = torch.randn(x.shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)
    elif mode == "zeros":
        fill = torch.zeros_like(x)
    else:
        if x.shape[0] < 2:
            raise ValueError("alien corruption copies from another image of the batch: it needs at least 2 images")
        fill = x.roll(1, dims=0)
    return torch.where(mask, fill, x)


def masked_pixel_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the corrupted pixels only (GMML's reconstruction loss).

    Args:
        prediction, target: (B, C, *S).
        mask: bool (B, 1, *S), True where corrupted; every channel of a corrupted pixel counts.
    """
    weight = mask.expand_as(target).to(prediction.dtype)
    return ((prediction - target).abs() * weight).sum() / weight.sum().clamp(min=1.0)


class ReconstructionHead(nn.Module):
    """Per-token MLP on the patch tokens, then a transposed convolution (kernel = stride = patch) to pixels."""

    def __init__(self, encoder: ViT, hidden_size: int = 256) -> None:
        super().__init__()
        config = encoder.config
        self.grid = encoder.grid
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        conv = nn.ConvTranspose2d if encoder.spatial_dims == 2 else nn.ConvTranspose3d
        self.to_pixels = conv(hidden_size, encoder.in_channels, kernel_size=config.patch_size, stride=config.patch_size)
        # MAE's initialisation: xavier for the linear layers; the transposed convolution is a per-token linear
        # map E -> (patch pixels x C), initialised as that matrix (like MAE's decoder head)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.to_pixels.weight.data.view(hidden_size, -1).T)
        nn.init.zeros_(self.to_pixels.bias)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, D) encoder output -> (B, C, *S) pixels."""
        tokens = self.mlp(latent[:, 1:])  # (B, L, E), class token dropped
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)  # (B, E, *G)
        return self.to_pixels(grid)


@dataclass(frozen=True)
class GroupMaskConfig:
    """Group-masking settings (``groupmask.*``): the blocks, how they are filled, the head.

    Each image draws its corrupted fraction from [min(0.5, ratio), ratio]; with ``alien_probability`` it is
    instead corrupted with blocks copied from another image of the batch, covering about ``alien_fraction``.
    """

    ratio: float = 0.75  # largest corrupted fraction p; each image draws from [min(0.5, p), p]
    max_side_fraction: float = 0.3  # largest block side as a share of every image side
    fill: str = "noise"  # noise or zeros: what corrupted pixels become
    alien_probability: float = 0.5  # chance an image is corrupted with blocks from another image instead
    alien_fraction: float = 0.3  # corrupted fraction of an alien-corrupted image
    align_to_patches: bool = False  # block edges on the patch grid
    head_hidden_size: int = 256  # width of the reconstruction head's MLP

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"groupmask.ratio must be in (0, 1), got {self.ratio}")
        if not 0.0 < self.max_side_fraction <= 1.0:
            raise ValueError(f"groupmask.max_side_fraction must be in (0, 1], got {self.max_side_fraction}")
        if self.fill not in FILLS:
            raise ValueError(f"groupmask.fill must be one of {FILLS}, got {self.fill!r}")
        if not 0.0 <= self.alien_probability <= 1.0:
            raise ValueError(f"groupmask.alien_probability must be in [0, 1], got {self.alien_probability}")
        if not 0.0 < self.alien_fraction < 1.0:
            raise ValueError(f"groupmask.alien_fraction must be in (0, 1), got {self.alien_fraction}")
        if self.head_hidden_size < 1:
            raise ValueError(f"groupmask.head_hidden_size must be at least 1, got {self.head_hidden_size}")


class GroupMask(nn.Module):
    """ViT group-masked modelling; ``forward(batch)`` returns the L1 loss on the corrupted pixels.

    Unlike MAE the encoder sees every token (of the corrupted input); ``.encoder`` is the plain ViT.
    """

    encoders = ("vit",)
    Config = GroupMaskConfig
    num_views = 1

    def __init__(self, encoder: ViT, config: GroupMaskConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"GroupMask needs a ViT encoder, got {getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or GroupMaskConfig()
        self.config = config
        self.encoder = encoder
        self.head = ReconstructionHead(encoder, config.head_hidden_size)

    def make_corruption(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *S) -> corrupted (B, C, *S) and bool mask (B, 1, *S), True where corrupted."""
        config = self.config
        batch, spatial = x.shape[0], x.shape[2:]
        align = self.encoder.config.patch_size if config.align_to_patches else None
        ratio = (min(0.5, config.ratio), config.ratio)
        mask = group_mask(batch, spatial, config.max_side_fraction, ratio, generator, align, x.device)
        corrupted = corrupt(x, mask, config.fill, generator)
        if batch > 1 and config.alien_probability > 0:  # alien content needs another image in the batch
            draw_device = generator.device if generator is not None else x.device
            alien = (torch.rand(batch, generator=generator, device=draw_device) < config.alien_probability).to(x.device)
            alien_mask = group_mask(batch, spatial, config.max_side_fraction, (config.alien_fraction,) * 2,
                                    generator, align, x.device)
            chosen = alien.view(batch, *([1] * (x.ndim - 1)))  # (B, 1, ...) per image
            corrupted = torch.where(chosen, corrupt(x, alien_mask, "alien"), corrupted)
            mask = torch.where(chosen, alien_mask, mask)
        return corrupted, mask

    def forward_encoder(self, corrupted: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, 1 + L, D): every token, corrupted or not, goes through the encoder."""
        return self.encoder.forward_features(corrupted)

    def forward_loss(self, x: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_pixel_l1(prediction.float(), x.float(), mask)

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 loss on the corrupted pixels of ``batch.images`` (B, C, *S)."""
        x = batch.images
        corrupted, mask = self.make_corruption(x, generator)
        prediction = self.head(self.forward_encoder(corrupted))  # (B, C, *S)
        return self.forward_loss(x, prediction, mask)

    @torch.no_grad()
    def preview(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Original | corrupted | reconstruction (prediction in the corrupted pixels, the original elsewhere)."""
        x = batch.images
        corrupted, mask = self.make_corruption(x, generator)
        prediction = self.head(self.forward_encoder(corrupted)).to(x.dtype)
        return {"original": x, "corrupted": corrupted, "reconstruction": torch.where(mask, prediction, x)}
