"""SparK (Tian et al. 2023, "Designing BERT for convolutional networks: sparse and hierarchical masked
modeling"): masked image modelling for chestssl's ResNet, 2D and 3D.

The ResNet sees the masked image and computes on its visible positions only (:mod:`chestssl.methods.sparse`);
at every stage a learned mask token fills the hidden positions ("densify"), and a light U-Net decoder
upsamples from the deepest stage to the input's resolution and channel count, taking the other stages in as
skips. The loss is the MSE of per-cell normalised pixels on the hidden cells only. ``.encoder`` is the plain
ResNet throughout, so the pretrained weights load into it strictly.

The mask grid. SparK masks on the encoder's downsampling grid: 32-px cells at 224 px, a 7 x 7 grid. chestssl's
ResNet with ``small_input=True`` has strides (1, 2, 4, 8), so 64-px images are masked in 8-px cells (8 x 8 cells)
and 32-px images in 4 x 4 cells, but 28-px MedMNIST images are not divisible by 8 (their stages are 28, 14, 7
and 4 positions, rounded up). Padding to 32 px would leave 7 of the 16 cells at least half padding, and
upsampling to 32 px costs 18% more per step and changes the scale fine-tuning sees; instead the default cell is
the largest stage stride that divides the input's side: 4 px at 28 px, the same 7 x 7 = 49 cells as SparK on
ImageNet. The stride-8 deepest stage is then coarser than a cell; it takes every second cell (see
:mod:`chestssl.methods.sparse`), so it stays about as sparse as the mask (39% visible) instead of turning dense.
``mask_cell`` sets the cell explicitly (any side dividing the input; a power of two keeps the stage grids
aligned with the cells). A short comparison on PneumoniaMNIST (``benchmarks/spark_grid.py``: 400 steps of a
quarter-width ResNet-18, then a linear probe) found no choice clearly better than 4-px cells, and the default
is the cheapest aligned one.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``G`` mask-grid sizes (S / cell),
``L`` mask cells (prod G), ``P`` values per cell (cell voxels x C), ``E`` decoder width at a scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil, log2

import torch
from torch import nn

from chestssl.data.batch import Batch
from chestssl.methods.losses import masked_patch_loss, normalise_patches, paste_prediction
from chestssl.methods.masking import random_mask
from chestssl.methods.sparse import sparse_forward_stages
from chestssl.models.patches import grid_size, patchify, unpatchify
from chestssl.models.resnet import ResNet

MIN_DECODER_WIDTH = 16  # the halving decoder widths stop here (ImageNet-stem ResNets upsample 5 times)


def _layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d


def _crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, E, *S') -> (B, E, *size), dropping the extra last row/column a 2x upsampling of a rounded-up map adds."""
    return x[(..., *(slice(0, side) for side in size))]


class UpBlock(nn.Module):
    """2x upsampling (transposed convolution), then ``depth`` conv3x3-bn-relu: (B, E_in, *S) -> (B, E_out, *2S)."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        conv, transposed, norm = _layers(spatial_dims)
        self.upsample = transposed(in_channels, channels, 2, stride=2)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [conv(channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.convs(_crop(self.upsample(x), size))


class SparKDecoder(nn.Module):
    """Light U-Net: densified stage maps in, (B, out_channels, *S) out.

    Each stage map is densified as SparK does: a learned mask token at the hidden positions, a batch norm, and a
    projection to the decoder width of its scale, 1x1 at the deepest stage and 3x3 elsewhere (the 3x3 lets the
    positions next to visible ones see them). Projecting first with 1x1 convolutions, and one convolution per
    upsampling, were cheaper but fitted the contract test's fixed batch more slowly (its loss stayed above 0.9
    of the first after 15 steps).

    The decoder starts from the deepest stage and adds each shallower stage where its upsampling reaches that
    stage's stride. Widths halve at each upsampling from ``width`` (at least ``MIN_DECODER_WIDTH``), each
    upsampling followed by ``depth`` conv3x3-bn-relu; a 1x1 convolution gives the input's channel count.
    """

    def __init__(self, spatial_dims: int, stage_channels: Sequence[int], stage_strides: Sequence[int],
                 out_channels: int, width: int, depth: int = 2) -> None:
        super().__init__()
        conv, _, norm = _layers(spatial_dims)
        total = stage_strides[-1]
        upsamplings = round(log2(total))
        assert 2**upsamplings == total and all(2 ** round(log2(s)) == s for s in stage_strides), stage_strides
        self.strides = tuple(total >> level for level in range(upsamplings + 1))  # decoder scales, deepest first
        widths = [max(width >> level, MIN_DECODER_WIDTH) for level in range(upsamplings + 1)]
        self.stage_strides = tuple(stage_strides)
        deepest = len(stage_strides) - 1
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for channels in stage_channels)
        self.norms = nn.ModuleList(norm(channels) for channels in stage_channels)
        self.projections = nn.ModuleList(
            conv(channels, widths[self.strides.index(stride)], 1 if index == deepest else 3,
                 padding=0 if index == deepest else 1)
            for index, (channels, stride) in enumerate(zip(stage_channels, stage_strides)))
        self.blocks = nn.ModuleList(UpBlock(spatial_dims, a, b, depth) for a, b in zip(widths[:-1], widths[1:]))
        self.head = conv(widths[-1], out_channels, 1)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)

    def densify(self, index: int, stage: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Stage ``index``'s map (B, C_i, *S_i), bool (B, 1, *S_i) -> (B, E, *S_i), its mask token where hidden."""
        token = self.mask_tokens[index].view(1, -1, *([1] * (stage.ndim - 2))).to(stage.dtype)
        return self.projections[index](self.norms[index](torch.where(visible, stage, token)))

    def forward(self, stages: Sequence[torch.Tensor], visibilities: Sequence[torch.Tensor],
                spatial: Sequence[int]) -> torch.Tensor:
        """Stage maps and their bool (B, 1, *S_i) visibilities, finest first -> (B, out_channels, *spatial)."""
        x: torch.Tensor | None = None
        for level, stride in enumerate(self.strides):
            if stride in self.stage_strides:
                index = self.stage_strides.index(stride)
                skip = self.densify(index, stages[index], visibilities[index])
                x = skip if x is None else x + skip
            if level < len(self.blocks):
                x = self.blocks[level](x, [ceil(side / self.strides[level + 1]) for side in spatial])
        return self.head(x)


@dataclass(frozen=True)
class SparKConfig:
    """SparK settings (``spark.*``): masking, the decoder's width and the reconstruction target.

    The decoder width 192 is SparK's ratio of decoder to deepest encoder channels (768 for ResNet-50's 2048)
    applied to ResNet-18's 512.
    """

    mask_ratio: float = 0.6  # share of mask cells hidden (SparK's 60%)
    mask_cell: int | None = None  # side of a mask cell in pixels (null: the largest stage stride dividing the input side)
    decoder_width: int = 192  # decoder channels at the deepest stage, halved at each 2x upsampling (at least 16)
    decoder_depth: int = 2  # conv3x3-bn-relu layers after each 2x upsampling (2, as SparK's decoder)
    norm_pix_loss: bool = True  # reconstruct per-cell normalised pixels

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"spark.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_cell is not None and self.mask_cell < 2:
            raise ValueError(f"spark.mask_cell must be at least 2 pixels (or null), got {self.mask_cell}")
        for name in ("decoder_width", "decoder_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"spark.{name} must be at least 1, got {getattr(self, name)}")


def default_mask_cell(stage_strides: Sequence[int], image_size: int) -> int:
    """The largest stage stride that divides ``image_size``: the total stride where it fits (SparK's choice)."""
    fitting = [stride for stride in stage_strides if stride >= 2 and image_size % stride == 0]
    if not fitting:
        raise ValueError(f"no ResNet stage stride of at least 2 in {list(stage_strides)} divides image size "
                         f"{image_size}; set spark.mask_cell to a side dividing it")
    return max(fitting)


class SparK(nn.Module):
    """Sparse masked modelling around a ResNet; ``forward(batch)`` returns the loss on the hidden cells.

    Logged with the loss: ``deepest_visible``, the share of visible positions in the deepest stage map.
    """

    encoders = ("resnet",)
    Config = SparKConfig
    num_views = 1

    def __init__(self, encoder: ResNet, config: SparKConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"SparK needs a ResNet encoder (it masks a CNN's downsampling grid), got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or SparKConfig()
        cell = config.mask_cell or default_mask_cell(encoder.stage_strides, encoder.image_size)
        if encoder.image_size % cell:
            raise ValueError(f"spark.mask_cell {cell} does not divide the image size {encoder.image_size}")
        self.config = config
        self.mask_cell = cell
        self.encoder = encoder
        self.decoder = SparKDecoder(encoder.spatial_dims, encoder.stage_channels, encoder.stage_strides,
                                    encoder.in_channels, config.decoder_width, config.decoder_depth)

    def make_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """bool (B, L), True where hidden, on the mask grid of images ``x`` (B, C, *S)."""
        grid = grid_size(x.shape[2:], self.mask_cell)
        return random_mask(x.shape[0], grid, self.config.mask_ratio, generator=generator, device=x.device)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, C, *S), bool (B, L) -> stage maps zero at hidden positions, and their visibilities."""
        return sparse_forward_stages(self.encoder, x, mask, self.mask_cell)

    def forward_decoder(self, stages: list[torch.Tensor], visibilities: list[torch.Tensor],
                        spatial: Sequence[int]) -> torch.Tensor:
        """Stage maps -> (B, C, *S) predicted images."""
        return self.decoder(stages, visibilities, spatial)

    def forward_loss(self, x: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on the hidden cells: (B, C, *S) images and predictions, bool (B, L) mask -> scalar."""
        target = patchify(x.float(), self.mask_cell)  # (B, L, P)
        if self.config.norm_pix_loss:
            target = normalise_patches(target)
        return masked_patch_loss(patchify(prediction.float(), self.mask_cell), target, mask, "mse")

    def forward(self, batch: Batch, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on the hidden cells of ``batch.images`` (B, C, *S); ``mask`` bool (B, L) or drawn here."""
        x = batch.images
        if mask is None:
            mask = self.make_mask(x, generator)
        stages, visibilities = self.forward_encoder(x, mask)
        prediction = self.forward_decoder(stages, visibilities, x.shape[2:])
        deepest_visible = visibilities[-1].float().mean()  # a tensor: no device sync here
        return self.forward_loss(x, prediction, mask), {"deepest_visible": deepest_visible}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor, denormalise: bool = True) -> torch.Tensor:
        """Images rebuilt from the visible cells: (B, C, *S), visible cells pasted back in.

        With a normalised-pixel target the prediction is de-normalised with each true cell's mean and std (as
        MAE's visualisation does), which hands the picture each hidden cell's brightness and contrast; with
        ``denormalise=False`` every cell, predicted or visible, is shown normalised instead: only what the model
        predicts.
        """
        cell = self.mask_cell
        stages, visibilities = self.forward_encoder(x, mask)
        prediction = patchify(self.forward_decoder(stages, visibilities, x.shape[2:]).float(), cell)  # (B, L, P)
        target = patchify(x.float(), cell)
        merged = paste_prediction(prediction, target, mask, self.config.norm_pix_loss, denormalise)
        return unpatchify(merged, cell, x.shape[2:], x.shape[1])

    @torch.no_grad()
    def preview(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Original | masked | reconstruction of ``batch.images`` for the reconstruction grid."""
        x = batch.images
        mask = self.make_mask(x, generator)
        cells = patchify(x, self.mask_cell)
        hidden = torch.where(mask.unsqueeze(-1), torch.full_like(cells, float(x.min())), cells)
        masked = unpatchify(hidden, self.mask_cell, x.shape[2:], x.shape[1])
        panels = {"original": x, "masked": masked, "reconstruction": self.reconstruct(x, mask)}
        if self.config.norm_pix_loss:  # the reconstruction borrows each hidden cell's true mean and std
            panels["prediction (cells normalised)"] = self.reconstruct(x, mask, denormalise=False)
        return panels
