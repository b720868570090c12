"""Reconstruction figures for masked-image-modelling runs: original | masked | reconstruction.

For 3D volumes each sample shows the axial, coronal and sagittal mid-slices.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """(H, W) -> [image]; (D, H, W) -> [axial, coronal, sagittal] mid-slices."""
    if volume.ndim == 2:
        return [volume]
    depth, height, width = volume.shape
    return [volume[depth // 2], volume[:, height // 2], volume[:, :, width // 2]]


def save_reconstruction_grid(
    original: torch.Tensor, masked: torch.Tensor, reconstruction: torch.Tensor, path: str | Path, title: str = ""
) -> Path:
    """Write a PNG with one row per sample (and view) and columns original | masked | reconstruction.

    Args:
        original, masked, reconstruction: (B, C, *S) tensors on the same intensity scale; channel 0 is shown.
        path: PNG to write.
    """
    rows = []
    for sample in range(original.shape[0]):
        triple = [t[sample, 0].detach().float().cpu().numpy() for t in (original, masked, reconstruction)]
        rows += list(zip(*[_views(v) for v in triple]))
    names = ["axial", "coronal", "sagittal"] * original.shape[0] if original.ndim == 5 else [""] * len(rows)
    low = float(original.min())
    high = float(original.max())
    height = 1.5 * len(rows) + 0.4  # inches; the top 0.4 for the title
    figure, axes = plt.subplots(len(rows), 3, figsize=(4.8, height), squeeze=False)
    for row, images, name in zip(axes, rows, names):
        for axis, image in zip(row, images):
            axis.imshow(image, cmap="gray", vmin=low, vmax=high)
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(name, fontsize=7)
    for axis, name in zip(axes[0], ("original", "masked", "reconstruction")):
        axis.set_title(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
