"""The files ``predict`` writes for one input: a heat map in the input's own geometry and an overlay to look at.

- X-ray: ``<id>_heatmap.png`` (8-bit, the decoded image's H x W: 255 is the strongest evidence) and
  ``<id>_overlay.png`` (the image with the map over it, at most :data:`OVERLAY_SIDE` pixels a side).
- CT: ``<id>_heatmap.nii.gz`` on the source scan's grid (shape, spacing, origin, direction: it opens over the scan
  in a viewer) and ``<id>_overlay.png`` (axial, coronal and sagittal slices of the model's cube through the map's
  maximum).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from chestssl.data.ct.preprocess import cube_to_scan  # noqa: E402
from chestssl.predict.prepare import Prepared  # noqa: E402

OVERLAY_SIDE = 1024
ALPHA = 0.4


def _resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(values.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def _overlay(panels: list[tuple[np.ndarray, np.ndarray]], title: str, path: Path) -> None:
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for axis, (image, heat) in zip(axes[0], panels):
        axis.imshow(image, cmap="gray")
        axis.imshow(heat, cmap="jet", alpha=ALPHA, vmin=0, vmax=1)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_xray_heatmap(folder: Path, prepared: Prepared, heat: np.ndarray, title: str) -> list[Path]:
    """Heat map (S, S) in [0, 1] of one X-ray, resized to the decoded image and written with its overlay."""
    original = prepared.original
    full = np.clip(_resize(heat, original.shape), 0, 1)  # (H, W)
    heatmap_path = folder / f"{prepared.input.id}_heatmap.png"
    Image.fromarray(np.round(full * 255).astype(np.uint8)).save(heatmap_path)
    scale = min(1.0, OVERLAY_SIDE / max(original.shape))
    shown = tuple(max(1, round(n * scale)) for n in original.shape)
    overlay_path = folder / f"{prepared.input.id}_overlay.png"
    _overlay([(_resize(original, shown), _resize(full, shown))], title, overlay_path)
    return [heatmap_path, overlay_path]


def write_ct_heatmap(folder: Path, prepared: Prepared, heat: np.ndarray, title: str) -> list[Path]:
    """Heat map (S, S, S) in [0, 1] of one CT cube, carried back onto the source scan, with its overlay."""
    geometry = prepared.geometry
    image = cube_to_scan(heat.astype(np.float32), prepared.volume, geometry["spacing_mm"], geometry["crop_start"],
                         geometry["crop_shape"], geometry["resampled_shape"])
    heatmap_path = folder / f"{prepared.input.id}_heatmap.nii.gz"
    sitk.WriteImage(image, str(heatmap_path), useCompression=True)
    cube = prepared.pixels  # (D, H, W), axial slices in the radiological convention
    z, y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    panels = [(cube[z], heat[z]), (cube[:, y][::-1], heat[:, y][::-1]), (cube[:, :, x][::-1], heat[:, :, x][::-1])]
    overlay_path = folder / f"{prepared.input.id}_overlay.png"
    _overlay(panels, f"{title}  (axial, coronal, sagittal through the maximum)", overlay_path)
    return [heatmap_path, overlay_path]
