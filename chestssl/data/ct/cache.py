"""The on-disk form of preprocessed CT volumes: one compressed ``.npz`` per volume plus a ``manifest.csv``.

Each ``<id>.npz`` holds ``image`` float16 (D, H, W) in [0, 1] (HU windowed and scaled) and ``lung`` uint8
(D, H, W) in {0, 1}. ``<id>`` is a short hash or the user's own ID, never a name or ID from a DICOM header.
The manifest has one row per input, failed ones included with their reason, so a re-run skips what is done,
and a patient-level ``split`` (train/val/test) for every prepared volume (:func:`ensure_splits`).

One writer at a time: every step that writes into a cache (``prepare-ct``, ``prepare-lidc``, CT patches,
:func:`ensure_splits`) holds :func:`cache_lock`, an exclusive ``fcntl`` lock on ``<cache>/.lock``, and a second
writer is refused with :class:`CacheBusyError`. Files are written under a per-process temporary name and renamed,
so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from chestssl.data.ct.manifest_splits import assign_splits, needs_split
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
PREPROCESSING = "preprocessing.json"  # how a cache's volumes were made; caches made differently do not mix
# id: cache key; source: the input as the user named it; status: "ok" or "failed"; reason: why it failed;
# file: the .npz relative to the cache; label / patient_id / split: from the user's manifest or a dataset builder
# series: short hash of the SeriesInstanceUID of a DICOM input
MANIFEST_COLUMNS = ["id", "source", "series", "status", "reason", "file", "label", "patient_id", "split",
                    "shape", "spacing_mm", "lung_ml"]
LOCK = ".lock"
SPLITS_LOCK_WAIT_S = 60.0  # ensure_splits waits this long for another writer (a DDP rank writing the same splits)


class CacheBusyError(DataError):
    """Another process holds the cache's write lock."""


@contextmanager
def cache_lock(cache_dir: str | Path, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive write lock of a cache folder (created if needed) for the ``with`` block.

    Args:
        cache_dir: the cache folder.
        wait_s: how long to wait for another holder to finish; 0 refuses at once.

    Raises:
        CacheBusyError: another process holds the lock; the message names the folder and the holder.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / LOCK
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
                    raise CacheBusyError(
                        f"{cache}: another process is writing to this cache ({holder}; lock file {path}); wait for "
                        "it to finish or use another cache_dir") from None
                time.sleep(0.1)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(handle, 0)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file named for this process, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("x", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def stored_values(image: np.ndarray) -> np.ndarray:
    """``image`` as a cache stores it (clipped to [0, 1], float16), so what is made on the fly (``predict``) is
    exactly what training read back."""
    return np.clip(image, 0, 1).astype(np.float16)


def save_volume(path: str | Path, image: np.ndarray, lung: np.ndarray, compress: bool = True,
                nodule: np.ndarray | None = None) -> None:
    """Write one preprocessed volume atomically (temporary file, then rename): image float16, lung uint8, and
    where given the nodule mask uint8 (``prepare-lidc``: the segmentation target).

    ``compress=False`` writes a plain ``.npz``: at 128^3 about 1.6-2x the disk and 5-6x faster to read back
    (``python benchmarks/scale_estimate.py``), for when the loader workers, not the GPU, bound pretraining.
    """
    path = Path(path)
    if image.shape != lung.shape or (nodule is not None and nodule.shape != image.shape):
        raise ValueError(f"image {image.shape}, lung mask {lung.shape} and nodule mask "
                         f"{None if nodule is None else nodule.shape} differ in shape")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(handle)
    try:
        save = np.savez_compressed if compress else np.savez
        extra = {} if nodule is None else {"nodule": nodule.astype(np.uint8)}
        save(temporary, image=stored_values(image), lung=lung.astype(np.uint8), **extra)
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


def load_nodule_mask(path: str | Path) -> np.ndarray:
    """The nodule mask uint8 (D, H, W) of a ``prepare-lidc`` cube; DataError if the file has none."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "nodule" not in archive.files:
                raise DataError(f"cached volume {path} holds no nodule mask: it was written before prepare-lidc "
                                "cached the masks (or is not a nodule cube); prepare a new cache directory")
            return archive["nodule"].astype(np.uint8)
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cached volume {path} is unreadable ({type(error).__name__}: {error})") from error


def read_manifest(cache: str | Path) -> list[dict[str, str]]:
    """Rows of ``<cache>/manifest.csv`` (empty if there is none yet)."""
    path = Path(cache) / MANIFEST
    if not path.exists():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def write_manifest(cache: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write the manifest atomically with :data:`MANIFEST_COLUMNS` (missing fields left empty).

    The caller holds :func:`cache_lock`; the temporary file is named for this process all the same.
    """
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column) or "" for column in MANIFEST_COLUMNS})
    return atomic_write_text(Path(cache) / MANIFEST, stream.getvalue())


def ensure_splits(cache_dir: str | Path, split_seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of a cache, after giving every prepared (ok) row without one a patient-level split.

    Caches written before ``prepare-ct`` recorded splits have none: they get the stratified, patient-level
    70/10/20 split of :func:`~chestssl.data.ct.manifest_splits.assign_splits` (the one ``prepare-ct`` records),
    written into the manifest under :func:`cache_lock`, so pretraining and fine-tuning see the same test split.
    A manifest whose ok rows all have a split is returned as it is, without taking the lock.

    Args:
        cache_dir: a folder written by ``prepare-ct`` or a dataset builder.
        split_seed: the seed of the split given to patients that have none.

    Returns:
        Every row of the manifest (failed ones included), as :func:`read_manifest` gives them.

    A read-only cache gets the same split, computed but not written (a warning says so).

    Raises:
        DataError: the folder has no manifest; CacheBusyError: another writer held the cache for a minute.
    """
    cache = Path(cache_dir)
    if not (cache / MANIFEST).is_file():
        raise DataError(f"{cache}: no {MANIFEST}; run prepare-ct with cache_dir={cache} first")
    rows = read_manifest(cache)
    if not any(needs_split(row) for row in rows):
        return rows
    try:
        with cache_lock(cache, wait_s=SPLITS_LOCK_WAIT_S):
            rows = read_manifest(cache)  # another process may have written them meanwhile
            assigned = assign_splits(rows, split_seed)
            if assigned:
                write_manifest(cache, rows)
                logger.info("%s: recorded a patient-level split for %d prepared volume(s) (split_seed %d)",
                            cache, assigned, split_seed)
    except PermissionError as error:  # a read-only cache: the same split, computed each time
        assign_splits(rows, split_seed)
        logger.warning("%s is read-only (%s): its patient-level split is computed but not recorded", cache, error)
        return [{column: row.get(column) or "" for column in MANIFEST_COLUMNS} for row in rows]  # as if written
    return read_manifest(cache)
