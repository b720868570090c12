"""Vision Transformer for 2D images and 3D volumes, with a forward over a chosen subset of tokens.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``L`` patch tokens, ``D`` width.
Dosovitskiy et al. 2021 (ViT); the visible-token encoder follows He et al. 2022 (MAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.models.patches import grid_size


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a :class:`ViT` (the defaults are ViT-Tiny); the input's shape comes from the data.

    This is the one place ViT defaults live: pretraining, fine-tuning and the encoder file all read them here.
    """

    patch_size: int = 4  # patch edge in pixels (voxels)
    hidden_size: int = 192  # token width
    depth: int = 12  # transformer blocks
    num_heads: int = 3  # attention heads
    mlp_ratio: float = 4.0  # MLP width / token width

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"vit.{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vit.hidden_size {self.hidden_size} is not divisible by vit.num_heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"vit.mlp_ratio must be positive, got {self.mlp_ratio}")


def sincos_position_embedding(grid: tuple[int, ...], width: int) -> torch.Tensor:
    """Fixed N-d sine-cosine position embedding, (prod(grid), width); each axis gets an equal share."""
    dims = len(grid)
    per_axis = 2 * (width // (2 * dims))
    if per_axis == 0:
        raise ValueError(f"hidden size {width} is too small for a {dims}-d position embedding")
    omega = 1.0 / 10000 ** (np.arange(per_axis // 2, dtype=np.float64) / (per_axis / 2))
    coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    parts = []
    for axis in coords:
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)  # (L, per_axis / 2)
        parts += [np.sin(angles), np.cos(angles)]
    embedding = np.concatenate(parts, axis=1)
    pad = width - embedding.shape[1]
    embedding = np.pad(embedding, ((0, 0), (0, pad)))
    return torch.from_numpy(embedding).float()


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016)."""

    def __init__(self, probability: float = 0.0) -> None:
        super().__init__()
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probability == 0.0 or not self.training:
            return x
        keep = 1.0 - self.probability
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # (B, L, 3D) -> (3, B, heads, L, D / heads)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT encoder for ``spatial_dims`` 2 or 3 with a class token and fixed sin-cos positions.

    ``forward_features(x, visible)`` runs the transformer only on the tokens where ``visible`` is True,
    which is what makes MAE pretraining cheap: at 75% masking the encoder sees a quarter of the tokens.

    Args:
        config: the sizes.
        spatial_dims: 2 (images) or 3 (volumes).
        image_size: side of the square (cubic) input.
        in_channels: input channels C.
        drop_path: stochastic-depth rate of the last block (fine-tuning); not part of the architecture.
    """

    kind = "vit"
    Config = ViTConfig
    head_norm = "layer"  # MAE fine-tuning normalises the pooled tokens (fc_norm)

    def __init__(self, config: ViTConfig, spatial_dims: int = 2, image_size: int = 28, in_channels: int = 1,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        self.config = config
        self.spatial_dims, self.image_size, self.in_channels = spatial_dims, image_size, in_channels
        self.grid = grid_size([image_size] * spatial_dims, config.patch_size)
        self.num_tokens = prod(self.grid)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        width = config.hidden_size
        self.patch_embed = conv(in_channels, width, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, width).unsqueeze(0), persistent=False)
        rates = np.linspace(0, drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(width, config.num_heads, config.mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation: xavier for linear layers and the patch projection, small normal for the cls token."""
        weight = self.patch_embed.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, L, D) patch tokens with position embedding, without the class token."""
        expected = (self.in_channels,) + (self.image_size,) * self.spatial_dims
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"ViT expects inputs of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, *G) -> (B, L, D)
        return tokens + self.pos_embed

    def forward_features(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Encode; returns (B, 1 + L_visible, D) with the class token first, after the final norm.

        Args:
            x: (B, C, *S) input.
            visible: optional bool (B, L), True where a token is kept; every row must keep the same count.
        """
        return self.hidden_states(x, visible)[-1]

    def hidden_states(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                      blocks: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """The outputs of the chosen ``blocks`` (1-based, before the final norm), then the final normed output.

        Each is (B, 1 + L_visible, D) with the class token first; UNETR-style decoders tap blocks such as
        (3, 6, 9) of a 12-block encoder.
        """
        bad = [b for b in blocks if not 1 <= b <= self.config.depth]
        if bad:
            raise ValueError(f"blocks {bad} are outside 1..{self.config.depth} (the ViT's depth)")
        tokens = self.embed(x)
        if visible is not None:
            batch, _, width = tokens.shape
            tokens = tokens[visible].reshape(batch, -1, width)  # (B, L_visible, D), grid order kept
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        taps = []
        for number, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if number in blocks:
                taps.append(tokens)
        return taps + [self.norm(tokens)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D): mean of the patch tokens (MAE fine-tuning uses global pooling)."""
        return self.forward_features(x)[:, 1:].mean(dim=1)

    @property
    def feature_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Layer groups for layer-wise learning-rate decay (BEiT/MAE): embedding 0, block i is i + 1."""
        return self.config.depth

    def layer_id(self, name: str) -> int:
        """The layer group of parameter ``name`` (relative to this encoder)."""
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.config.depth + 1
