"""LIDC-IDRI nodule cubes for benign/malignant classification, and lung patches of full chest CTs for pretraining.

Shapes: ``S`` the cube side (``size``); every array is (z, y, x) in the canonical orientation of
:func:`~chestssl.data.ct_io.read_ct`. Data: Armato et al., Med Phys 2011 (LIDC-IDRI), VOIs of PabloLION/ct-slicing.

A cube is the VOI resampled to ``spacing_mm`` isotropic (image linear, mask nearest), cut to ``S``^3 around the
nodule mask's centroid and windowed to [0, 1]. Where the VOI ends the cube is air (-1000 HU, 0 after windowing):
mirrored or edge-repeated tissue would invent anatomy next to the nodule. The VOIs are about 30 mm in plane but only
2.5-61 mm (median 8 mm) along z, and 549 of 994 end at the nodule's first and last slice, so a cube is on average
31% VOI (median 22%) and its padding shows the nodule's extent along z.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from chestssl.data.ct import resample, window_hu
from chestssl.data.ct_io import read_ct, short_hash
from chestssl.data.splits import patient_split
from chestssl.data.volume_cache import load_volume, read_manifest, save_volume, write_manifest
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

INDEX, IMAGES, MASKS = "nodules_index.csv", "VOIs/image", "VOIs/nodule_mask"
SIDECAR, SETTINGS = "nodules.csv", "preprocessing.json"  # the same record as prepare-ct writes
SIDECAR_COLUMNS = ["id", "patient_id", "diagnosis", "malignancy_value", "diameter_mm", "nodule_ml", "nodule_kept",
                   "inside_fraction", "lung_fraction"]
SPLITS = ("train", "val", "test")
LUNG_HU = -320.0  # the air threshold of chestssl.data.ct.lung_mask
CLOSING_MM = 2.0  # closes vessels up to about 4 mm across into the lung region


@dataclass(frozen=True)
class NoduleCube:
    """One nodule cube. ``image`` float32 (S, S, S) in [0, 1]; ``lung``, ``nodule``, ``inside`` bool (S, S, S):
    lung region, nodule mask, and voxels that came from the VOI (False in the air padding)."""

    image: np.ndarray
    lung: np.ndarray
    nodule: np.ndarray
    inside: np.ndarray
    nodule_kept: float  # share of the resampled nodule mask inside the cube (< 1 only for nodules wider than S)


def lung_region(hu: np.ndarray, nodule: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Lung region of an isotropic VOI: bool (z, y, x), True for parenchyma, vessels inside it and the nodule.

    The lung-weighted MAE loss down-weights patches outside this region. Air below -320 HU is closed with a
    ``CLOSING_MM`` ball, holes are filled per axial slice (vessels seen end-on), and the nodule is added, the
    same meaning as :func:`~chestssl.data.ct.lung_mask` on a full CT; chest wall and mediastinum of juxtapleural
    nodules stay out. Over the 994 cubes it marks 85% of the VOI's voxels (median 89%, 5th percentile 58%) and,
    with the padding left out, 27% of the cube (median 19%).
    """
    radius = max(1, round(CLOSING_MM / spacing_mm))
    grid = np.ogrid[(slice(-radius, radius + 1),) * 3]
    ball = sum(axis**2 for axis in grid) <= radius**2
    air = np.pad(hu < LUNG_HU, radius, mode="edge")  # edge padding: no erosion at the VOI's borders
    closed = ndi.binary_closing(air, ball)[(slice(radius, -radius),) * 3]
    filled = np.stack([ndi.binary_fill_holes(axial) for axial in closed])
    return filled | nodule


def nodule_cube(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float], size: int = 32, spacing_mm: float = 1.0,
                hu_low: float = -1000.0, hu_high: float = 400.0) -> NoduleCube:
    """Cut the ``size``^3 cube centred on the nodule from a VOI (see the module docstring).

    Args:
        hu: VOI (z, y, x) in HU.
        mask: nodule mask (z, y, x), nonzero inside.
        spacing: (z, y, x) voxel spacing of the VOI in mm.
        size: cube side S in voxels.
        spacing_mm: isotropic voxel size of the cube.
        hu_low: HU mapped to 0 (air).
        hu_high: HU mapped to 1; the default 400 keeps calcification (200-400 HU), a benign cue, apart.

    Raises:
        DataError: the mask is empty or differs in shape from the VOI.
    """
    if hu.shape != mask.shape or not mask.any():
        raise DataError(f"nodule mask {mask.shape} with {int(np.count_nonzero(mask))} voxels for a VOI {hu.shape}")
    iso = (spacing_mm,) * 3
    hu_iso = resample(hu.astype(np.float32), spacing, iso, "linear", fill_value=-1000.0)  # (z, y, x) at spacing_mm
    inside_iso = resample(np.ones(hu.shape, dtype=bool), spacing, iso)
    nodule_iso = resample(mask != 0, spacing, iso) & inside_iso
    lung_iso = lung_region(hu_iso, nodule_iso, spacing_mm) & inside_iso
    start = np.round(np.array(ndi.center_of_mass(nodule_iso)) - (size - 1) / 2).astype(int)
    source = tuple(slice(max(0, s), max(0, min(n, s + size))) for s, n in zip(start, hu_iso.shape))
    target = tuple(slice(cut.start - s, cut.stop - s) for cut, s in zip(source, start))
    cubes = {}
    for name, volume, fill in (("hu", hu_iso, -1000.0), ("lung", lung_iso, False), ("nodule", nodule_iso, False),
                               ("inside", inside_iso, False)):
        cubes[name] = np.full((size,) * 3, fill, dtype=volume.dtype)  # (S, S, S)
        cubes[name][target] = volume[source]
    return NoduleCube(window_hu(cubes["hu"], hu_low, hu_high), cubes["lung"], cubes["nodule"], cubes["inside"],
                      float(cubes["nodule"].sum() / nodule_iso.sum()))


def lidc_folder(data_dir: str | Path | None) -> Path:
    """The lidc-nodules folder: ``data_dir`` itself or ``<data_dir>/lidc-nodules`` (data_dir as resolved by
    :func:`~chestssl.data.paths.resolve_data_dir`)."""
    from chestssl.data.paths import resolve_data_dir

    root = resolve_data_dir(data_dir)
    return root if (root / INDEX).is_file() else root / "lidc-nodules"


def read_index(data_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``<data_dir>/nodules_index.csv``; DataError if it is missing or a Diagnosis is not Benign/Malign."""
    path = Path(data_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: no LIDC nodule index; pass the lidc-nodules folder as data_dir")
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    unknown = sorted({row.get("Diagnosis") for row in rows} - {"Benign", "Malign"}, key=str)
    if unknown or not rows:
        raise DataError(f"{path}: {len(rows)} rows, Diagnosis values {unknown} other than Benign/Malign")
    return rows


def lidc_splits(rows: list[dict[str, str]], seed: int = 0,
                fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> list[str]:
    """"train"/"val"/"test" for each index row: no patient in two splits, the same for the same seed.

    Stratified by patient with :func:`~chestssl.data.splits.patient_split`, the stratum being the patient's count
    of malignant and of benign nodules, each capped at 2. A patient with any malignant nodule as the stratum (the
    plain label) keeps the patient shares but lets the nodule-level malignant share of the ~55 validation patients
    drift by up to 8 points (30 seeds); these 9 strata halve that, as 100 of the 551 patients have both classes.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(f"need {len(SPLITS)} split fractions {SPLITS}, got {fractions}")
    patients = [row["patient_id"] for row in rows]
    malignant = Counter(row["patient_id"] for row in rows if row["Diagnosis"] == "Malign")
    benign = Counter(row["patient_id"] for row in rows if row["Diagnosis"] == "Benign")
    strata = np.array([3 * min(malignant[p], 2) + min(benign[p], 2) for p in patients])
    names = [""] * len(rows)
    for name, indices in zip(SPLITS, patient_split(strata, np.array(patients), fractions, seed)):
        for index in indices:
            names[index] = name
    return names


def nodule_id(row: dict[str, str]) -> str:
    """The cache id of an index row: a short hash of its VOI file name."""
    return short_hash(f"lidc-idri/{row['file']}")


def build_lidc_nodules(
    data_dir: str | Path, cache_dir: str | Path, size: int = 32, spacing_mm: float = 1.0, hu_low: float = -1000.0,
    hu_high: float = 400.0, split_seed: int = 0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 1, limit: int | None = None,
) -> Path:
    """Write a cube per index row (:func:`nodule_cube`, saved with ``lung`` = :func:`lung_region`) and the manifest.

    Manifest rows: label 1 Malign / 0 Benign, patient_id from the index, split from :func:`lidc_splits` on the
    whole index (so ``limit`` does not change it); rows that cannot be built are ``failed`` with the reason.
    ``nodules.csv`` beside it keeps diameter, malignancy rating and cube statistics. A re-run skips ok rows, keeps
    rows of other writers (:func:`ct_patches`) and refuses a cache made with other cube settings.

    Args:
        data_dir: the lidc-nodules folder (``nodules_index.csv``, ``VOIs/``), or the data directory holding it.
        cache_dir: where the cubes, ``manifest.csv`` and ``nodules.csv`` go.
        size, spacing_mm, hu_low, hu_high: the cube, see :func:`nodule_cube`.
        split_seed, split_fractions: the split, see :func:`lidc_splits`.
        workers: processes building cubes (about 12 s for all 994 with 2 on a 2-core machine).
        limit: build only this many index rows, spread evenly over the index (for tests).

    Returns:
        The manifest path.
    """
    data_dir, cache_dir = lidc_folder(data_dir), Path(cache_dir)
    index = read_index(data_dir)
    splits = lidc_splits(index, split_seed, split_fractions)
    settings = {"size": int(size), "spacing_mm": float(spacing_mm), "hu_low": float(hu_low), "hu_high": float(hu_high)}
    _check_settings(cache_dir, {"modality": "ct", "spatial_dims": 3, "channels": 1, "size": int(size), "axes": "zyx",
                                "spacing_mm": float(spacing_mm), "hu_window": [float(hu_low), float(hu_high)],
                                "value_range": [0.0, 1.0], "crop": "nodule-centred cube, air padding",
                                "orientation": "LPS"})
    spread = np.unique(np.linspace(0, len(index) - 1, limit or 1).round().astype(int))  # rows spread evenly
    chosen = range(len(index)) if limit is None else spread
    rows = {row["id"]: row for row in read_manifest(cache_dir)}
    done = {key for key, row in rows.items() if row["status"] == "ok" and (cache_dir / row["file"]).is_file()}
    tasks = [(index[i], data_dir, cache_dir, settings) for i in chosen if nodule_id(index[i]) not in done]
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
            results = list(pool.map(_build_one, tasks, chunksize=16))
    else:
        results = [_build_one(task) for task in tasks]
    sidecar = {row["id"]: row for row in _read_csv(cache_dir / SIDECAR)}
    for manifest_row, sidecar_row in results:
        rows[manifest_row["id"]] = manifest_row
        if sidecar_row:
            sidecar[sidecar_row["id"]] = sidecar_row
    for row, split in zip(index, splits):  # a changed split_seed re-splits without rebuilding
        if nodule_id(row) in rows:
            rows[nodule_id(row)]["split"] = split
    failed = sum(row["status"] == "failed" for row, _ in results)
    logger.info("LIDC nodules: %d built, %d failed, %d already done", len(results) - failed, failed,
                len(chosen) - len(tasks))
    _write_csv(cache_dir / SIDECAR, list(sidecar.values()), SIDECAR_COLUMNS)
    return write_manifest(cache_dir, list(rows.values()))


def _build_one(task: tuple[dict[str, str], Path, Path, dict]) -> tuple[dict[str, str], dict[str, str] | None]:
    """(manifest row, sidecar row or None) for one index row; the cube is saved on success."""
    row, data_dir, cache_dir, settings = task
    key, image_path, mask_path = nodule_id(row), data_dir / IMAGES / row["file"], data_dir / MASKS / row["file"]
    manifest = {"id": key, "source": f"{IMAGES}/{row['file']}", "label": str(int(row["Diagnosis"] == "Malign")),
                "patient_id": row["patient_id"], "status": "failed"}
    if not image_path.is_file():
        mask_note = "its nodule mask is there" if mask_path.is_file() else "nor a nodule mask"
        return manifest | {"reason": f"no VOI image {image_path.name} in the data ({mask_note})"}, None
    try:
        image = read_ct(image_path)
        quiet = _NotHU()
        logging.getLogger("chestssl.data.ct_io").addFilter(quiet)
        try:
            mask = read_ct(mask_path)
        finally:
            logging.getLogger("chestssl.data.ct_io").removeFilter(quiet)
        if mask.hu.shape != image.hu.shape or not np.allclose(mask.spacing + mask.origin, image.spacing + image.origin):
            raise DataError(f"{mask_path}: the mask's grid differs from the image's")
        cube = nodule_cube(image.hu, mask.hu, image.spacing, settings["size"], settings["spacing_mm"],
                           settings["hu_low"], settings["hu_high"])
    except (ValueError, OSError, RuntimeError) as error:  # DataError is a ValueError; SimpleITK raises RuntimeError
        return manifest | {"reason": f"{row['file']}: {error}"}, None
    save_volume(cache_dir / f"{key}.npz", cube.image, cube.lung)
    voxel_ml = settings["spacing_mm"] ** 3 / 1000
    manifest |= {"status": "ok", "file": f"{key}.npz", "shape": "x".join([str(settings["size"])] * 3),
                 "spacing_mm": "x".join([f"{settings['spacing_mm']:g}"] * 3),
                 "lung_ml": f"{cube.lung.sum() * voxel_ml:.2f}"}
    sidecar = {"id": key, "patient_id": row["patient_id"], "diagnosis": row["Diagnosis"],
               "malignancy_value": row["Malignancy_value"], "diameter_mm": row["diameter_mm"],
               "nodule_ml": f"{cube.nodule.sum() * voxel_ml:.3f}", "nodule_kept": f"{cube.nodule_kept:.3f}",
               "inside_fraction": f"{cube.inside.mean():.3f}", "lung_fraction": f"{cube.lung.mean():.3f}"}
    return manifest, sidecar


class _NotHU(logging.Filter):
    """Drops read_ct's "no value below 0 HU" warning, which is meant for images, while a mask is read."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "no value below 0 HU" not in record.getMessage()


def _check_settings(cache_dir: Path, settings: dict) -> None:
    path = cache_dir / SETTINGS
    if path.is_file():
        made_with = json.loads(path.read_text())
        if made_with != settings:
            raise DataError(f"{cache_dir} holds volumes made with {made_with}, not {settings}; use another cache_dir")
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the LIDC-IDRI nodule-cube cache (chestssl.data.lidc).")
    parser.add_argument("--data-dir", required=True, help="the lidc-nodules folder")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spacing-mm", type=float, default=1.0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--patches-from", default=None, help="a prepare-ct cache of full CTs to add lung crops from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = build_lidc_nodules(args.data_dir, args.cache_dir, args.size, args.spacing_mm,
                                  split_seed=args.split_seed, workers=args.workers, limit=args.limit)
    if args.patches_from:
        manifest = ct_patches(args.patches_from, args.cache_dir, args.size, seed=args.split_seed)
    counts = Counter((row["status"], row["split"], row["label"]) for row in read_manifest(args.cache_dir))
    for (status, split, label), count in sorted(counts.items()):
        print(f"{status:7s} {split:9s} {({'0': 'benign', '1': 'malignant'}).get(label, '-'):10s} {count}")
    print(f"manifest: {manifest}")
