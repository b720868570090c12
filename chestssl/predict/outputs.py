"""The files ``predict`` writes for one input: a heat map in the input's own geometry and an overlay to look at.

- X-ray: ``<id>_heatmap.png`` (8-bit, the decoded image's H x W: 255 is the strongest evidence) and
  ``<id>_overlay.png`` (the image with the map over it, at most :data:`OVERLAY_SIDE` pixels a side).
- X-ray segmentation: ``<id>_mask.png`` (the label map at the decoded image's H x W: pixel value = class index)
  and ``<id>_overlay.png`` (the image with each class's outline).
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


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2D map (h, w) resized bilinearly to ``shape`` (H, W), float32."""
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
    full = in_source_geometry(prepared, heat)  # (H, W)
    heatmap_path = folder / f"{prepared.input.id}_heatmap.png"
    Image.fromarray(np.round(full * 255).astype(np.uint8)).save(heatmap_path)
    scale = min(1.0, OVERLAY_SIDE / max(original.shape))
    shown = tuple(max(1, round(n * scale)) for n in original.shape)
    overlay_path = folder / f"{prepared.input.id}_overlay.png"
    _overlay([(resize_map(original, shown), resize_map(full, shown))], title, overlay_path)
    return [heatmap_path, overlay_path]


def resize_label_map(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2D label map (h, w) resized by nearest neighbour to ``shape`` (H, W), uint8: classes are never blended."""
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST))


def mask_in_source_geometry(prepared: Prepared, labels: np.ndarray) -> np.ndarray:
    """A predicted label map on the model's input carried to the decoded X-ray's (H, W)."""
    return resize_label_map(labels, prepared.original.shape)


def write_xray_mask(folder: Path, prepared: Prepared, labels: np.ndarray, class_names: tuple[str, ...],
                    title: str) -> list[Path]:
    """The predicted label map (S, S) of one X-ray at the decoded image's size, and an overlay of its outlines."""
    original = prepared.original
    full = mask_in_source_geometry(prepared, labels)  # (H, W) uint8 class indices
    mask_path = folder / f"{prepared.input.id}_mask.png"
    Image.fromarray(full).save(mask_path)
    scale = min(1.0, OVERLAY_SIDE / max(original.shape))
    shown = tuple(max(1, round(n * scale)) for n in original.shape)
    figure, axis = plt.subplots(figsize=(5, 5.3))
    axis.imshow(resize_map(original, shown), cmap="gray")
    small = resize_label_map(full, shown)
    colours = plt.get_cmap("tab10")
    for k in range(1, len(class_names)):
        if (small == k).any():
            axis.contour((small == k).astype(np.float32), levels=[0.5], colors=[colours(k - 1)], linewidths=1.2)
            axis.plot([], [], color=colours(k - 1), label=class_names[k])
    axis.legend(loc="lower right", fontsize=8)
    axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    overlay_path = folder / f"{prepared.input.id}_overlay.png"
    figure.savefig(overlay_path, dpi=100)
    plt.close(figure)
    return [mask_path, overlay_path]


def in_source_geometry(prepared: Prepared, heat: np.ndarray) -> np.ndarray | sitk.Image:
    """A heat map on the model's input carried to the input's own geometry: the decoded X-ray's (H, W) array, or a
    SimpleITK image on the CT's source grid."""
    if prepared.volume is None:
        return np.clip(resize_map(heat, prepared.original.shape), 0, 1)
    g = prepared.geometry
    return cube_to_scan(heat.astype(np.float32), prepared.volume, g["spacing_mm"], g["crop_start"], g["crop_shape"],
                        g["resampled_shape"])


def write_ct_heatmap(folder: Path, prepared: Prepared, heat: np.ndarray, title: str) -> list[Path]:
    """Heat map (S, S, S) in [0, 1] of one CT cube, carried back onto the source scan, with its overlay."""
    image = in_source_geometry(prepared, heat)
    heatmap_path = folder / f"{prepared.input.id}_heatmap.nii.gz"
    sitk.WriteImage(image, str(heatmap_path), useCompression=True)
    cube = prepared.pixels  # (D, H, W), axial slices in the radiological convention
    z, y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    panels = [(cube[z], heat[z]), (cube[:, y][::-1], heat[:, y][::-1]), (cube[:, :, x][::-1], heat[:, :, x][::-1])]
    overlay_path = folder / f"{prepared.input.id}_overlay.png"
    _overlay(panels, f"{title}  (axial, coronal, sagittal through the maximum)", overlay_path)
    return [heatmap_path, overlay_path]
