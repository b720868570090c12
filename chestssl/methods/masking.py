"""Mask generators. Every generator returns a bool (B, L) tensor where True means hidden.

Masks are data made outside the model (He et al. 2022, ``random_masking``), drawn on the requested device from
an optional ``torch.Generator`` so a seeded run draws the same masks again.
"""

from __future__ import annotations

import torch


def num_visible_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens left visible at ``mask_ratio``; every row of a mask keeps exactly this many."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide a uniformly random subset of ``round-down(L * mask_ratio)`` tokens in each row.

    Returns:
        bool (B, L), True where hidden; each row hides ``L - num_visible_tokens(L, mask_ratio)`` tokens.
    """
    keep = num_visible_tokens(num_tokens, mask_ratio)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each token's noise within its row
    return ranks >= keep
