"""The settings of ``prepare-ct`` and what it does to one chest CT (pure, no files written).

In :func:`preprocess_volume`, arrays (z, y, x) = (D, H, W) in the canonical LPS orientation of
:func:`~chestssl.data.ct.io.read_ct`: check the values are HU → resample to ``spacing_mm`` isotropic → lung mask
checked to be lungs (or the user's mask, resampled, trusted) → crop to the lungs' bounding box plus ``margin_mm`` →
HU window to [0, 1] → resize to a ``size``³ cube. The checks are :mod:`chestssl.data.ct.chest_checks`.
Every downsampling is preceded by a Gaussian anti-aliasing filter (sigma = (factor - 1) / 2 voxels, as in
scikit-image), so a 4x smaller cube averages its voxels instead of picking one in four.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from chestssl.data.ct.chest_checks import TOO_SMALL, check_hu, check_lungs
from chestssl.data.ct.ops import mask_bounding_box, resample, resize_to_cube, window_hu
from chestssl.data.ct.io import CANONICAL_ORIENTATION, CTVolume
from chestssl.data.ct.lung_mask import lung_mask
from chestssl.errors import DataError

__all__ = ["LUNG_MASK_SPACING_MM", "TOO_SMALL", "PrepareCTConfig", "anti_alias", "cube_to_scan", "preprocess_volume",
           "preprocessing_record", "read_mask"]

LUNG_MASK_SPACING_MM = 3.0  # the mask is made at 3 mm: Dice 0.98 against 1.5 mm on the real chests, 4x faster


@dataclass(frozen=True)
class PrepareCTConfig:
    """What ``prepare-ct`` reads, how it preprocesses and where it writes.

    Attributes:
        inputs: files or folders; a folder is scanned for NIfTI/NRRD/MHA files and DICOM series, each
            series its own input wherever its files sit (:mod:`chestssl.data.ct.inputs`).
        manifest_csv: a CSV with column ``path`` (relative to the CSV's folder) and optional ``id``,
            ``label``, ``patient_id``, ``split`` (train, val, test or pretrain: wins over the one prepare-ct
            assigns) and ``mask`` (a lung mask file on the CT's grid). A row naming a DICOM folder is one
            volume: the series chosen by rule, or ``series_uid``.
        cache_dir: where the ``<id>.npz`` volumes, ``manifest.csv`` and the preprocessing record go.
        spacing_mm: isotropic voxel size the volume is resampled to before the lung mask and crop.
            1.5 mm (the TotalSegmentator grid) is finer than the cube's voxels for any size up to 160
            (the lung box is about 250-330 mm a side), so the final resize only ever averages down,
            while holding a chest in about 200³ voxels (1 mm would cost 3.4x the time and memory).
        hu_low, hu_high: HU window mapped to [0, 1] (air to soft tissue and contrast-filled vessels).
        size: side of the output cube (D = H = W).
        margin_mm: margin around the lungs' bounding box.
        workers: worker processes; 1 runs in this process.
        on_error: "skip" records a failed volume and goes on; "raise" records it and stops.
        series_uid: the one series to read from each DICOM folder or tree (its SeriesInstanceUID or the
            ``uid_hash`` of ``list_series``; see ``read_ct``); by default every series of a scanned tree is an input.
        allow_gaps: interpolate over missing DICOM slices instead of refusing the series.
        min_lung_ml: a volume whose automatic lung mask is smaller fails ("not a chest CT"), as does one
            whose mask is not two lungs (:func:`~chestssl.data.ct.chest_checks.check_lungs`); a mask the user
            supplies is trusted. Values that are not HU fail whatever the mask.
        split_seed: seed of the patient-level 70/10/20 split given to prepared volumes that have no split
            (:mod:`chestssl.data.ct.manifest_splits`); patients split by an earlier run keep their split.
        compress: store each volume as a compressed ``.npz``; ``False`` takes about twice the disk and is read
            5-6x faster (26 vs 5 ms per 128^3 volume here), worth it when pretraining on GPUs is loader-bound.
    """

    inputs: tuple[str, ...] = ()  # CT files or folders; each DICOM series found in a folder is an input
    manifest_csv: str | None = None  # CSV of path and optional id, label, patient_id, split, mask
    cache_dir: str = "runs/ct_cache"  # where the volumes, manifest.csv and preprocessing.json go
    spacing_mm: float = 1.5  # isotropic voxel size of the resampling before the lung mask and crop
    hu_low: float = -1000.0  # HU mapped to 0
    hu_high: float = 200.0  # HU mapped to 1
    size: int = 64  # side of the output cube in voxels
    margin_mm: float = 10.0  # margin around the lungs' bounding box
    workers: int = 2  # worker processes (1 runs in this process)
    on_error: str = "skip"  # skip: record a failed volume and go on; raise: record it and stop
    series_uid: str | None = None  # the one DICOM series to read from each folder (UID or list_series hash)
    allow_gaps: bool = False  # interpolate over missing DICOM slices instead of refusing the series
    min_lung_ml: float = 100.0  # an automatic lung mask smaller than this fails (not a chest CT)
    compress: bool = True  # compressed .npz volumes (false: about 2x the disk, 5-6x faster to read)
    split_seed: int = 0  # seed of the patient-level 70/10/20 split of volumes that have no split

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        problems = [f"{name}={value!r} ({rule})" for name, value, ok, rule in [
            ("spacing_mm", self.spacing_mm, self.spacing_mm > 0, "must be positive"),
            ("hu_high", self.hu_high, self.hu_high > self.hu_low, "must exceed hu_low"),
            ("size", self.size, self.size >= 2, "must be at least 2"),
            ("margin_mm", self.margin_mm, self.margin_mm >= 0, "must be >= 0"),
            ("workers", self.workers, self.workers >= 1, "must be >= 1"),
            ("on_error", self.on_error, self.on_error in ("skip", "raise"), "must be 'skip' or 'raise'"),
            ("min_lung_ml", self.min_lung_ml, self.min_lung_ml >= 0, "must be >= 0"),
            ("split_seed", self.split_seed, isinstance(self.split_seed, int), "must be an integer"),
        ] if not ok]
        if problems:
            raise ValueError("PrepareCTConfig: " + "; ".join(problems))


def preprocessing_record(config: PrepareCTConfig) -> dict[str, Any]:
    """How the cached volumes were made; a fine-tuning run compares it with its own inputs."""
    return {
        "modality": "ct", "spatial_dims": 3, "channels": 1, "size": config.size, "axes": "zyx",
        "spacing_mm": config.spacing_mm, "hu_window": [config.hu_low, config.hu_high], "value_range": [0.0, 1.0],
        "lung_crop_margin_mm": config.margin_mm, "orientation": CANONICAL_ORIENTATION,
        "anti_aliasing": "gaussian, sigma = (factor - 1) / 2 voxels before each downsampling",
    }


def preprocess_volume(
    volume: CTVolume, config: PrepareCTConfig, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample, find or take the lungs, crop to them, window HU and resize to a cube.

    Args:
        volume: a CT from :func:`~chestssl.data.ct.io.read_ct`, hu (z, y, x).
        config: ``spacing_mm``, ``hu_low``/``hu_high``, ``size``, ``margin_mm`` and ``min_lung_ml`` are used.
        mask: optional lung mask of the shape of ``volume.hu`` (nonzero = lung); by default
            :func:`~chestssl.data.ct.lung_mask.lung_mask` finds the lungs.

    Returns:
        image float32 (S, S, S) in [0, 1], lung bool (S, S, S), and info: ``lung_ml`` (mask volume),
        ``resampled_shape`` and ``crop_shape`` (voxels at ``spacing_mm``), ``crop_start`` (the crop's first voxel
        in the resampled grid), ``mask`` ("auto" or "user").

    Raises:
        DataError: the values are not HU ("not HU"); the automatic mask holds less than ``min_lung_ml``
            or is not lungs ("not a chest CT"); the user's mask is empty or of another shape.
    """
    iso = (config.spacing_mm,) * 3
    if mask is not None and mask.shape != volume.hu.shape:
        raise DataError(f"{volume.source_id}: lung mask shape {mask.shape} differs from the CT's {volume.hu.shape}")
    check_hu(volume.hu)  # the values as read: smoothing would lift the darkest ones
    hu = anti_alias(volume.hu, [config.spacing_mm / s for s in volume.spacing])
    hu = resample(hu, volume.spacing, iso, "linear")  # (z, y, x) float32 at spacing_mm
    if mask is None:
        lung = lung_mask(hu, iso, working_spacing_mm=max(LUNG_MASK_SPACING_MM, config.spacing_mm))
        lung_ml = check_lungs(hu, lung, iso, config.min_lung_ml)
    else:
        lung = resample(mask.astype(bool), volume.spacing, iso, shape_out=hu.shape)  # nearest for a bool mask
        lung_ml = float(np.count_nonzero(lung)) * config.spacing_mm**3 / 1000.0
    if not lung.any():
        raise DataError(f"{volume.source_id}: the supplied lung mask is empty")
    box = mask_bounding_box(lung, iso, config.margin_mm)
    image = window_hu(hu[box], config.hu_low, config.hu_high)  # (z, y, x) crop in [0, 1]
    crop_shape = image.shape
    image = resize_to_cube(anti_alias(image, [n / config.size for n in crop_shape]), config.size)
    lung_cube = resize_to_cube(lung[box], config.size, is_mask=True)  # (S, S, S) nearest
    info = {"lung_ml": lung_ml, "resampled_shape": hu.shape, "crop_shape": crop_shape,
            "crop_start": tuple(int(cut.start) for cut in box),
            "mask": "auto" if mask is None else "user"}
    return np.clip(image, 0.0, 1.0), lung_cube, info


def cube_to_scan(cube: np.ndarray, volume: CTVolume, spacing_mm: float, crop_start: tuple[int, ...],
                 crop_shape: tuple[int, ...], resampled_shape: tuple[int, ...]) -> sitk.Image:
    """A map on the model's cube (S, S, S) carried back onto the grid of the scan as it was read.

    The steps of :func:`preprocess_volume` (and of a nodule cube) undone in reverse: the cube is resized to the
    crop (``crop_shape`` voxels at ``spacing_mm``), put at ``crop_start`` in the resampled grid
    (``resampled_shape``; outside it the map is 0), resampled to the scan's spacing and shape, and given the scan's
    origin, direction and original axis order (``volume.source_orientation``), so it opens over the source scan
    in a viewer. Every resampling shares the grids' outer corner, as the forward steps do. A bool cube (a mask)
    is resampled nearest and comes back uint8.
    """
    is_mask = cube.dtype == bool
    size = np.array(cube.shape, dtype=float)
    crop = resample(cube if is_mask else cube.astype(np.float32), tuple(np.array(crop_shape) / size), (1.0,) * 3,
                    "linear", shape_out=crop_shape)
    grid = np.zeros(resampled_shape, dtype=crop.dtype)  # (z, y, x) at spacing_mm
    source, target = [], []
    for start, length, extent in zip(crop_start, crop_shape, resampled_shape):
        low, high = max(0, start), min(extent, start + length)
        source.append(slice(low - start, max(low, high) - start))
        target.append(slice(low, max(low, high)))
    grid[tuple(target)] = crop[tuple(source)]
    values = resample(grid, (spacing_mm,) * 3, volume.spacing, "linear", shape_out=volume.hu.shape)
    image = sitk.GetImageFromArray(values.astype(np.uint8) if is_mask else values.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return sitk.DICOMOrient(image, volume.source_orientation)


def anti_alias(volume: np.ndarray, factors: list[float]) -> np.ndarray:
    """Gaussian-smooth (z, y, x) before shrinking each axis by ``factors`` (>1 means fewer voxels)."""
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if not any(s > 0.1 for s in sigma):
        return volume
    return ndi.gaussian_filter(volume.astype(np.float32), sigma, mode="nearest", truncate=3.0)


def read_mask(path: Path, volume: CTVolume) -> np.ndarray:
    """A user's lung mask file as bool (z, y, x) in the canonical orientation, checked against ``volume``."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read this lung mask file ({str(error).strip().splitlines()[-1]})") from error
    if image.GetDimension() != 3:
        raise DataError(f"{path}: a lung mask must be a 3D volume, got {image.GetDimension()}D")
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    mask = sitk.GetArrayFromImage(image) > 0  # (z, y, x)
    spacing = image.GetSpacing()[::-1]
    if mask.shape != volume.hu.shape or not np.allclose(spacing, volume.spacing, rtol=1e-3):
        raise DataError(f"{path}: lung mask grid {mask.shape} at {np.round(spacing, 3).tolist()} mm differs from "
                        f"the CT's {volume.hu.shape} at {np.round(volume.spacing, 3).tolist()} mm")
    return mask
