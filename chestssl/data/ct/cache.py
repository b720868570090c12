"""The on-disk form of preprocessed CT volumes: one compressed ``.npz`` per volume plus a ``manifest.csv``.

Each ``<id>.npz`` holds ``image`` float16 (D, H, W) in [0, 1] (HU windowed and scaled) and ``lung`` uint8
(D, H, W) in {0, 1}. ``<id>`` is a short hash or the user's own ID, never a name or ID from a DICOM header.
The manifest has one row per input, failed ones included with their reason, so a re-run skips what is done.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np

from chestssl.errors import DataError

MANIFEST = "manifest.csv"
PREPROCESSING = "preprocessing.json"  # how a cache's volumes were made; caches made differently do not mix
# id: cache key; source: the input as the user named it; status: "ok" or "failed"; reason: why it failed;
# file: the .npz relative to the cache; label / patient_id / split: from the user's manifest or a dataset builder
MANIFEST_COLUMNS = ["id", "source", "status", "reason", "file", "label", "patient_id", "split",
                    "shape", "spacing_mm", "lung_ml"]


def save_volume(path: str | Path, image: np.ndarray, lung: np.ndarray, compress: bool = True) -> None:
    """Write one preprocessed volume atomically (temporary file, then rename): image float16, lung uint8.

    ``compress=False`` writes a plain ``.npz``: at 128^3 about 1.6-2x the disk and 5-6x faster to read back
    (``python benchmarks/scale_estimate.py``), for when the loader workers, not the GPU, bound pretraining.
    """
    path = Path(path)
    if image.shape != lung.shape:
        raise ValueError(f"image {image.shape} and lung mask {lung.shape} differ in shape")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(handle)
    try:
        save = np.savez_compressed if compress else np.savez
        save(temporary, image=np.clip(image, 0, 1).astype(np.float16), lung=lung.astype(np.uint8))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 (D, H, W) in [0, 1], lung bool (D, H, W))``; DataError naming the file if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["image"].astype(np.float32), archive["lung"].astype(bool)
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"cached volume {path} is unreadable ({type(error).__name__}: {error}); delete it and re-run the step that wrote it (prepare-ct or a dataset builder)") from error


def read_manifest(cache: str | Path) -> list[dict[str, str]]:
    """Rows of ``<cache>/manifest.csv`` (empty if there is none yet)."""
    path = Path(cache) / MANIFEST
    if not path.exists():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def write_manifest(cache: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write the manifest atomically with :data:`MANIFEST_COLUMNS` (missing fields left empty)."""
    path = Path(cache) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in MANIFEST_COLUMNS})
    os.replace(temporary, path)
    return path
