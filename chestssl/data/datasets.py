"""The registry of named datasets, X-ray and CT alike, and the train/val/test form every run trains on.

Shapes: ``N`` samples, ``S`` the side of square images, ``K`` classes. X-ray loaders return images (N, 1, S, S)
uint8 held in memory; a CT volume cache (``ct-cache``) is read lazily from its ``.npz`` files.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestssl.data.ct.cache import PREPROCESSING, ensure_splits, load_nodule_mask, load_volume
from chestssl.data.paths import resolve_data_dir
from chestssl.data.splits import load_splits
from chestssl.data.types import ImageDataset
from chestssl.errors import DataError
from chestssl.data.xray.medmnist import load_pneumoniamnist
from chestssl.data.xray.sources import _load_dicom, _load_folder, _load_kermany, _load_nih
from chestssl.data.ct.slices import load_sarscov2_ct, load_sarscov2_ct_slices
from chestssl.data.xray.lungseg import load_lungseg, load_lungseg_covid

logger = logging.getLogger(__name__)

DATASETS = {
    "pneumoniamnist": load_pneumoniamnist,
    "kermany": _load_kermany,
    "nih-cxr14": _load_nih,
    "folder": _load_folder,
    "dicom": _load_dicom,
    "sarscov2-ct": load_sarscov2_ct,  # COVID vs non-COVID CT slices, split by runs of one patient's slices
    "sarscov2-ct-slices": load_sarscov2_ct_slices,  # the same, split by slice: leaks patients (comparison only)
    "cxr-lungseg": load_lungseg,  # Montgomery + Shenzhen X-rays with binary lung masks (segmentation)
    "cxr-lungseg-covid": load_lungseg_covid,  # X-rays with right lung / left lung / heart label maps (segmentation)
}


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, image_size: int | None = None, on_error: str = "raise",
    **options: object,
) -> ImageDataset:
    """Load a named dataset as images (N, 1, S, S) uint8 with its labels, split and patient ids.

    Args:
        name: one of ``DATASETS``.
        data_dir: folder holding the datasets; see :func:`~chestssl.data.paths.resolve_data_dir`.
        image_size: side S; default 28 (pneumoniamnist), 64 (nih-cxr14), else 224.
        on_error: "raise" stops at the first unreadable file; "skip" warns per bad file, drops it and
            reports the count.
        **options: loader options, e.g. ``root``, ``labels_csv``, ``label_columns``, ``class_names``,
            ``limit`` (rows spread evenly over the CSV), ``patient_id_from_header``, ``download``.

    Raises:
        ValueError: an unknown name, ``on_error`` value or option.
        DataError: missing or bad files; the message names the file and the problem.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if image_size is not None and int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    loader = DATASETS[name]
    accepted = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r} takes no option(s) {unknown}; its options are {accepted}")
    dataset = loader(resolve_data_dir(data_dir), image_size, on_error, **options)
    logger.info("loaded %s: %d images of %s px, task %s", name, len(dataset), dataset.images.shape[2:], dataset.task)
    return dataset


CT_CACHE = "ct-cache"  # a folder written by prepare-ct or prepare-lidc, read lazily
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split: ``inputs`` (uint8 (N, 1, H, W) images or N cached volume files), labels, patient ids."""

    inputs: np.ndarray | tuple[Path, ...]
    labels: np.ndarray
    patient_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices, dtype=np.int64)
        inputs = self.inputs[indices] if isinstance(self.inputs, np.ndarray) else tuple(self.inputs[i] for i in indices)
        return Split(inputs, self.labels[indices], None if self.patient_ids is None else self.patient_ids[indices])


@dataclass(frozen=True)
class Labelled:
    """Train/val/test of a labelled dataset and how its inputs were made.

    ``label_kind`` is "binary", "multiclass" or "multilabel"; ``preprocessing`` is the record an encoder trained
    on these inputs carries (see :func:`chestssl.data.batch.xray_preprocessing` and ``preprocessing.json``).
    """

    train: Split
    val: Split
    test: Split
    label_kind: str
    class_names: tuple[str, ...]
    spatial_dims: int
    preprocessing: dict

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"] if self.spatial_dims == 2 else self.preprocessing["size"])


def cache_preprocessing(cache_dir: str | Path) -> dict:
    """The preprocessing record of a volume cache (``preprocessing.json``)."""
    path = Path(cache_dir) / PREPROCESSING
    if not path.is_file():
        raise DataError(f"{cache_dir} has no {PREPROCESSING}: it is not a chestssl volume cache (run prepare-ct)")
    return json.loads(path.read_text())


def _label_order(value: str) -> tuple:
    return (not value.lstrip("-").isdigit(), int(value) if value.lstrip("-").isdigit() else 0, value)


def load_cache_splits(cache_dir: str | Path, split_seed: int = 0) -> Labelled:
    """Labelled volumes of a cache: rows with status ok and a label, split by the manifest's patient-level
    ``split`` column (recorded when the cache was prepared, or now, beside it, for an older cache), so the
    volumes a benchmark tests on are the ones pretraining left out."""
    cache = Path(cache_dir)
    rows = [r for r in ensure_splits(cache, split_seed) if r["status"] == "ok" and r.get("label", "") not in ("", "-1")]
    if not rows:
        raise DataError(f"{cache}/manifest.csv lists no prepared volume with a label")
    names = sorted({r["label"] for r in rows}, key=_label_order)
    labels = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
    patients = np.array([r.get("patient_id") or r["id"] for r in rows])
    everything = Split(tuple(cache / r["file"] for r in rows), labels, patients)
    splits = np.array([r.get("split", "") for r in rows])
    parts = {name: everything.subset(np.flatnonzero(splits == name)) for name in SPLIT_NAMES}
    empty = [name for name, part in parts.items() if len(part) == 0]
    if empty:
        counts = {name: len(part) for name, part in parts.items()}
        raise DataError(f"{cache}: the labelled volumes split into {counts}; the {empty} split(s) are empty. "
                        "Each of train, val and test needs volumes: label more volumes or set the split column")
    label_kind = "binary" if len(names) == 2 else "multiclass"
    return Labelled(parts["train"], parts["val"], parts["test"], label_kind, tuple(names), 3, cache_preprocessing(cache))


NODULE_SOURCE = "VOIs/image/"  # manifest sources of prepare-lidc's nodule cubes (not the full-CT lung crops)


def load_cache_segmentation(cache_dir: str | Path, split_seed: int = 0) -> Labelled:
    """Nodule segmentation from a ``prepare-lidc`` cache: every nodule cube (labelled for malignancy or not: the
    mask is the label here) with its nodule mask, held in memory ((N, 1, S, S, S) float32 and (N, S, S, S) uint8;
    1,000 cubes of 32^3 are 160 MB), split by the manifest's patient-level split, the classification benchmark's."""
    cache = Path(cache_dir)
    rows = [r for r in ensure_splits(cache, split_seed) if r["status"] == "ok" and r["source"].startswith(NODULE_SOURCE)]
    if not rows:
        raise DataError(f"{cache}/manifest.csv lists no nodule cube: nodule segmentation needs a prepare-lidc cache")
    images = np.stack([load_volume(cache / r["file"])[0] for r in rows])[:, None]
    masks = np.stack([load_nodule_mask(cache / r["file"]) for r in rows])
    patients = np.array([r.get("patient_id") or r["id"] for r in rows])
    splits = np.array([r.get("split", "") for r in rows])
    everything = Split(images, masks, patients)
    parts = {name: everything.subset(np.flatnonzero(splits == name)) for name in SPLIT_NAMES}
    return Labelled(parts["train"], parts["val"], parts["test"], "segmentation", ("background", "nodule"), 3,
                    cache_preprocessing(cache))


def load_labelled(name: str, data_dir: str | None, image_size: int, split_seed: int, preprocessing: dict,
                  cache_dir: str | None = None, root: str | None = None, labels_csv: str | None = None,
                  task: str = "classification") -> Labelled:
    """Train/val/test of a named X-ray dataset (``preprocessing`` is how its pixels become inputs), or of a CT
    volume cache (``name == "ct-cache"``, its own ``preprocessing.json`` plus ``preprocessing["normalisation"]``;
    with ``task="segmentation"`` the nodule cubes and their masks, :func:`load_cache_segmentation`)."""
    if name == CT_CACHE:
        if not cache_dir:
            raise DataError("dataset ct-cache needs cache_dir: a folder written by prepare-ct or prepare-lidc")
        loader = load_cache_segmentation if task == "segmentation" else load_cache_splits
        data = loader(cache_dir, split_seed)
        record = {**data.preprocessing, "normalisation": preprocessing["normalisation"]}
        return Labelled(data.train, data.val, data.test, data.label_kind, data.class_names, 3, record)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join([*DATASETS, CT_CACHE])}")
    splits = load_splits(name, data_dir, image_size, split_seed, root=root, labels_csv=labels_csv)
    parts = {part: Split(d.images, d.labels, d.patient_ids) for part, d in splits.items()}
    empty = [part for part, split in parts.items() if len(split) == 0]
    if empty:
        counts = {part: len(split) for part, split in parts.items()}
        raise DataError(f"dataset {name}: the labelled images split into {counts}; the {empty} split(s) are empty. "
                        "Each of train, val and test needs images: add images or give a split column")
    train = splits["train"]
    return Labelled(parts["train"], parts["val"], parts["test"], train.task, train.class_names, 2, preprocessing)
