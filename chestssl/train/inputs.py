"""What a run trains on, behind one interface: 2D images held in memory, or cached CT volumes read on the fly.

Legend: ``N`` samples. A :class:`Split` holds either uint8 images (N, 1, H, W) or the ``.npz`` files of a volume
cache (see :mod:`chestssl.data.ct.cache`); :func:`make_batches` gives the matching batch iterator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestssl.data.augment import AugmentConfig
from chestssl.data.batches import Batches, Normalisation
from chestssl.data.splits import patient_split
from chestssl.data.ct.cache import PREPROCESSING, read_manifest
from chestssl.data.volumes import VolumeBatches
from chestssl.errors import DataError



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
    """Train/val/test of a labelled dataset and how its inputs were made."""

    train: Split
    val: Split
    test: Split
    task: str
    class_names: tuple[str, ...]
    spatial_dims: int
    preprocessing: dict


def cache_preprocessing(cache_dir: str | Path) -> dict:
    """The preprocessing record of a volume cache (``preprocessing.json``)."""
    path = Path(cache_dir) / PREPROCESSING
    if not path.is_file():
        raise DataError(f"{cache_dir} has no {PREPROCESSING}: it is not a chestssl volume cache (run prepare-ct)")
    return json.loads(path.read_text())


def load_cache_splits(cache_dir: str | Path, split_seed: int = 0) -> Labelled:
    """Labelled volumes of a cache: rows with status ok and a label; the manifest's ``split`` column where it
    names train/val/test, else a stratified patient-level 70/10/20 split fixed by ``split_seed``."""
    cache = Path(cache_dir)
    rows = [r for r in read_manifest(cache) if r["status"] == "ok" and r.get("label", "") not in ("", "-1")]
    if not rows:
        raise DataError(f"{cache}/manifest.csv lists no prepared volume with a label")
    names = sorted({r["label"] for r in rows}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    labels = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
    patients = np.array([r.get("patient_id") or r["id"] for r in rows])
    files = tuple(cache / r["file"] for r in rows)
    everything = Split(files, labels, patients)
    splits = np.array([r.get("split", "") for r in rows])
    if {"train", "val", "test"} <= set(splits.tolist()):
        parts = [np.flatnonzero(splits == name) for name in ("train", "val", "test")]
    else:
        parts = patient_split(labels, patients, (0.7, 0.1, 0.2), split_seed)
    train, val, test = (everything.subset(p) for p in parts)
    task = "binary" if len(names) == 2 else "multiclass"
    return Labelled(train, val, test, task, tuple(names), 3, cache_preprocessing(cache))


def make_batches(
    split_inputs: np.ndarray | tuple[Path, ...] | list[Path],
    labels: np.ndarray | None,
    batch_size: int,
    normalisation: Normalisation | None,
    augment: AugmentConfig | None,
    shuffle: bool,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    num_workers: int = 0,
) -> Batches | VolumeBatches:
    """Batches over images in memory, features, or cached volumes (read lazily by ``num_workers`` workers)."""
    if isinstance(split_inputs, np.ndarray):
        return Batches(split_inputs, labels, batch_size, normalisation, augment, shuffle, drop_last, rank, world_size, device)
    mean, std = (normalisation.mean, normalisation.std) if normalisation else (0.5, 0.25)
    return VolumeBatches(list(split_inputs), labels, batch_size, augment=augment is not None, shuffle=shuffle,
                         drop_last=drop_last, rank=rank, world_size=world_size, num_workers=num_workers, device=device,
                         mean=mean, std=std, intensity=augment.intensity if augment else 0.0)
