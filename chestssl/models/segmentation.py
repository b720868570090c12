"""Segmentation models: an encoder (ViT or ResNet) plus a decoder to per-pixel (per-voxel) logits.

Legend: ``B`` batch, ``C`` input channels, ``S`` spatial (H, W) or (D, H, W), ``G`` the ViT's token grid
(S / patch), ``L`` tokens (prod G), ``D`` token width, ``K`` classes, ``F`` decoder feature width.

The ViT gets a UNETR-style decoder (Hatamizadeh et al. 2022, "UNETR: Transformers for 3D Medical Image
Segmentation") composed from MONAI's blocks, since MONAI's ``UNETR`` class hard-codes patch 16 and 12 layers;
the ResNet gets a U-Net decoder (Ronneberger et al. 2015) on its stage maps. Either way the model keeps the
very encoder it was given as ``.encoder``, so a pretrained encoder's weights load into it strictly and only
``.decoder`` starts fresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from chestssl.data.batch import Batch


def upsampling_steps(patch_size: int) -> int:
    """The number of 2x upsamplings from the token grid back to the input: log2(patch_size).

    Raises:
        ValueError: ``patch_size`` is not a power of two of at least 2.
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a UNETR-style decoder needs a patch size that is a power of two (2, 4, 8, 16, ...), "
                         f"got {patch_size}")
    return patch_size.bit_length() - 1


def tapped_blocks(depth: int, steps: int) -> tuple[int, ...]:
    """The 1-based blocks whose outputs feed the decoder's intermediate skips, evenly spaced through ``depth``.

    One tap per intermediate resolution (``steps - 1`` of them, shallowest first); the final normed output is
    the deepest feature and is not listed. Depth 12 with 4 steps (patch 16) gives (3, 6, 9) as in UNETR;
    depth 6 with 3 steps (patch 8) gives (2, 4). A shallow encoder may tap one block more than once.
    """
    return tuple(max(1, k * depth // steps) for k in range(1, steps))


def _match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (or zero-pad) the trailing spatial axes of ``x`` to ``size``.

    A stride-2 convolution maps n to ceil(n / 2), so a 2x transposed convolution gives n or n + 1: cropping
    the extra row restores odd sizes (28 -> 14 -> 7 -> 4 -> 8 -> 7).
    """
    x = x[(..., *(slice(0, s) for s in size))]
    missing = [s - have for s, have in zip(size, x.shape[2:])]
    if any(missing):
        pads = [amount for m in reversed(missing) for amount in (0, m)]
        x = F.pad(x, pads)
    return x


class UNETRDecoder(nn.Module):
    """UNETR-style decoder for a ViT of any power-of-two patch size and any depth, 2D or 3D.

    With ``n = log2(patch_size)`` upsampling steps, the resolutions are S / 2^k for k = 0..n. Level 0 is the
    input image through a conv block (width F); level k in 1..n-1 is tapped block k (see
    :func:`tapped_blocks`) reshaped to the grid and upsampled n - k times (width F * 2^k); level n is the
    final normed output. From the deepest level, each up block doubles the resolution and joins the skip
    there, down to full resolution and a 1x1 convolution to K logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: C of the input image.
        hidden_size: D of the tokens.
        patch_size: the ViT's patch edge; a power of two.
        depth: the ViT's number of blocks.
        num_classes: K.
        feature_size: F (UNETR uses 16).
        norm_name: MONAI norm name for the conv blocks (UNETR uses instance norm).
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden_size: int, patch_size: int, depth: int,
                 num_classes: int, feature_size: int = 16, norm_name: str = "instance") -> None:
        super().__init__()
        if num_classes < 1 or feature_size < 1:
            raise ValueError(f"num_classes and feature_size must be at least 1, got {num_classes}, {feature_size}")
        self.steps = upsampling_steps(patch_size)
        self.blocks = tapped_blocks(depth, self.steps)
        self.spatial_dims, self.feature_size = spatial_dims, feature_size
        width = [feature_size * 2**k for k in range(self.steps)]  # decoder width at S / 2^k
        common = {"spatial_dims": spatial_dims, "kernel_size": 3, "norm_name": norm_name, "res_block": True}
        self.input_block = UnetrBasicBlock(in_channels=in_channels, out_channels=width[0], stride=1, **common)
        # skips[k - 1] takes tapped block k from the grid (S / 2^n) up to S / 2^k: n - k transposed convolutions
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(in_channels=hidden_size, out_channels=width[k], num_layer=self.steps - k - 1, stride=1,
                           upsample_kernel_size=2, conv_block=True, **common)
            for k in range(1, self.steps))
        # ups[j] goes from S / 2^(n - j) to S / 2^(n - j - 1), deepest first
        ins = [hidden_size] + width[:0:-1]
        self.ups = nn.ModuleList(UnetrUpBlock(in_channels=a, out_channels=b, upsample_kernel_size=2, **common)
                                 for a, b in zip(ins, width[::-1]))
        self.out = UnetOutBlock(spatial_dims, width[0], num_classes)

    def to_grid(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, 1 + L, D) with the class token first -> (B, D, *G)."""
        patches = tokens[:, 1:]  # (B, L, D)
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)

    def forward(self, x: torch.Tensor, hidden: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
        """Logits (B, K, *S) from the image ``x`` (B, C, *S) and the hidden states of :attr:`blocks` then the
        final normed output, each (B, 1 + L, D)."""
        assert len(hidden) == len(self.blocks) + 1, "one hidden state per tapped block, then the final output"
        skips = [self.input_block(x)] + [block(self.to_grid(h, grid)) for block, h in zip(self.skips, hidden)]
        out = self.to_grid(hidden[-1], grid)  # (B, D, *G), the deepest level
        for up, skip in zip(self.ups, reversed(skips)):
            out = up(out, skip)  # (B, F * 2^k, *S / 2^k)
        return self.out(out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "unetr", "feature_size": self.feature_size, "blocks": list(self.blocks),
                "upsampling_steps": self.steps}


class UpBlock(nn.Module):
    """2x transposed convolution, crop to the skip's size, join the skip (if any), residual conv block."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 norm_name: str) -> None:
        super().__init__()
        transposed = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.upsample = transposed(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
        self.conv = UnetResBlock(spatial_dims, out_channels + skip_channels, out_channels, kernel_size=3, stride=1,
                                 norm_name=norm_name)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        out = _match_size(self.upsample(x), size)  # (B, out_channels, *size)
        if skip is not None:
            out = torch.cat([out, skip], dim=1)
        return self.conv(out)


class UNetDecoder(nn.Module):
    """U-Net decoder on a ResNet's stage maps, 2D or 3D, any input size the encoder accepts.

    From the deepest stage, each up block doubles the resolution and joins the previous stage (width
    ``stage_channels[i]``). Below the first stage's stride (4 for the ImageNet stem, 1 for the small-input
    stem) come extra up blocks of width F without an encoder skip, the last of them joined at full resolution
    by the input image through a conv block. A 1x1 convolution gives K logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: C of the input image.
        stage_channels: channels of each stage, shallowest first.
        stage_strides: stride of each stage; the first a power of two, each next one twice the previous.
        num_classes: K.
        feature_size: F, the width of the levels finer than the first stage; default half its width.
        norm_name: MONAI norm name for the conv blocks.
    """

    def __init__(self, spatial_dims: int, in_channels: int, stage_channels: Sequence[int],
                 stage_strides: Sequence[int], num_classes: int, feature_size: int | None = None,
                 norm_name: str = "instance") -> None:
        super().__init__()
        first = stage_strides[0]
        doubling = all(b == 2 * a for a, b in zip(stage_strides[:-1], stage_strides[1:]))
        if len(stage_channels) != len(stage_strides) or first < 1 or first & (first - 1) or not doubling:
            raise ValueError(f"a U-Net decoder needs one stride per stage, a power of two first and each next one "
                             f"doubling; got channels {list(stage_channels)}, strides {list(stage_strides)}")
        if num_classes < 1 or (feature_size is not None and feature_size < 1):
            raise ValueError(f"num_classes and feature_size must be at least 1, got {num_classes}, {feature_size}")
        self.stage_channels, self.stage_strides = tuple(stage_channels), tuple(stage_strides)
        self.feature_size = max(1, stage_channels[0] // 2) if feature_size is None else feature_size
        self.extra_steps = first.bit_length() - 1  # 2x upsamplings below the first stage: 2 for stride 4
        channels = list(stage_channels)
        self.stage_ups = nn.ModuleList(UpBlock(spatial_dims, channels[i + 1], channels[i], channels[i], norm_name)
                                       for i in reversed(range(len(channels) - 1)))
        self.input_block = None
        self.extra_ups = nn.ModuleList()
        width = channels[0]
        if self.extra_steps:
            self.input_block = UnetResBlock(spatial_dims, in_channels, self.feature_size, kernel_size=3, stride=1,
                                            norm_name=norm_name)
            for step in range(self.extra_steps):
                skip = self.feature_size if step == self.extra_steps - 1 else 0
                self.extra_ups.append(UpBlock(spatial_dims, width, skip, self.feature_size, norm_name))
                width = self.feature_size
        self.out = UnetOutBlock(spatial_dims, width, num_classes)

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, K, *S) from the image ``x`` (B, C, *S) and the stage maps (B, stage_channels[i], *S_i)."""
        out = stages[-1]
        for up, skip in zip(self.stage_ups, reversed(stages[:-1])):
            out = up(out, skip, skip.shape[2:])  # (B, stage_channels[i], *S_i)
        full = x.shape[2:]
        for step, up in enumerate(self.extra_ups):
            remaining = self.extra_steps - step - 1  # 2x steps still to go after this one
            if remaining:
                size = [-(-s // 2**remaining) for s in full]  # ceil, as the strided stem rounds
                out = up(out, None, size)
            else:
                out = up(out, self.input_block(x), full)
        return self.out(out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "unet", "stage_channels": list(self.stage_channels), "stage_strides": list(self.stage_strides),
                "feature_size": self.feature_size, "extra_upsampling_steps": self.extra_steps}


class SegmentationModel(nn.Module):
    """``encoder`` + ``decoder``; ``logits(x)`` (B, C, *S) -> (B, K, *S); ``forward(batch)`` the training loss.

    The loss is Dice + cross-entropy (MONAI's ``DiceCELoss``: softmax over the K classes, Dice on the
    foreground classes, cross-entropy on all), the usual loss of U-Net-style models on small label sets.
    Build it with :func:`build_segmentation`, which picks the decoder for the encoder's kind.
    """

    def __init__(self, encoder: nn.Module, decoder: UNETRDecoder | UNetDecoder, num_classes: int,
                 norm_name: str) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a segmentation model needs background and at least one class, got {num_classes}")
        self.encoder, self.decoder = encoder, decoder
        self.num_classes, self.norm_name = num_classes, norm_name
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Dice + cross-entropy of ``batch.images`` against the label maps ``batch.labels`` (B, *S)."""
        return self.loss(self.logits(batch.images).float(), batch.labels.unsqueeze(1).long())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.decoder, UNETRDecoder):
            hidden = self.encoder.hidden_states(x, blocks=tuple(sorted(set(self.decoder.blocks))))
            by_block = dict(zip(sorted(set(self.decoder.blocks)), hidden))
            # a shallow encoder may tap one block twice; the decoder wants one state per tap, then the last
            return self.decoder(x, [by_block[b] for b in self.decoder.blocks] + [hidden[-1]], self.encoder.grid)
        return self.decoder(x, self.encoder.forward_stages(x))

    def describe(self) -> dict[str, Any]:
        """The decoder's record (kind and sizes) for the model file; the encoder has its own record."""
        return {**self.decoder.describe(), "num_classes": self.num_classes, "norm_name": self.norm_name}


def build_segmentation(encoder: nn.Module, num_classes: int, feature_size: int | None = None,
                       norm_name: str = "instance") -> SegmentationModel:
    """A segmentation model around ``encoder`` (kept as ``.encoder``, not copied) with a fresh decoder.

    Args:
        encoder: a ViT (``kind == "vit"``, UNETR-style decoder) or a ResNet (``kind == "resnet"``, U-Net).
        num_classes: K output channels, background included (at least 2).
        feature_size: F, the decoder's full-resolution width; None for the default (16 for the ViT, half the
            first stage's width for the ResNet).
        norm_name: MONAI norm name for the decoder's conv blocks.

    Raises:
        ValueError: an unknown encoder kind, or a ViT patch size that is not a power of two.
    """
    kind = getattr(encoder, "kind", None)
    if kind == "vit":
        config = encoder.config
        decoder = UNETRDecoder(encoder.spatial_dims, encoder.in_channels, config.hidden_size, config.patch_size,
                               config.depth, num_classes, 16 if feature_size is None else feature_size, norm_name)
    elif kind == "resnet":
        decoder = UNetDecoder(encoder.spatial_dims, encoder.in_channels, encoder.stage_channels,
                              encoder.stage_strides, num_classes, feature_size, norm_name)
    else:
        raise ValueError(f"no segmentation decoder for encoder kind {kind!r}; valid: vit, resnet")
    return SegmentationModel(encoder, decoder, num_classes, norm_name)
