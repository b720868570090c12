"""COVID-19 vs non-COVID chest CT slices (SARS-CoV-2 CT-scan dataset, Soares et al. 2020), split without leaking
patients.

The release has no patient ids, and consecutive file numbers are consecutive slices of one patient: the slice
images grow or shrink smoothly within a patient's series and jump where the next one starts. A random slice-level
split therefore puts neighbouring slices of one patient in train and test. ``sarscov2-ct`` splits by *runs*
instead: within each class, in file-number order, a new run starts where a slice's original area falls by more than
:data:`RUN_BREAK` against the slice before (116 runs for the source's 120 patients); each run is one pseudo-patient
(``patient_ids`` "covid-run-007"...) and whole runs go to train/val/test (70/10/20, stratified by class, seed 0).
Two runs can still be one patient (a second series); a run is never split. ``sarscov2-ct-slices`` is the same
images with a random slice-level split, kept only to show how much a leaking split inflates the scores.

Shapes: ``N`` slices, ``S`` the side. Images come from ``sarscov2_ct_128_DERIVED.npz`` (zero-padded to a square
and resized to 128 by the stager, Lanczos); another ``image_size`` is resized from those.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from chestssl.data.splits import patient_split
from chestssl.data.types import ImageDataset
from chestssl.data.xray.io import resize_image
from chestssl.errors import DataError

FOLDER, ARCHIVE, LABELS = "sarscov2-ct", "sarscov2_ct_128_DERIVED.npz", "labels.csv"
RUN_BREAK = 0.2  # a new run (patient) where the slice area falls by more than this share
SPLIT_FRACTIONS, SPLIT_SEED = (0.7, 0.1, 0.2), 0
CLASS_NAMES = ("non-covid", "covid")  # labels 0 and 1


def series_runs(classes: np.ndarray, order: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Run ids (N,) ("covid-run-007"): within each class, in ``order`` (file numbers), a new run where the area falls
    by more than :data:`RUN_BREAK`."""
    runs = np.empty(len(classes), dtype=object)
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        members = members[np.argsort(order[members], kind="stable")]
        area = areas[members].astype(np.float64)
        starts = np.r_[True, area[1:] < (1 - RUN_BREAK) * area[:-1]]
        for member, number in zip(members, np.cumsum(starts)):
            runs[member] = f"{CLASS_NAMES[label]}-run-{number:03d}"
    return runs.astype(str)


def _read(data_dir: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 1, S, S) uint8, labels (N,), run ids (N,)) of the archive, checked against labels.csv."""
    folder = data_dir / FOLDER
    try:
        with np.load(folder / ARCHIVE, allow_pickle=False) as archive:
            images, labels, names = archive["images"], archive["labels"].astype(np.int64), archive["names"]
            numbers = archive["file_index"]
        with open(folder / LABELS, newline="") as stream:
            sizes = {row["path"]: int(row["width"]) * int(row["height"]) for row in csv.DictReader(stream)}
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{folder}: cannot read {ARCHIVE} and {LABELS} ({type(error).__name__}: {error})") from error
    missing = [str(name) for name in names if str(name) not in sizes]
    if missing or images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{folder}: {ARCHIVE} holds {images.dtype} {images.shape} and {len(missing)} slices that "
                        f"{LABELS} does not list (e.g. {missing[:2]})")
    runs = series_runs(labels, numbers, np.array([sizes[str(name)] for name in names]))
    if image_size and image_size != images.shape[-1]:
        images = np.stack([resize_image(image, image_size) for image in images])
    return images[:, None], labels, runs


def _split(labels: np.ndarray, units: np.ndarray | None) -> np.ndarray:
    split = np.empty(len(labels), dtype="<U5")
    for name, indices in zip(("train", "val", "test"), patient_split(labels, units, SPLIT_FRACTIONS, SPLIT_SEED)):
        split[indices] = name
    return split


def load_sarscov2_ct(data_dir: Path, image_size: int | None, on_error: str) -> ImageDataset:
    """The 2,435 slices with a run-level (pseudo-patient) split; see the module docstring."""
    images, labels, runs = _read(data_dir, image_size)
    return ImageDataset(images, labels, "binary", CLASS_NAMES, _split(labels, runs), runs, "sarscov2-ct")


def load_sarscov2_ct_slices(data_dir: Path, image_size: int | None, on_error: str) -> ImageDataset:
    """The same slices with a random slice-level split that leaks patients (for comparison only)."""
    images, labels, _ = _read(data_dir, image_size)
    return ImageDataset(images, labels, "binary", CLASS_NAMES, _split(labels, None), None, "sarscov2-ct-slices")
