"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), 2D and 3D.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial, ``L`` tokens, ``D`` encoder width, ``E`` decoder width,
``P`` values per patch (patch voxels x C).
"""

from __future__ import annotations

import torch
from torch import nn

from chestssl.methods.losses import lung_patches, lung_weighted_l1, masked_patch_loss, normalise_patches
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
        self.head = nn.Linear(hidden_size, config.patch_size**config.spatial_dims * config.in_channels)
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


class MAE(nn.Module):
    """ViT masked autoencoder; ``forward(x)`` returns the reconstruction loss on hidden patches.

    With ``lung_weight`` set, ``forward(x, lung_mask=...)`` uses the lung-weighted L1 of Dack et al. 2025:
    hidden patches that are mostly lung count fully, the others with weight ``lung_weight``.
    """

    def __init__(
        self,
        encoder: ViT,
        decoder_hidden_size: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        loss_kind: str = "mse",
        lung_weight: float | None = None,
        lung_threshold: float = 0.25,
        lung_loss_normalise: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder, decoder_hidden_size, decoder_depth, decoder_num_heads)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.loss_kind = loss_kind
        self.lung_weight = lung_weight
        self.lung_threshold = lung_threshold
        self.lung_loss_normalise = lung_loss_normalise

    def make_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(batch_size, self.encoder.num_tokens, self.mask_ratio, generator=generator, device=device)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, *S), bool (B, L) -> (B, 1 + L_visible, D): the encoder sees only visible tokens."""
        return self.encoder.forward_features(x, visible=~mask)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, mask)

    def forward_loss(self, x: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor,
                     lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        patch_size = self.encoder.config.patch_size
        target = patchify(x, patch_size)  # (B, L, P)
        if self.norm_pix_loss:
            target = normalise_patches(target)
        if self.lung_weight is not None:
            if lung_mask is None:
                raise ValueError("this MAE uses the lung-weighted loss: pass the batch's lung_mask (B, 1, *S)")
            is_lung = lung_patches(lung_mask, patch_size, self.lung_threshold)
            return lung_weighted_l1(prediction.float(), target.float(), mask, is_lung, self.lung_weight, self.lung_loss_normalise)
        return masked_patch_loss(prediction.float(), target.float(), mask, self.loss_kind)

    def forward(self, batch: torch.Tensor | tuple, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss on hidden patches of ``batch``: images (B, C, *S), or a loader's ``(x, y[, lung_mask])`` tuple."""
        if isinstance(batch, (tuple, list)):
            x = batch[0]
            if lung_mask is None and len(batch) > 2:
                lung_mask = batch[2]
        else:
            x = batch
        if mask is None:
            mask = self.make_mask(x.shape[0], x.device, generator)
        prediction = self.forward_decoder(self.forward_encoder(x, mask), mask)
        return self.forward_loss(x, prediction, mask, lung_mask)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images rebuilt from the visible patches: (B, C, *S), visible patches pasted back in.

        With a normalised-pixel target the prediction is de-normalised with each true patch's mean and std,
        as the MAE visualisation does, so the picture shows structure rather than the patch statistics.
        """
        config = self.encoder.config
        prediction = self.forward_decoder(self.forward_encoder(x, mask), mask).float()
        target = patchify(x, config.patch_size).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            prediction = prediction * std + mean
        merged = torch.where(mask.unsqueeze(-1), prediction, target)
        return unpatchify(merged, config.patch_size, x.shape[2:], config.in_channels)
