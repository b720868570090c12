"""The in-memory form every 2D chest X-ray dataset is loaded into."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("binary", "multiclass", "multilabel", "segmentation")


@dataclass(frozen=True)
class ImageDataset:
    """A labelled (or unlabelled) set of 2D images held in memory.

    Shapes: ``N`` images, ``C`` channels (1 for chest X-rays), ``H``/``W`` pixels, ``K`` classes.

    Attributes:
        images: uint8 array (N, C, H, W), pixel values 0..255 after any DICOM rescale/VOI/inversion.
        labels: int64 array (N,) with class indices for "binary"/"multiclass" tasks, or (N, K) multi-hot for
            "multilabel"; -1 (or a row of -1) where an image has no label (unlabelled data); for "segmentation"
            uint8 label maps (N, H, W) of class indices.
        task: one of ``TASKS``.
        class_names: K names; for "binary" the two names of class 0 and class 1.
        split: str array (N,): "train", "val", "test" for an official split, "" where the source has none.
        patient_ids: str array (N,) of patient keys where the source has them, else None. Never a DICOM
            PatientID unless the user asked for it: loaders hash header identifiers.
        name: a short description of the source, for logs and reports.
    """

    images: np.ndarray
    labels: np.ndarray
    task: str
    class_names: tuple[str, ...]
    split: np.ndarray
    patient_ids: np.ndarray | None
    name: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")
        if len(self.labels) != n or len(self.split) != n:
            raise ValueError(f"{self.name}: {n} images but {len(self.labels)} labels and {len(self.split)} split entries")
        if self.patient_ids is not None and len(self.patient_ids) != n:
            raise ValueError(f"{self.name}: {n} images but {len(self.patient_ids)} patient ids")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        """The images at ``indices`` (an int array), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            task=self.task,
            class_names=self.class_names,
            split=self.split[indices],
            patient_ids=None if self.patient_ids is None else self.patient_ids[indices],
            name=self.name,
        )

    def where_split(self, *names: str) -> "ImageDataset":
        """The images whose official split is one of ``names``."""
        return self.subset(np.flatnonzero(np.isin(self.split, names)))
