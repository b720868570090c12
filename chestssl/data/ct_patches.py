"""Random lung crops of full chest CTs, added to a volume cache as unlabelled entries for pretraining.

Shapes: ``S`` the crop side (``size``); ``D, H, W`` a source volume's; every array is (z, y, x) in the canonical
orientation of :func:`~chestssl.data.ct_io.read_ct`. The sources are a prepare-ct cache
(:mod:`chestssl.data.prepare_ct`); the crops usually go beside the LIDC nodule cubes (:mod:`chestssl.data.lidc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chestssl.data.ct_files import short_hash
from chestssl.data.volume_cache import load_volume, read_manifest, save_volume, write_manifest
from chestssl.errors import DataError


def ct_patches(source_cache: str | Path, cache_dir: str | Path, size: int = 32, per_volume: int = 8, seed: int = 0,
               min_lung_fraction: float = 0.5, exclude_splits: Sequence[str] = ("test",)) -> Path:
    """Add random ``size``^3 crops of full chest CTs, mostly lung, to a cache as unlabelled "pretrain" entries.

    Crops are drawn among all those at least ``min_lung_fraction`` lung (by the source's lung mask; a crop that
    cannot be found is a ``failed`` row). At 64^3 a 32^3 crop is at most about 55% lung. The draw of a volume
    depends only on ``seed`` and its id, so a re-run skips volumes whose crops are recorded. The crops keep the
    source's HU window and spacing (``spacing_mm`` column): use the nodules' window in prepare-ct.

    Args:
        source_cache: a prepare-ct cache of full CTs (image and lung mask per volume, e.g. 64^3 or 128^3).
        cache_dir: the cache to add to (e.g. the nodule cache; its other rows are kept).
        size: crop side S in voxels.
        per_volume: crops per source volume.
        seed: the draw's seed.
        min_lung_fraction: the least share of a crop inside the source's lung mask.
        exclude_splits: source volumes of these splits are never cropped (held-out data is not pretrained on).

    Returns:
        The manifest path of ``cache_dir``.
    """
    source_cache, cache_dir = Path(source_cache), Path(cache_dir)
    sources = [row for row in read_manifest(source_cache)
               if row["status"] == "ok" and row.get("split", "") not in exclude_splits]
    if not sources:
        raise DataError(f"{source_cache}: no ok volumes outside splits {list(exclude_splits)} to crop")
    rows = {row["id"]: row for row in read_manifest(cache_dir)}
    for source in sources:
        keys = [short_hash(f"{source['id']}|{size}|{seed}|{k}") for k in range(per_volume)]
        if all(key in rows for key in keys):
            continue
        image, lung = load_volume(source_cache / source["file"])  # (D, H, W) each
        rng = np.random.default_rng([seed, int(short_hash(source["id"]), 16)])
        corners = _lung_corners(lung, size, per_volume, min_lung_fraction, rng)
        for key, corner in zip(keys, corners):
            box = tuple(slice(c, c + size) for c in corner)
            save_volume(cache_dir / f"{key}.npz", image[box], lung[box])
            rows[key] = {"id": key, "source": f"{source['id']}@z{corner[0]}y{corner[1]}x{corner[2]}", "status": "ok",
                         "file": f"{key}.npz", "patient_id": source.get("patient_id", ""), "split": "pretrain",
                         "shape": "x".join([str(size)] * 3), "spacing_mm": source.get("spacing_mm", "")}
        for key in keys[len(corners):]:
            rows[key] = {"id": key, "source": source["id"], "status": "failed", "split": "pretrain",
                         "reason": f"volume {lung.shape}: no {size}^3 crop with {min_lung_fraction:.0%} lung found"}
    return write_manifest(cache_dir, list(rows.values()))


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
