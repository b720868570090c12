"""Reconstruction figures for pretraining runs: one column per named panel (original | masked | reconstruction
for MAE; original | corrupted | reconstruction for group masking).

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


def save_reconstruction_grid(panels: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one row per sample (and view) and one column per panel, in the dict's order.

    Args:
        panels: name -> (B, C, *S) tensor, all on the intensity scale of the first except panels whose name
            says "normalised" (per-patch normalised values, shown from -2 to 2); channel 0 is shown.
        path: PNG to write.
    """
    columns = list(panels.values())
    original = columns[0]
    rows = []
    for sample in range(original.shape[0]):
        images = [t[sample, 0].detach().float().cpu().numpy() for t in columns]
        rows += list(zip(*[_views(v) for v in images]))
    names = ["axial", "coronal", "sagittal"] * original.shape[0] if original.ndim == 5 else [""] * len(rows)
    low = float(original.min())
    high = float(original.max())
    height = 1.5 * len(rows) + 0.4  # inches; the top 0.4 for the title
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns), height), squeeze=False)
    scales = [(-2.0, 2.0) if "normalised" in panel else (low, high) for panel in panels]
    for row, images, name in zip(axes, rows, names):
        for axis, image, (vmin, vmax) in zip(row, images, scales):
            axis.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(name, fontsize=7)
    for axis, name in zip(axes[0], panels):
        axis.set_title(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
