"""Pure preprocessing of CT volumes: HU window, resampling, crop to a mask and resize to a cube.

Every function takes and returns numpy arrays; spacings are ``(z, y, x)`` in mm. Arrays are in the
canonical orientation of :func:`chestssl.data.ct.io.read_ct`, though nothing here depends on it. The
classical lung mask is in :mod:`chestssl.data.ct.lung_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def window_hu(hu: np.ndarray, low: float = -1000.0, high: float = 200.0) -> np.ndarray:
    """Clip HU to ``[low, high]`` and scale linearly to float32 in ``[0, 1]``.

    Args:
        hu: any-shape array of Hounsfield units.
        low: HU mapped to 0 (the default -1000 is air).
        high: HU mapped to 1 (the default 200 keeps soft tissue and contrast-filled vessels apart).
    """
    if not high > low:
        raise ValueError(f"window_hu needs high > low, got low={low}, high={high}")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0)


def resample(
    volume: np.ndarray,
    spacing_in: Sequence[float],
    spacing_out: Sequence[float],
    order: str = "linear",
    shape_out: Sequence[int] | None = None,
    fill_value: float = 0.0,
) -> np.ndarray:
    """Resample a (z, y, x) volume to a new voxel spacing with SimpleITK.

    The input and output grids share the outer corner of their first voxel, so a volume resampled
    down and back up lands where it started (``align_corners=False`` in PyTorch terms).

    Args:
        volume: array (z, y, x). A bool array is a mask: it is always resampled with nearest
            neighbour and comes back bool.
        spacing_in: (z, y, x) spacing of ``volume`` in mm.
        spacing_out: (z, y, x) spacing wanted, in mm.
        order: "nearest", "linear" or "bspline" for non-mask arrays.
        shape_out: output (z, y, x) shape; by default ``round(shape * spacing_in / spacing_out)``.
        fill_value: value of output voxels beyond the input's last sample (use -1000 for HU: 0 HU would be
            soft tissue; masks always get False).

    Returns:
        The resampled array: bool for a mask, the input dtype for "nearest", else float32.
    """
    if order not in INTERPOLATORS:
        raise ValueError(f"order must be one of {sorted(INTERPOLATORS)}, got {order!r}")
    spacing_in, spacing_out = check_spacing(spacing_in, volume), check_spacing(spacing_out, volume)
    is_mask = volume.dtype == bool
    if shape_out is None:
        shape_out = [max(1, round(n * si / so)) for n, si, so in zip(volume.shape, spacing_in, spacing_out)]
    if is_mask:
        order, array = "nearest", volume.astype(np.uint8)
    else:
        array = volume if order == "nearest" else volume.astype(np.float32, copy=False)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_in[::-1]])
    origin_out = [(so - si) / 2 for si, so in zip(spacing_in[::-1], spacing_out[::-1])]
    out = sitk.Resample(
        image, [int(n) for n in shape_out[::-1]], sitk.Transform(), INTERPOLATORS[order],
        origin_out, [float(s) for s in spacing_out[::-1]], image.GetDirection(), 0.0 if is_mask else float(fill_value), image.GetPixelID(),
    )
    out_array = sitk.GetArrayFromImage(out)
    return out_array.astype(bool) if is_mask else out_array


def mask_bounding_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float = 10.0) -> tuple[slice, ...]:
    """The (z, y, x) slices of the box around ``mask`` grown by ``margin_mm``, clipped to the array."""
    spacing = check_spacing(spacing, mask)
    if not mask.any():
        raise ValueError("mask_bounding_box: the mask is empty, there is nothing to crop to")
    box = []
    for axis, (n, s) in enumerate(zip(mask.shape, spacing)):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        margin = int(np.ceil(margin_mm / s))
        box.append(slice(max(0, present[0] - margin), min(n, present[-1] + 1 + margin)))
    return tuple(box)


def crop_to_mask(
    volume: np.ndarray, mask: np.ndarray, spacing: Sequence[float], margin_mm: float = 10.0
) -> np.ndarray:
    """Crop ``volume`` (z, y, x) to the bounding box of ``mask`` plus ``margin_mm`` on every side.

    Crop the mask itself the same way with ``crop_to_mask(mask, mask, spacing, margin_mm)``.
    """
    if volume.shape != mask.shape:
        raise ValueError(f"crop_to_mask: volume shape {volume.shape} differs from mask shape {mask.shape}")
    return volume[mask_bounding_box(mask, spacing, margin_mm)]


def resize_to_cube(volume: np.ndarray, size: int, is_mask: bool = False) -> np.ndarray:
    """Resize a (z, y, x) volume to (size, size, size), each axis scaled on its own.

    The aspect ratio is not kept; resample to isotropic spacing and crop first where it matters.
    Masks (``is_mask`` or a bool array) use nearest neighbour and come back bool; anything else is
    linearly interpolated to float32.
    """
    if size < 1:
        raise ValueError(f"resize_to_cube: size must be positive, got {size}")
    if is_mask:
        volume = volume.astype(bool)
    spacing_out = [n / size for n in volume.shape]  # in units of input voxels
    return resample(volume, (1.0, 1.0, 1.0), spacing_out, "linear", shape_out=(size, size, size))


def check_spacing(spacing: Sequence[float], volume: np.ndarray) -> tuple[float, float, float]:
    """``spacing`` as 3 floats; ValueError unless ``volume`` is 3D and the spacings are 3 positive values."""
    values = tuple(float(s) for s in spacing)
    if len(values) != volume.ndim or volume.ndim != 3 or not all(s > 0 for s in values):
        raise ValueError(f"need a 3D (z, y, x) volume and 3 positive spacings, got shape {volume.shape}, "
                         f"spacing {values}")
    return values
