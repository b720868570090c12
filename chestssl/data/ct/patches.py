"""Random lung crops of full chest CTs, added to a volume cache as unlabelled "pretrain" entries.

Shapes: ``S`` the crop side; ``D, H, W`` a resampled CT's; every array is (z, y, x) in the canonical orientation
of :func:`~chestssl.data.ct.io.read_ct`. The crops are made exactly like the cache's own volumes: the cache's
``preprocessing.json`` (usually the LIDC nodule cubes of :mod:`chestssl.data.ct.lidc`) gives the voxel size, the cube
side and the HU window, so pretraining sees one scale and one intensity scale, and the cache keeps one record.
Only chest CTs in HU give crops (the checks of :mod:`chestssl.data.ct.chest_checks`, as in ``prepare-ct``), and
the cache's write lock (:func:`~chestssl.data.ct.cache.cache_lock`) is held while they are written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chestssl.data.ct.chest_checks import check_hu, check_lungs
from chestssl.data.ct.ops import resample, window_hu
from chestssl.data.ct.files import short_hash
from chestssl.data.ct.inputs import discover_inputs
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.preprocess import LUNG_MASK_SPACING_MM, PrepareCTConfig, anti_alias
from chestssl.data.ct.lung_mask import lung_mask
from chestssl.data.ct.cache import PREPROCESSING, cache_lock, read_manifest, save_volume, write_manifest
from chestssl.errors import DataError

logger = logging.getLogger(__name__)


def ct_patches(inputs: Sequence[str | Path], cache_dir: str | Path, per_volume: int = 32, seed: int = 0,
               min_lung_fraction: float = 0.5, on_error: str = "skip") -> Path:
    """Add ``per_volume`` random crops of each full chest CT in ``inputs`` to the cache at ``cache_dir``.

    Each CT is resampled to the cache's isotropic ``spacing_mm`` (Gaussian anti-aliasing first), its lungs found
    by :func:`~chestssl.data.ct.lung_mask.lung_mask`, and ``S``^3 crops drawn among all those at least
    ``min_lung_fraction`` lung, then windowed like the cache. Ids are short hashes of the path, the seed and the
    crop number (nothing from a header); the draw depends only on ``seed`` and the path, so a re-run skips CTs
    whose crops are recorded. A CT that cannot be read, is not in HU, whose lung mask is not lungs or holds no crop
    of enough lung is a ``failed`` row with its reason.

    Args:
        inputs: CT files or folders, as for ``prepare-ct`` (DICOM series, NIfTI, NRRD, MHA).
        cache_dir: a cache with a ``preprocessing.json`` of spatial_dims 3, ``size``, ``spacing_mm``, ``hu_window``.
        per_volume: crops per CT.
        seed: the draw's seed.
        min_lung_fraction: the least share of a crop inside the lung mask.
        on_error: "skip" records a failed CT and goes on; "raise" records it and raises.

    Returns:
        The manifest path of ``cache_dir``.

    Raises:
        CacheBusyError: another process is writing to ``cache_dir``.
    """
    cache_dir = Path(cache_dir)
    size, spacing, (hu_low, hu_high) = _cache_settings(cache_dir)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    with cache_lock(cache_dir):
        return _add_patches(inputs, cache_dir, per_volume, seed, min_lung_fraction, on_error, size, spacing,
                            (hu_low, hu_high))


def _add_patches(inputs: Sequence[str | Path], cache_dir: Path, per_volume: int, seed: int, min_lung_fraction: float,
                 on_error: str, size: int, spacing: float, window: tuple[float, float]) -> Path:
    """:func:`ct_patches` once the cache's write lock is held."""
    hu_low, hu_high = window
    rows = {row["id"]: row for row in read_manifest(cache_dir)}
    for item in discover_inputs(PrepareCTConfig(inputs=tuple(str(p) for p in inputs))):
        keys = [short_hash(f"{item.id}|{size}|{spacing:g}|{seed}|{k}") for k in range(per_volume)]
        failure = short_hash(f"{item.id}|{size}|{spacing:g}|{seed}|failed")  # one row for a CT that failed
        if all(rows.get(key, {}).get("status") == "ok" for key in keys):
            continue
        rows.pop(failure, None)
        try:
            volume = read_ct(item.path, item.series or None, files=item.files or None)
            check_hu(volume.hu)
            hu = anti_alias(volume.hu, [spacing / s for s in volume.spacing])
            hu = resample(hu, volume.spacing, (spacing,) * 3, "linear", fill_value=-1024.0)  # (D, H, W)
            lung = lung_mask(hu, (spacing,) * 3, working_spacing_mm=max(LUNG_MASK_SPACING_MM, spacing))
            check_lungs(hu, lung, (spacing,) * 3, min_lung_ml=0.0)  # too little lung: no crop, said below
            rng = np.random.default_rng([seed, int(short_hash(item.id), 16)])
            corners = _lung_corners(lung, size, per_volume, min_lung_fraction, rng)
            if not corners:
                raise DataError(f"{item.source}: no {size}^3 crop at {spacing:g} mm is {min_lung_fraction:.0%} lung "
                                f"(lung mask {lung.sum() * spacing**3 / 1000:.2f} L in a {hu.shape} volume)")
        except (ValueError, OSError, RuntimeError) as error:  # DataError is a ValueError; SimpleITK: RuntimeError
            rows[failure] = {"id": failure, "source": item.source, "status": "failed", "split": "pretrain",
                             "reason": " ".join(str(error).split())}
            logger.warning("CT patches: %s failed: %s", item.source, error)
            if on_error == "raise":
                write_manifest(cache_dir, list(rows.values()))
                raise
            continue
        for key, corner in zip(keys, corners):
            box = tuple(slice(c, c + size) for c in corner)
            save_volume(cache_dir / f"{key}.npz", window_hu(hu[box], hu_low, hu_high), lung[box])
            rows[key] = {"id": key, "source": f"{item.source}@z{corner[0]}y{corner[1]}x{corner[2]}", "status": "ok",
                         "reason": "", "file": f"{key}.npz", "split": "pretrain", "shape": "x".join([str(size)] * 3),
                         "spacing_mm": "x".join([f"{spacing:g}"] * 3),
                         "lung_ml": f"{lung[box].sum() * spacing**3 / 1000:.2f}"}
        for key in keys[len(corners):]:
            rows[key] = {"id": key, "source": item.source, "status": "failed", "split": "pretrain",
                         "reason": f"only {len(corners)} distinct {size}^3 crops are {min_lung_fraction:.0%} lung"}
        logger.info("CT patches: %d crops of %s", len(corners), item.source)
    return write_manifest(cache_dir, list(rows.values()))


def _cache_settings(cache_dir: Path) -> tuple[int, float, tuple[float, float]]:
    """(size, spacing_mm, hu_window) from the cache's preprocessing record; DataError if it cannot hold crops."""
    path = cache_dir / PREPROCESSING
    if not path.is_file():
        raise DataError(f"{cache_dir}: no {PREPROCESSING}; build the nodule cache first (chestssl prepare-lidc)")
    record = json.loads(path.read_text())
    spacing = record.get("spacing_mm")
    if record.get("spatial_dims") != 3 or not isinstance(spacing, (int, float)) or "hu_window" not in record:
        raise DataError(f"{path}: crops need a 3D cache with one isotropic spacing_mm and an hu_window, got {record}")
    return int(record["size"]), float(spacing), (float(record["hu_window"][0]), float(record["hu_window"][1]))


def _lung_corners(lung: np.ndarray, size: int, count: int, min_fraction: float,
                  rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Up to ``count`` distinct (z, y, x) corners, drawn among all ``size``^3 crops of ``lung`` (D, H, W) that are
    at least ``min_fraction`` lung (lung voxels per crop from a summed-area table)."""
    if any(n < size for n in lung.shape):
        return []
    table = np.pad(lung.astype(np.int64), ((1, 0),) * 3).cumsum(0).cumsum(1).cumsum(2)  # (D+1, H+1, W+1)
    low, high = slice(None, -size), slice(size, None)
    inside = sum(sign * table[z, y, x] for sign, z, y, x in (
        (1, high, high, high), (-1, low, high, high), (-1, high, low, high), (-1, high, high, low),
        (1, low, low, high), (1, low, high, low), (1, high, low, low), (-1, low, low, low)))  # (D-S+1, H-S+1, W-S+1)
    good = np.argwhere(inside >= min_fraction * size**3)  # (G, 3)
    chosen = np.sort(rng.choice(len(good), size=min(count, len(good)), replace=False))
    return [tuple(int(c) for c in good[i]) for i in chosen]
