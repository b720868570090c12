"""Chest X-ray lung segmentation sets (``cxr-lungseg/``): images with per-pixel label maps.

``cxr-lungseg``: 72 Montgomery (13) and Shenzhen (59) X-rays with binary lung masks, classes background / lung.
``cxr-lungseg-covid``: 42 X-rays of 35 patients (COVID-19, ARDS, ...) with label maps background / right lung /
left lung / cardiomediastinum; its binary lung is scored as the union of the two lungs (:data:`CLASS_GROUPS`).

Both get one fixed split (seed 0, whatever ``split_seed`` a run asks for, so every run of a benchmark tests on
the same images), patient-level, 70/10/20 of the patients, stratified by source hospital for the first set.
Every Montgomery and Shenzhen image is its own patient (the source gives one X-ray per person). Label maps are
resized with nearest-neighbour interpolation, images bilinearly, as every file dataset is decoded.

Shapes: ``N`` images, ``S`` the side; labels (N, S, S) uint8 class indices.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from chestssl.data.splits import patient_split
from chestssl.data.types import ImageDataset
from chestssl.data.xray.io import read_xray, resize_image
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

LUNG_CLASSES = ("background", "lung")
COVID_CLASSES = ("background", "right lung", "left lung", "cardiomediastinum")
# Unions of classes that are scored as one region too, where all their members are among the class names.
CLASS_GROUPS = {"lung": ("right lung", "left lung")}
SPLIT_SEED = 0  # the one split of these sets
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


def resize_label_map(labels: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) uint8 label map resized to (S, S) by nearest neighbour: no class is blended into another."""
    if labels.shape == (size, size):
        return labels.copy()
    return np.asarray(Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def _fixed_split(strata: np.ndarray, patient_ids: np.ndarray) -> np.ndarray:
    parts = patient_split(strata, patient_ids, SPLIT_FRACTIONS, SPLIT_SEED)
    split = np.full(len(strata), "", dtype=object)
    for name, indices in zip(("train", "val", "test"), parts):
        split[indices] = name
    return split.astype(str)


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found; the lung segmentation sets live in <data>/cxr-lungseg (see its README)")
    return path


def load_lungseg(data_dir: Path, image_size: int | None, on_error: str, *, limit: int | None = None) -> ImageDataset:
    """Montgomery + Shenzhen X-rays with binary lung masks (``cxr-lungseg/montgomery-shenzhen``)."""
    root = _require(data_dir / "cxr-lungseg" / "montgomery-shenzhen")
    size = image_size or 256
    with _require(root / "index.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if limit:
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    images, labels, kept, bad = [], [], [], 0
    for row in rows:
        image_path, mask_path = root / "images_512" / row["name"], root / "masks_512" / row["name"]
        try:
            image = read_xray(image_path)
            mask = read_xray(mask_path)
            if image.shape != mask.shape:
                raise DataError(f"{mask_path}: mask {mask.shape} and image {image.shape} differ in size")
        except DataError as error:
            if on_error == "raise":
                raise
            logger.warning("cxr-lungseg: skipped (%s)", error)
            bad += 1
            continue
        images.append(resize_image(image, size))
        labels.append(resize_label_map((mask > 127).astype(np.uint8), size))
        kept.append(row)
    if bad:
        logger.warning("cxr-lungseg: %d of %d images skipped", bad, len(rows))
    if not kept:
        raise DataError(f"{root}: no readable image-mask pair")
    patients = np.array([Path(r["name"]).stem.rsplit("_", 1)[0] for r in kept])  # CHNCXR_0601_1 -> CHNCXR_0601
    sources = np.array([r["source"] for r in kept])
    strata = np.unique(sources, return_inverse=True)[1]
    return ImageDataset(np.stack(images)[:, None], np.stack(labels), "segmentation", LUNG_CLASSES,
                        _fixed_split(strata, patients), patients, "cxr-lungseg (Montgomery + Shenzhen)")


def load_lungseg_covid(data_dir: Path, image_size: int | None, on_error: str, *,
                       limit: int | None = None) -> ImageDataset:
    """COVID-era X-rays with right-lung / left-lung / cardiomediastinum label maps (``cxr-lungseg/covid``)."""
    root = _require(data_dir / "cxr-lungseg" / "covid")
    try:
        with np.load(_require(root / "pairs_256.npz")) as stored:
            images, maps, names = stored["images"], stored["labelmaps"], stored["names"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{root / 'pairs_256.npz'}: unreadable ({error}); expected images, labelmaps and names") from error
    if maps.max() >= len(COVID_CLASSES):
        raise DataError(f"{root / 'pairs_256.npz'}: label {int(maps.max())} outside 0..{len(COVID_CLASSES) - 1}")
    with _require(root / "index.csv").open(newline="") as stream:
        patient_of = {row["image"]: row["patientid"] for row in csv.DictReader(stream)}
    missing = [str(n) for n in names if str(n) not in patient_of]
    if missing:
        raise DataError(f"{root / 'index.csv'}: no patient id for {len(missing)} image(s), e.g. {missing[0]}")
    keep = np.arange(len(names)) if not limit else np.arange(len(names))[:: max(1, len(names) // limit)][:limit]
    size = image_size or 256
    patients = np.array([f"covid-{patient_of[str(names[i])]}" for i in keep])
    return ImageDataset(np.stack([resize_image(images[i], size) for i in keep])[:, None],
                        np.stack([resize_label_map(maps[i], size) for i in keep]), "segmentation", COVID_CLASSES,
                        _fixed_split(np.zeros(len(keep), dtype=np.int64), patients), patients,
                        "cxr-lungseg-covid")
