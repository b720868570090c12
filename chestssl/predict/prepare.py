"""One input made into what the model was trained on, by the preprocessing its file records.

Three recipes, told apart by the model's ``preprocessing`` record:

- ``xray``: :func:`~chestssl.data.xray.io.read_xray` (DICOM rescale, VOI window and MONOCHROME1 inversion applied)
  and :func:`~chestssl.data.xray.io.resize_image` to the model's side, the decoding every file-based X-ray dataset
  of chestssl uses; pixels uint8.
- ``ct-lungs`` (``prepare-ct``): :func:`~chestssl.data.ct.io.read_ct`, then
  :func:`~chestssl.data.ct.preprocess.preprocess_volume` with the recorded spacing, HU window, margin and cube
  side (HU and lung checks included), then the cache's float16 rounding.
- ``ct-nodule`` (``prepare-lidc``): a VOI and its nodule mask, cut by
  :func:`~chestssl.data.ct.nodule_cube.nodule_cube` with the recorded side, spacing and window.

A record none of these reproduces is refused: a model is never applied to inputs made another way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestssl.data.batch import Normalisation
from chestssl.data.ct.cache import stored_values
from chestssl.data.ct.files import IMAGE_SUFFIXES
from chestssl.data.ct.io import CTVolume, read_ct
from chestssl.data.ct.lidc import MaskReadFilter
from chestssl.data.ct.nodule_cube import nodule_cube
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume
from chestssl.data.xray.io import read_xray, resize_image
from chestssl.errors import CheckpointError, DataError
from chestssl.predict.inputs import XRAY_SUFFIXES, Input

RECIPES = ("xray", "ct-lungs", "ct-nodule")
# datasets whose images chestssl did not decode: MedMNIST ships images it resized itself
PRE_RESIZED = {"pneumoniamnist": "the model was trained on MedMNIST's own 28 px images; new images are resized "
                                 "by chestssl (antialiased bilinear), which is close to but not MedMNIST's resizing",
               "sarscov2-ct": "the model was trained on slices zero-padded to a square and resized (Lanczos) by the "
                              "data's stager; new images are squashed to the side by chestssl instead"}


@dataclass(frozen=True)
class Recipe:
    """How inputs are made for one model: ``kind`` (one of :data:`RECIPES`), the side ``size``, the
    normalisation, the whole record, and ``notes`` every prediction of this model carries."""

    kind: str
    size: int
    normalisation: Normalisation
    record: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def modality(self) -> str:
        return "xray" if self.kind == "xray" else "ct"

    @property
    def spatial_dims(self) -> int:
        return 2 if self.kind == "xray" else 3


def recipe_of(meta: dict[str, Any], source: str) -> Recipe:
    """The recipe of a model file's metadata; CheckpointError when its preprocessing cannot be reproduced."""
    record = meta.get("preprocessing") or {}
    norm = record.get("normalisation", {})
    normalisation = Normalisation(float(norm.get("mean", 0.5)), float(norm.get("std", 0.25)))
    modality = record.get("modality")
    notes = (PRE_RESIZED[meta["dataset"]],) if meta.get("dataset") in PRE_RESIZED else ()
    if modality == "xray" and record.get("pixels") == "uint8 grayscale":
        return Recipe("xray", int(record["image_size"]), normalisation, record, notes)
    if modality == "ct" and "lung_crop_margin_mm" in record:
        return Recipe("ct-lungs", int(record["size"]), normalisation, record, notes)
    if modality == "ct" and str(record.get("crop", "")).startswith("nodule-centred"):
        return Recipe("ct-nodule", int(record["size"]), normalisation, record, notes)
    raise CheckpointError(f"{source}: its preprocessing record {record} is not one predict can reproduce "
                          f"(known: X-ray images, prepare-ct lung cubes, prepare-lidc nodule cubes)")


@dataclass
class Prepared:
    """An input made ready: ``pixels`` as training read them (uint8 (S, S) or float32 (S, S, S)); ``original``
    the decoded X-ray (H, W) for overlays; for CT the ``volume`` as read and the ``geometry`` to map a cube back
    onto it (see :func:`~chestssl.data.ct.preprocess.cube_to_scan`)."""

    input: Input
    pixels: np.ndarray
    original: np.ndarray | None = None
    volume: CTVolume | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _refuse_volume_file(item: Input) -> None:
    if item.path.is_dir() or item.path.name.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"{item.source}: a CT volume or DICOM folder; this model takes 2D chest X-ray images")


def _refuse_image_file(item: Input) -> None:
    if item.path.is_file() and item.path.name.lower().endswith(XRAY_SUFFIXES):
        raise DataError(f"{item.source}: a 2D image file; this model takes chest CT volumes (a DICOM series folder "
                        "or a NIfTI/NRRD/MHA file)")


def prepare(item: Input, recipe: Recipe) -> Prepared:
    """Make ``item`` into the model's input; DataError naming the input and the reason it cannot be."""
    if recipe.kind == "xray":
        _refuse_volume_file(item)
        original = read_xray(item.path)
        return Prepared(item, resize_image(original, recipe.size), original)
    _refuse_image_file(item)
    record = recipe.record
    hu_low, hu_high = (float(v) for v in record["hu_window"])
    if recipe.kind == "ct-lungs":
        volume = read_ct(item.path, item.series or None, files=item.files or None)
        config = PrepareCTConfig(spacing_mm=float(record["spacing_mm"]), hu_low=hu_low, hu_high=hu_high,
                                 size=recipe.size, margin_mm=float(record["lung_crop_margin_mm"]))
        image, _, info = preprocess_volume(volume, config)
        geometry = {"spacing_mm": config.spacing_mm, "crop_start": info["crop_start"],
                    "crop_shape": tuple(info["crop_shape"]), "resampled_shape": tuple(info["resampled_shape"])}
        return Prepared(item, stored_values(image).astype(np.float32), volume=volume, geometry=geometry)
    if item.mask is None:
        raise DataError(f"{item.source}: a nodule model needs the nodule's mask beside its VOI: list the inputs in "
                        "a CSV with the columns path and mask")
    volume = read_ct(item.path)
    quiet = MaskReadFilter()  # a mask has no air: read_ct's "not HU?" warning is not meant for it
    logging.getLogger("chestssl.data.ct.io").addFilter(quiet)
    try:
        mask = read_ct(Path(item.mask))
    finally:
        logging.getLogger("chestssl.data.ct.io").removeFilter(quiet)
    if mask.hu.shape != volume.hu.shape:
        raise DataError(f"{item.mask}: the nodule mask's grid {mask.hu.shape} differs from the VOI's {volume.hu.shape}")
    spacing_mm = float(record["spacing_mm"])
    cube = nodule_cube(volume.hu, mask.hu, volume.spacing, recipe.size, spacing_mm, hu_low, hu_high)
    geometry = {"spacing_mm": spacing_mm, "crop_start": cube.start, "crop_shape": (recipe.size,) * 3,
                "resampled_shape": tuple(cube.resampled_shape)}
    return Prepared(item, stored_values(cube.image).astype(np.float32), volume=volume, geometry=geometry)
