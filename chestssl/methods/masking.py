"""Mask generators. Every generator returns a bool (B, L) tensor where True means hidden.

Masks are data made outside the model (He et al. 2022, ``random_masking``), drawn on the requested device from
an optional ``torch.Generator`` so a seeded run draws the same masks again.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch


def num_visible_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens left visible at ``mask_ratio``; every row of a mask keeps exactly this many."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_mask(
    batch_size: int,
    grid: Sequence[int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide a uniformly random subset of ``round-down(L * mask_ratio)`` cells of a token or feature grid.

    Args:
        batch_size: B.
        grid: the grid's shape, (h, w) or (d, h, w); L = its number of cells, flattened in row-major order.
        mask_ratio: share of cells hidden, in [0, 1).

    Returns:
        bool (B, L), True where hidden; each row hides ``L - num_visible_tokens(L, mask_ratio)`` cells.
    """
    if isinstance(grid, int) or not grid or min(grid) < 1:
        raise ValueError(f"grid must be a tuple of positive sizes such as (7, 7) or (4, 4, 4), got {grid!r}")
    num_tokens = prod(grid)
    keep = num_visible_tokens(num_tokens, mask_ratio)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each token's noise within its row
    return ranks >= keep
