"""The registry of named datasets, X-ray and CT alike, and the train/val/test form every run trains on.

Shapes: ``N`` samples, ``S`` the side of square images, ``K`` classes. X-ray loaders return images (N, 1, S, S)
uint8 held in memory; a CT volume cache (``ct-cache``) is read lazily from its ``.npz`` files.
"""

from __future__ import annotations

import inspect
import logging
import os

from chestssl.data.paths import resolve_data_dir
from chestssl.data.types import ImageDataset
from chestssl.data.xray.medmnist import load_pneumoniamnist
from chestssl.data.xray.sources import _load_dicom, _load_folder, _load_kermany, _load_nih

logger = logging.getLogger(__name__)

DATASETS = {
    "pneumoniamnist": load_pneumoniamnist,
    "kermany": _load_kermany,
    "nih-cxr14": _load_nih,
    "folder": _load_folder,
    "dicom": _load_dicom,
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
