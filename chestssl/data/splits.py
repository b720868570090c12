"""Patient-level splits and stratified, nested label fractions.

A label fraction ``f`` of a split keeps ``round(f * n_c)`` units of each class ``c`` (a unit is a patient where
patient ids exist, else an image), taken in a seeded order that does not depend on ``f``: for the same seed the
1% subset lies inside the 10% subset, which lies inside the 100% set, and the same call returns the same subset.
"""

from __future__ import annotations

import numpy as np

from typing import TYPE_CHECKING

from chestssl.errors import DataError

if TYPE_CHECKING:
    from chestssl.data.types import ImageDataset


def stratum_keys(labels: np.ndarray) -> np.ndarray:
    """The class each sample is stratified by: its class index, or for multi-hot rows the rarest positive
    label (-1 for rows with no positive label)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positives = labels.clip(min=0).sum(axis=0)
    rarity = np.where(labels > 0, positives[None, :], np.inf)  # (N, K) positive count of each present label
    return np.where(np.isinf(rarity).all(axis=1), -1, rarity.argmin(axis=1))


def _units(patient_ids: np.ndarray | None, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit of each sample, unique units); a unit is a patient, or the sample itself without patient ids."""
    if patient_ids is None:
        units = np.arange(count)
        return units, units
    unique, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    return inverse, np.arange(len(unique))


def _unit_strata(keys: np.ndarray, sample_units: np.ndarray, num_units: int) -> np.ndarray:
    """One stratum per unit: the largest stratum key among its samples (a patient with any pneumonia image
    counts as pneumonia), so a patient is never split across strata."""
    strata = np.full(num_units, np.iinfo(np.int64).min)
    np.maximum.at(strata, sample_units, keys)
    return strata


def label_fraction(
    labels: np.ndarray,
    fraction: float,
    seed: int,
    patient_ids: np.ndarray | None = None,
    class_names: tuple[str, ...] = (),
    where: str = "training split",
) -> np.ndarray:
    """Indices of a stratified, nested, patient-level subset holding ``fraction`` of the labels.

    Args:
        labels: (N,) class indices or (N, K) multi-hot labels.
        fraction: in (0, 1]; 1 returns everything.
        seed: the subset's seed; the same seed gives nested subsets across fractions.
        patient_ids: (N,) patient keys; all images of a patient are taken together.
        class_names: for error messages.
        where: names the split in error messages.

    Raises:
        DataError: when the fraction leaves a class with no example.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    count = len(labels)
    if fraction == 1.0:
        return np.arange(count)
    keys = stratum_keys(labels)
    sample_units, units = _units(patient_ids, count)
    strata = _unit_strata(keys, sample_units, len(units))
    order = np.random.default_rng(seed).permutation(len(units))  # the same order for every fraction
    chosen = []
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        take = int(np.floor(fraction * len(members) + 0.5))  # half rounds up (Python's round() goes to even)
        if take == 0:
            name = class_names[stratum] if 0 <= stratum < len(class_names) else str(stratum)
            raise DataError(
                f"label fraction {fraction} leaves class {name!r} of the {where} with no example "
                f"({len(members)} {'patients' if patient_ids is not None else 'images'} x {fraction} rounds to 0); "
                f"use a fraction of at least {0.5 / len(members):.3g}"
            )
        chosen.append(members[:take])
    chosen_units = np.concatenate(chosen)
    return np.flatnonzero(np.isin(sample_units, chosen_units))


def label_count(patient_ids: np.ndarray | None, count: int, seed: int, where: str = "training split") -> np.ndarray:
    """Indices of a labelled subset of about ``count`` images, whole patients, for budgets counted in images
    (segmentation: 5, 10, 20 labelled X-rays).

    Patients are taken in a seeded order until at least ``count`` images are in (exactly ``count`` when every
    patient has one image), so for one seed a smaller budget lies inside a larger one.

    Raises:
        DataError: ``count`` is below 1 or above the number of images.
    """
    total = len(patient_ids) if patient_ids is not None else 0
    if patient_ids is None:
        raise DataError(f"label_count needs patient ids in the {where}")
    if not 1 <= count <= total:
        raise DataError(f"label_count {count}: the {where} has {total} images; ask for 1 to {total}")
    sample_units, units = _units(patient_ids, total)
    order = np.random.default_rng(seed).permutation(len(units))
    sizes = np.bincount(sample_units, minlength=len(units))[order]
    taken = order[: int(np.searchsorted(np.cumsum(sizes), count)) + 1]
    return np.flatnonzero(np.isin(sample_units, taken))


def patient_split(
    labels: np.ndarray,
    patient_ids: np.ndarray | None,
    fractions: tuple[float, ...],
    seed: int,
) -> list[np.ndarray]:
    """Split samples into len(fractions) disjoint, stratified parts with no patient in two parts.

    Args:
        labels: (N,) or (N, K) labels used for stratification.
        patient_ids: (N,) patient keys, or None to split images.
        fractions: e.g. (0.7, 0.1, 0.2); must sum to 1.
        seed: the split's seed.

    Returns:
        One index array per fraction.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} must sum to 1")
    sample_units, units = _units(patient_ids, len(labels))
    strata = _unit_strata(stratum_keys(labels), sample_units, len(units))
    order = np.random.default_rng(seed).permutation(len(units))
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum((0.0,) + tuple(fractions))
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        edges = np.round(bounds * len(members)).astype(int)
        for part, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
            parts[part].append(members[low:high])
    return [np.flatnonzero(np.isin(sample_units, np.concatenate(p))) for p in parts]


def labelled(dataset: "ImageDataset") -> "ImageDataset":
    """Drop images without a label (label -1, or a multi-hot row of -1)."""
    labels = dataset.labels.reshape(len(dataset), -1)
    return dataset.subset(np.flatnonzero((labels >= 0).all(axis=1)))


def load_splits(name: str, data_dir: str | None, image_size: int, split_seed: int = 0,
                root: str | None = None, labels_csv: str | None = None) -> dict[str, "ImageDataset"]:
    """Train/val/test of a named dataset: its official split where there is one; a missing validation split
    comes from the training split (10% of its patients); without any split, a patient-level 70/10/20 split.

    Every generated split is stratified, patient-level where patient ids exist, and fixed by ``split_seed``.
    """
    from chestssl.data.datasets import load_dataset

    options = {key: value for key, value in (("root", root), ("labels_csv", labels_csv)) if value is not None}
    dataset = labelled(load_dataset(name, data_dir=data_dir, image_size=image_size, **options))
    present = set(dataset.split.tolist())
    if {"train", "val", "test"} <= present:
        return {part: dataset.where_split(part) for part in ("train", "val", "test")}
    if {"train", "test"} <= present:
        train = dataset.where_split("train")
        fit_part, val_part = patient_split(train.labels, train.patient_ids, (0.9, 0.1), split_seed)
        return {"train": train.subset(fit_part), "val": train.subset(val_part), "test": dataset.where_split("test")}
    parts = patient_split(dataset.labels, dataset.patient_ids, (0.7, 0.1, 0.2), split_seed)
    return {part: dataset.subset(indices) for part, indices in zip(("train", "val", "test"), parts)}
