"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), 2D and 3D.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial, ``L`` tokens, ``D`` encoder width, ``E`` decoder width,
``P`` values per patch (patch voxels x C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chestssl.data.batch import Batch
from chestssl.methods.losses import (lung_patches, lung_weighted_l1, masked_patch_loss, normalise_patches,
                                     paste_prediction)
from chestssl.methods.masking import random_mask
from chestssl.models.patches import patchify, unpatchify
from chestssl.models.vit import Block, ViT, sincos_position_embedding


class MAEDecoder(nn.Module):
    """Light transformer decoder: visible latents plus mask tokens at hidden positions -> patch values."""

    def __init__(self, encoder: ViT, hidden_size: int = 128, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        config = encoder.config
        self.embed = nn.Linear(config.hidden_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.register_buffer("pos_embed", sincos_position_embedding(encoder.grid, hidden_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, config.patch_size**encoder.spatial_dims * encoder.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L_visible, D) latents and bool (B, L) mask -> (B, L, P) predicted patches."""
        latent = self.embed(latent)  # (B, 1 + L_visible, E)
        batch, num_tokens = mask.shape
        tokens = self.mask_token.to(latent.dtype).expand(batch, num_tokens, -1).clone()  # (B, L, E)
        tokens[~mask] = latent[:, 1:].reshape(-1, latent.shape[-1])  # visible latents back at their positions
        tokens = torch.cat([latent[:, :1], tokens + self.pos_embed], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens))[:, 1:]


LOSSES = ("mse", "l1")


@dataclass(frozen=True)
class MAEConfig:
    """MAE settings (``mae.*``): decoder sizes, masking, the reconstruction target and loss.

    ``lung_weight`` switches on the lung-weighted L1 of Dack et al. 2025 (CT volumes with lung masks): hidden
    patches that are mostly lung (more than ``lung_threshold`` of their voxels) count fully, the others with
    weight ``lung_weight``; ``lung_loss_normalise`` gives the weighted mean instead of the sum of two means.
    """

    decoder_hidden_size: int = 128  # decoder token width
    decoder_depth: int = 2  # decoder blocks
    decoder_num_heads: int = 4  # decoder heads
    mask_ratio: float = 0.75  # share of patches hidden
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels
    loss: str = "mse"  # mse or l1
    lung_weight: float | None = None  # weight of non-lung patches in Dack et al.'s lung-weighted L1 (null: off)
    lung_threshold: float = 0.25  # a patch is lung above this share of lung voxels
    lung_loss_normalise: bool = False  # weighted mean instead of Dack et al.'s sum of two means

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.loss not in LOSSES:
            raise ValueError(f"mae.loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("decoder_hidden_size", "decoder_depth", "decoder_num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mae.{name} must be at least 1, got {getattr(self, name)}")
        if self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError(f"mae.decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                             f"mae.decoder_num_heads {self.decoder_num_heads}")
        if self.lung_weight is not None and self.lung_weight < 0:
            raise ValueError(f"mae.lung_weight must be >= 0, got {self.lung_weight}")
        if self.lung_weight is not None and self.loss != "l1":
            raise ValueError("the lung-weighted loss is an L1 loss (Dack et al. 2025): set mae.loss=l1")
        if not 0.0 <= self.lung_threshold < 1.0:
            raise ValueError(f"mae.lung_threshold must be in [0, 1), got {self.lung_threshold}")


class MAE(nn.Module):
    """ViT masked autoencoder; ``forward(batch)`` returns the reconstruction loss on hidden patches.

    With ``config.lung_weight`` set the batch must carry ``lung_mask`` (CT volumes), and the loss is the
    lung-weighted L1 of Dack et al. 2025.
    """

    encoders = ("vit",)
    Config = MAEConfig
    num_views = 1

    def __init__(self, encoder: ViT, config: MAEConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"MAE needs a ViT encoder (its encoder sees only the visible tokens), got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or MAEConfig()
        self.config = config
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder, config.decoder_hidden_size, config.decoder_depth, config.decoder_num_heads)

    def make_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(batch_size, self.encoder.grid, self.config.mask_ratio, generator=generator, device=device)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, *S), bool (B, L) -> (B, 1 + L_visible, D): the encoder sees only visible tokens."""
        return self.encoder.forward_features(x, visible=~mask)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, mask)

    def forward_loss(self, x: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor,
                     lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        patch_size = self.encoder.config.patch_size
        target = patchify(x, patch_size)  # (B, L, P)
        if config.norm_pix_loss:
            target = normalise_patches(target)
        if config.lung_weight is not None:
            if lung_mask is None:
                raise ValueError("this MAE uses the lung-weighted loss: the batch needs a lung_mask (B, 1, *S); "
                                 "pretrain on a CT volume cache")
            is_lung = lung_patches(lung_mask, patch_size, config.lung_threshold)
            return lung_weighted_l1(prediction.float(), target.float(), mask, is_lung, config.lung_weight,
                                    config.lung_loss_normalise)
        return masked_patch_loss(prediction.float(), target.float(), mask, config.loss)

    def forward(self, batch: Batch, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss on the hidden patches of ``batch.images`` (B, C, *S); ``mask`` bool (B, L) or drawn here."""
        x = batch.images
        if mask is None:
            mask = self.make_mask(x.shape[0], x.device, generator)
        prediction = self.forward_decoder(self.forward_encoder(x, mask), mask)
        return self.forward_loss(x, prediction, mask, batch.lung_mask)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor, denormalise: bool = True) -> torch.Tensor:
        """Images rebuilt from the visible patches: (B, C, *S), visible patches pasted back in.

        With a normalised-pixel target the prediction is de-normalised with each true patch's mean and std, as
        the MAE visualisation does, which hands the picture each hidden patch's brightness and contrast; with
        ``denormalise=False`` every patch, predicted or visible, is shown normalised: only what the model predicts.
        """
        patch_size = self.encoder.config.patch_size
        prediction = self.forward_decoder(self.forward_encoder(x, mask), mask).float()
        target = patchify(x, patch_size).float()
        merged = paste_prediction(prediction, target, mask, self.config.norm_pix_loss, denormalise)
        return unpatchify(merged, patch_size, x.shape[2:], self.encoder.in_channels)

    @torch.no_grad()
    def preview(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Original | masked | reconstruction of ``batch.images`` for the reconstruction grid."""
        x = batch.images
        mask = self.make_mask(x.shape[0], x.device, generator)
        patch_size = self.encoder.config.patch_size
        patches = patchify(x, patch_size)
        hidden = torch.where(mask.unsqueeze(-1), torch.full_like(patches, float(x.min())), patches)
        masked = unpatchify(hidden, patch_size, x.shape[2:], x.shape[1])
        panels = {"original": x, "masked": masked, "reconstruction": self.reconstruct(x, mask)}
        if self.config.norm_pix_loss:  # the reconstruction borrows each hidden patch's true mean and std
            panels["prediction (patches normalised)"] = self.reconstruct(x, mask, denormalise=False)
        return panels
