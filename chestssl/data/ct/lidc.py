"""LIDC-IDRI nodule cubes for benign/malignant classification: the index, the patient-level split, the cache.

Data: Armato et al., Med Phys 2011 (LIDC-IDRI), VOIs of PabloLION/ct-slicing. Each index row becomes one cube of
:func:`~chestssl.data.ct.nodule_cube.nodule_cube` in the volume cache, labelled 1 for a malignant and 0 for a benign
nodule; lung crops of full chest CTs can be added beside them with :func:`~chestssl.data.ct.patches.ct_patches`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from chestssl.data.ct.files import short_hash
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.patches import ct_patches
from chestssl.data.ct.nodule_cube import nodule_cube
from chestssl.data.splits import patient_split
from chestssl.data.ct.cache import (PREPROCESSING, atomic_write_text, cache_lock, read_manifest, save_volume,
                                    write_manifest)
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

INDEX, IMAGES, MASKS = "nodules_index.csv", "VOIs/image", "VOIs/nodule_mask"
SIDECAR = "nodules.csv"
SIDECAR_COLUMNS = ["id", "patient_id", "diagnosis", "malignancy_value", "diameter_mm", "nodule_ml", "nodule_kept",
                   "inside_fraction", "lung_fraction"]
SPLITS = ("train", "val", "test")
# How a nodule's label is read from the index. "malignancy", the common LIDC protocol: the radiologists' aggregate
# malignancy score (Malignancy_value, 1-5) below 3 is benign, above 3 malignant, exactly 3 indeterminate and left
# unlabelled (377 / 255 / 364 of the 996 rows). "max-vote": the index's Diagnosis (the raters' majority), which
# labels every nodule, the 364 indeterminate ones included, and calls 40 nodules scored 1-2 malignant.
LABEL_RULES = ("malignancy", "max-vote")


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


def nodule_label(row: dict[str, str], rule: str = "malignancy") -> str:
    """"1" malignant, "0" benign, or "" (unlabelled: an indeterminate score 3 under ``rule="malignancy"``)."""
    if rule == "max-vote":
        return str(int(row["Diagnosis"] == "Malign"))
    if rule != "malignancy":
        raise ValueError(f"label rule must be one of {LABEL_RULES}, got {rule!r}")
    try:
        score = float(row["Malignancy_value"])
    except (KeyError, ValueError) as error:
        raise DataError(f"LIDC index row {row.get('file', '?')}: no numeric Malignancy_value ({error})") from error
    return "" if score == 3 else str(int(score > 3))


def nodule_id(row: dict[str, str]) -> str:
    """The cache id of an index row: a short hash of its VOI file name."""
    return short_hash(f"lidc-idri/{row['file']}")


def build_lidc_nodules(
    data_dir: str | Path, cache_dir: str | Path, size: int = 32, spacing_mm: float = 1.0, hu_low: float = -1000.0,
    hu_high: float = 400.0, split_seed: int = 0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 1, limit: int | None = None, labels: str = "malignancy",
) -> Path:
    """Write a cube per index row (:func:`~chestssl.data.ct.nodule_cube.nodule_cube`, saved with ``lung`` =
    :func:`~chestssl.data.ct.nodule_cube.lung_region` and ``nodule``, the nodule mask cut to the cube: the target
    of nodule segmentation) and the manifest.

    Manifest rows: label 1 malignant / 0 benign by ``labels`` (:data:`LABEL_RULES`; empty for an indeterminate
    nodule, which stays in the cache as unlabelled data for pretraining), patient_id from the index, split from
    :func:`lidc_splits` on the whole index (the same for either label rule, so ``limit`` does not change it either);
    rows that cannot be built are ``failed`` with the reason.
    ``nodules.csv`` beside it keeps diameter, malignancy rating and cube statistics. A re-run skips ok rows, keeps
    rows of other writers (:func:`~chestssl.data.ct.patches.ct_patches`) and refuses a cache made with other cube
    settings.

    Args:
        data_dir: the lidc-nodules folder (``nodules_index.csv``, ``VOIs/``), or the data directory holding it.
        cache_dir: where the cubes, ``manifest.csv`` and ``nodules.csv`` go.
        size, spacing_mm, hu_low, hu_high: the cube, see :func:`~chestssl.data.ct.nodule_cube.nodule_cube`.
        split_seed, split_fractions: the split, see :func:`lidc_splits`.
        workers: processes building cubes (about 12 s for all 994 with 2 on a 2-core machine).
        limit: build only this many index rows, spread evenly over the index (for tests).
        labels: the label rule, recorded with the cache: a cache labelled by another rule is refused.

    Returns:
        The manifest path.

    Raises:
        CacheBusyError: another process is writing to ``cache_dir`` (its write lock is held while building).
    """
    if labels not in LABEL_RULES:
        raise ValueError(f"labels must be one of {LABEL_RULES}, got {labels!r}")
    data_dir, cache_dir = lidc_folder(data_dir), Path(cache_dir)
    with cache_lock(cache_dir):
        return _build_locked(data_dir, cache_dir, size, spacing_mm, hu_low, hu_high, split_seed, split_fractions,
                             workers, limit, labels)


def _build_locked(data_dir: Path, cache_dir: Path, size: int, spacing_mm: float, hu_low: float, hu_high: float,
                  split_seed: int, split_fractions: tuple[float, float, float], workers: int,
                  limit: int | None, labels: str) -> Path:
    """:func:`build_lidc_nodules` once the cache's write lock is held."""
    index = read_index(data_dir)
    splits = lidc_splits(index, split_seed, split_fractions)
    settings = {"size": int(size), "spacing_mm": float(spacing_mm), "hu_low": float(hu_low), "hu_high": float(hu_high),
                "labels": labels}
    _check_settings(cache_dir, {"modality": "ct", "spatial_dims": 3, "channels": 1, "size": int(size), "axes": "zyx",
                                "spacing_mm": float(spacing_mm), "hu_window": [float(hu_low), float(hu_high)],
                                "value_range": [0.0, 1.0], "crop": "nodule-centred cube, air padding",
                                "orientation": "LPS", "labels": labels})
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
    manifest = {"id": key, "source": f"{IMAGES}/{row['file']}", "label": nodule_label(row, settings["labels"]),
                "patient_id": row["patient_id"], "status": "failed"}
    if not image_path.is_file():
        mask_note = "its nodule mask is there" if mask_path.is_file() else "nor a nodule mask"
        return manifest | {"reason": f"no VOI image {image_path.name} in the data ({mask_note})"}, None
    try:
        image = read_ct(image_path)
        quiet = MaskReadFilter()
        logging.getLogger("chestssl.data.ct.io").addFilter(quiet)
        try:
            mask = read_ct(mask_path)
        finally:
            logging.getLogger("chestssl.data.ct.io").removeFilter(quiet)
        if mask.hu.shape != image.hu.shape or not np.allclose(mask.spacing + mask.origin, image.spacing + image.origin):
            raise DataError(f"{mask_path}: the mask's grid differs from the image's")
        cube = nodule_cube(image.hu, mask.hu, image.spacing, settings["size"], settings["spacing_mm"],
                           settings["hu_low"], settings["hu_high"])
    except (ValueError, OSError, RuntimeError) as error:  # DataError is a ValueError; SimpleITK raises RuntimeError
        return manifest | {"reason": f"{row['file']}: {error}"}, None
    save_volume(cache_dir / f"{key}.npz", cube.image, cube.lung, nodule=cube.nodule)
    voxel_ml = settings["spacing_mm"] ** 3 / 1000
    manifest |= {"status": "ok", "file": f"{key}.npz", "shape": "x".join([str(settings["size"])] * 3),
                 "spacing_mm": "x".join([f"{settings['spacing_mm']:g}"] * 3),
                 "lung_ml": f"{cube.lung.sum() * voxel_ml:.2f}"}
    sidecar = {"id": key, "patient_id": row["patient_id"], "diagnosis": row["Diagnosis"],
               "malignancy_value": row["Malignancy_value"], "diameter_mm": row["diameter_mm"],
               "nodule_ml": f"{cube.nodule.sum() * voxel_ml:.3f}", "nodule_kept": f"{cube.nodule_kept:.3f}",
               "inside_fraction": f"{cube.inside.mean():.3f}", "lung_fraction": f"{cube.lung.mean():.3f}"}
    return manifest, sidecar


class MaskReadFilter(logging.Filter):
    """Drops read_ct's "no value below 0 HU" warning, which is meant for images, while a mask is read."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "no value below 0 HU" not in record.getMessage()


def _check_settings(cache_dir: Path, settings: dict) -> None:
    path = cache_dir / PREPROCESSING
    if path.is_file():
        made_with = json.loads(path.read_text())
        if made_with != settings:
            raise DataError(f"{cache_dir} holds volumes made with {made_with}, not {settings}; use another cache_dir")
    else:
        atomic_write_text(path, json.dumps(settings))


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, stream.getvalue())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the LIDC-IDRI nodule-cube cache (chestssl.data.ct.lidc).")
    parser.add_argument("--data-dir", required=True, help="the lidc-nodules folder")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spacing-mm", type=float, default=1.0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--labels", choices=LABEL_RULES, default="malignancy")
    parser.add_argument("--patches-from", nargs="*", default=(), help="full chest CTs to add lung crops from")
    parser.add_argument("--patches-per-volume", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = build_lidc_nodules(args.data_dir, args.cache_dir, args.size, args.spacing_mm,
                                  split_seed=args.split_seed, workers=args.workers, limit=args.limit, labels=args.labels)
    if args.patches_from:
        manifest = ct_patches(args.patches_from, args.cache_dir, args.patches_per_volume, seed=args.split_seed)
    counts = Counter((row["status"], row["split"], row["label"]) for row in read_manifest(args.cache_dir))
    for (status, split, label), count in sorted(counts.items()):
        print(f"{status:7s} {split:9s} {({'0': 'benign', '1': 'malignant'}).get(label, '-'):10s} {count}")
    print(f"manifest: {manifest}")
