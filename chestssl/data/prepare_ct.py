"""Preprocess chest CTs at scale into the volume cache (what ``chestssl prepare-ct`` runs).

Per volume, in :func:`preprocess_volume` (pure, arrays (z, y, x) = (D, H, W) in the canonical LPS
orientation of :func:`~chestssl.data.ct_io.read_ct`): resample to ``spacing_mm`` isotropic → lung mask
(or the user's mask, resampled) → crop to the lungs' bounding box plus ``margin_mm`` → HU window to
[0, 1] → resize to a ``size``³ cube. Every downsampling is preceded by a Gaussian anti-aliasing filter
(sigma = (factor - 1) / 2 voxels, as in scikit-image), so a 4x smaller cube averages its voxels instead
of picking one in four.

:func:`prepare_ct` finds the inputs, gives each an id (never anything from a DICOM header), runs the
volumes not already done in worker processes and records every outcome in the cache manifest of
:mod:`chestssl.data.volume_cache` after each one, so an interrupted run loses nothing and a re-run only
retries what failed. ``preprocessing.json`` in the cache records how the volumes were made.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm import tqdm

from chestssl.config import save_config
from chestssl.data.ct import lung_mask, mask_bounding_box, resample, resize_to_cube, window_hu
from chestssl.data.ct_io import (
    CANONICAL_ORIENTATION,
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NOT_DICOM_SUFFIXES,
    CTVolume,
    read_ct,
    short_hash,
)
from chestssl.data.volume_cache import read_manifest, save_volume, write_manifest
from chestssl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "prepare_config.yaml"
LUNG_MASK_SPACING_MM = 3.0  # the mask is made at 3 mm: Dice 0.98 against 1.5 mm on the real chests, 4x faster
TOO_SMALL = "lung mask too small / not a chest CT"
PASSED_THROUGH = ("label", "patient_id", "split")  # user CSV columns copied into the manifest
USER_COLUMNS = ("path", "id", "mask") + PASSED_THROUGH
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # ids name files: no separators, not hidden


@dataclass(frozen=True)
class PrepareCTConfig:
    """What ``prepare-ct`` reads, how it preprocesses and where it writes.

    Attributes:
        inputs: files or folders; a folder is scanned for DICOM series folders and NIfTI/NRRD/MHA files.
        manifest_csv: a CSV with column ``path`` (relative to the CSV's folder) and optional ``id``,
            ``label``, ``patient_id``, ``split`` and ``mask`` (a lung mask file on the CT's grid).
        cache_dir: where the ``<id>.npz`` volumes, ``manifest.csv`` and the preprocessing record go.
        spacing_mm: isotropic voxel size the volume is resampled to before the lung mask and crop.
            1.5 mm (the TotalSegmentator grid) is finer than the cube's voxels for any size up to 160
            (the lung box is about 250-330 mm a side), so the final resize only ever averages down,
            while holding a chest in about 200³ voxels (1 mm would cost 3.4x the time and memory).
        hu_low, hu_high: HU window mapped to [0, 1] (air to soft tissue and contrast-filled vessels).
        size: side of the output cube (D = H = W).
        margin_mm: margin around the lungs' bounding box.
        workers: worker processes; 1 runs in this process.
        on_error: "skip" records a failed volume and goes on; "raise" records it and stops.
        series_uid: for DICOM folders holding several series, the one to read (see ``read_ct``).
        allow_gaps: interpolate over missing DICOM slices instead of refusing the series.
        min_lung_ml: a volume whose automatic lung mask is smaller fails ("not a chest CT"); a mask
            the user supplies is trusted.
    """

    inputs: tuple[str, ...] = ()
    manifest_csv: str | None = None
    cache_dir: str = "runs/ct_cache"
    spacing_mm: float = 1.5
    hu_low: float = -1000.0
    hu_high: float = 200.0
    size: int = 64
    margin_mm: float = 10.0
    workers: int = 2
    on_error: str = "skip"
    series_uid: str | None = None
    allow_gaps: bool = False
    min_lung_ml: float = 100.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        problems = [f"{name}={value!r} ({rule})" for name, value, ok, rule in [
            ("spacing_mm", self.spacing_mm, self.spacing_mm > 0, "must be positive"),
            ("hu_high", self.hu_high, self.hu_high > self.hu_low, "must exceed hu_low"),
            ("size", self.size, self.size >= 2, "must be at least 2"),
            ("margin_mm", self.margin_mm, self.margin_mm >= 0, "must be >= 0"),
            ("workers", self.workers, self.workers >= 1, "must be >= 1"),
            ("on_error", self.on_error, self.on_error in ("skip", "raise"), "must be 'skip' or 'raise'"),
            ("min_lung_ml", self.min_lung_ml, self.min_lung_ml >= 0, "must be >= 0"),
        ] if not ok]
        if problems:
            raise ValueError("PrepareCTConfig: " + "; ".join(problems))


def preprocessing_record(config: PrepareCTConfig) -> dict[str, Any]:
    """How the cached volumes were made; a fine-tuning run compares it with its own inputs."""
    return {
        "modality": "ct", "spatial_dims": 3, "channels": 1, "size": config.size, "axes": "zyx",
        "spacing_mm": config.spacing_mm, "hu_window": [config.hu_low, config.hu_high], "value_range": [0.0, 1.0],
        "lung_crop_margin_mm": config.margin_mm, "orientation": CANONICAL_ORIENTATION,
        "anti_aliasing": "gaussian, sigma = (factor - 1) / 2 voxels before each downsampling",
    }


def preprocess_volume(
    volume: CTVolume, config: PrepareCTConfig, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample, find or take the lungs, crop to them, window HU and resize to a cube.

    Args:
        volume: a CT from :func:`~chestssl.data.ct_io.read_ct`, hu (z, y, x).
        config: ``spacing_mm``, ``hu_low``/``hu_high``, ``size``, ``margin_mm`` and ``min_lung_ml`` are used.
        mask: optional lung mask of the shape of ``volume.hu`` (nonzero = lung); by default
            :func:`~chestssl.data.ct.lung_mask` finds the lungs.

    Returns:
        image float32 (S, S, S) in [0, 1], lung bool (S, S, S), and info: ``lung_ml`` (mask volume),
        ``resampled_shape`` and ``crop_shape`` (voxels at ``spacing_mm``), ``mask`` ("auto" or "user").

    Raises:
        DataError: the automatic mask holds less than ``min_lung_ml`` (not a chest CT), or the
            user's mask is empty or of another shape.
    """
    iso = (config.spacing_mm,) * 3
    hu = _anti_alias(volume.hu, [config.spacing_mm / s for s in volume.spacing])
    hu = resample(hu, volume.spacing, iso, "linear")  # (z, y, x) float32 at spacing_mm
    if mask is None:
        lung = lung_mask(hu, iso, working_spacing_mm=max(LUNG_MASK_SPACING_MM, config.spacing_mm))
    elif mask.shape != volume.hu.shape:
        raise DataError(f"{volume.source_id}: lung mask shape {mask.shape} differs from the CT's {volume.hu.shape}")
    else:
        lung = resample(mask.astype(bool), volume.spacing, iso, shape_out=hu.shape)  # nearest for a bool mask
    lung_ml = float(np.count_nonzero(lung)) * config.spacing_mm**3 / 1000.0
    if mask is None and lung_ml < config.min_lung_ml:
        raise DataError(f"{TOO_SMALL}: {lung_ml:.0f} ml of lung found, min_lung_ml is {config.min_lung_ml:g} ml")
    if not lung.any():
        raise DataError(f"{volume.source_id}: the supplied lung mask is empty")
    box = mask_bounding_box(lung, iso, config.margin_mm)
    image = window_hu(hu[box], config.hu_low, config.hu_high)  # (z, y, x) crop in [0, 1]
    crop_shape = image.shape
    image = resize_to_cube(_anti_alias(image, [n / config.size for n in crop_shape]), config.size)
    lung_cube = resize_to_cube(lung[box], config.size, is_mask=True)  # (S, S, S) nearest
    info = {"lung_ml": lung_ml, "resampled_shape": hu.shape, "crop_shape": crop_shape,
            "mask": "auto" if mask is None else "user"}
    return np.clip(image, 0.0, 1.0), lung_cube, info


def _anti_alias(volume: np.ndarray, factors: list[float]) -> np.ndarray:
    """Gaussian-smooth (z, y, x) before shrinking each axis by ``factors`` (>1 means fewer voxels)."""
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if not any(s > 0.1 for s in sigma):
        return volume
    return ndi.gaussian_filter(volume.astype(np.float32), sigma, mode="nearest", truncate=3.0)


def read_mask(path: Path, volume: CTVolume) -> np.ndarray:
    """A user's lung mask file as bool (z, y, x) in the canonical orientation, checked against ``volume``."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read this lung mask file ({str(error).strip().splitlines()[-1]})") from error
    if image.GetDimension() != 3:
        raise DataError(f"{path}: a lung mask must be a 3D volume, got {image.GetDimension()}D")
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    mask = sitk.GetArrayFromImage(image) > 0  # (z, y, x)
    spacing = image.GetSpacing()[::-1]
    if mask.shape != volume.hu.shape or not np.allclose(spacing, volume.spacing, rtol=1e-3):
        raise DataError(f"{path}: lung mask grid {mask.shape} at {np.round(spacing, 3).tolist()} mm differs from "
                        f"the CT's {volume.hu.shape} at {np.round(volume.spacing, 3).tolist()} mm")
    return mask


@dataclass(frozen=True)
class InputItem:
    """One volume to prepare: ``id`` names its cache file, ``source`` is the input as the user named it."""

    id: str
    source: str
    path: Path
    mask: Path | None = None
    extra: tuple[tuple[str, str], ...] = ()  # (column, value) for PASSED_THROUGH columns of the user CSV


def discover_inputs(config: PrepareCTConfig) -> list[InputItem]:
    """The inputs of ``config``, each with its id (the CSV's ``id``, else a short hash of the resolved path).

    An explicit path that is missing, or a folder where nothing is found, is kept as an input so that
    its failure is recorded. Raises DataError for an unreadable CSV, an unsafe id or a duplicated id.
    """
    items = []
    for entry in config.inputs:
        paths = list(_scan(Path(entry))) or [Path(entry)]
        items += [InputItem(short_hash(str(path.resolve())), str(path), path) for path in paths]
    if config.manifest_csv is not None:
        items += _read_user_csv(Path(config.manifest_csv))
    sources: dict[str, str] = {}
    for item in items:
        if item.id in sources:
            raise DataError(f"id {item.id} is given to two inputs, {sources[item.id]} and {item.source}")
        sources[item.id] = item.source
    return items


def _scan(path: Path) -> Iterator[Path]:
    """``path`` unless it is a folder without DICOM files, which is searched for CT files and DICOM folders."""
    if not path.is_dir() or _holds_dicom(path):
        yield path  # read_ct says what is wrong with a missing or unsupported path
        return
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _scan(child)
        elif child.name.lower().endswith(IMAGE_SUFFIXES):
            yield child


def _holds_dicom(folder: Path) -> bool:
    """A file directly in ``folder`` is named like DICOM or has the DICM preamble."""
    for child in folder.iterdir():
        name = child.name.lower()
        if name.startswith(".") or name.endswith(IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES) or not child.is_file():
            continue
        if child.suffix.lower() in DICOM_SUFFIXES:
            return True
        with open(child, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return True
    return False


def _read_user_csv(path: Path) -> list[InputItem]:
    try:
        with path.open(newline="") as stream:
            reader = csv.DictReader(stream)
            rows, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read this CSV ({error})") from error
    if "path" not in columns:
        raise DataError(f"{path}: no 'path' column; found {columns}, expected path and optionally {USER_COLUMNS[1:]}")
    ignored = sorted(set(columns) - set(USER_COLUMNS))
    if ignored:
        logger.warning("%s: column(s) %s ignored; used: %s", path, ignored, list(USER_COLUMNS))
    items = []
    for line, row in enumerate(rows, start=2):
        source = (row.get("path") or "").strip()
        if not source:
            raise DataError(f"{path}, line {line}: empty path")
        resolved = path.parent / Path(source).expanduser()
        item_id = (row.get("id") or "").strip() or short_hash(str(resolved.resolve()))
        if not SAFE_ID.fullmatch(item_id):
            raise DataError(f"{path}, line {line}: id {item_id!r} must be letters, digits, '.', '_' or '-' "
                            "(at most 128, not starting with '.'): it names the cache file")
        mask = (row.get("mask") or "").strip()
        extra = tuple((column, (row.get(column) or "").strip()) for column in PASSED_THROUGH)
        items.append(InputItem(item_id, source, resolved, path.parent / mask if mask else None, extra))
    return items


def prepare_ct(config: PrepareCTConfig) -> Path:
    """Preprocess every input not yet in the cache and record each outcome in the manifest.

    With ``workers > 1`` the volumes go to spawned worker processes: call this from a script only
    under ``if __name__ == "__main__":``.

    Returns:
        The path of ``<cache_dir>/manifest.csv``.

    Raises:
        ConfigError: nothing to prepare, or a cache holding volumes made with other preprocessing.
        DataError: an unreadable user CSV or a duplicated id; with ``on_error="raise"``, the first
            volume that fails (after its failure is recorded).
    """
    if not config.inputs and config.manifest_csv is None:
        raise ConfigError("prepare-ct: nothing to prepare; set inputs and/or manifest_csv")
    items = discover_inputs(config)
    cache = Path(config.cache_dir)
    rows = {row["id"]: row for row in read_manifest(cache)}
    done = {key for key, row in rows.items() if row["status"] == "ok" and (cache / row["file"]).is_file()}
    _record_preprocessing(config, cache, has_volumes=bool(done))
    save_config(config, cache / CONFIG_FILE)
    todo = [item for item in items if item.id not in done]
    logger.info("prepare-ct: %d input(s): %d already prepared, %d to process (%d of them retried)",
                len(items), len(items) - len(todo), len(todo), sum(item.id in rows for item in todo))
    manifest = write_manifest(cache, list(rows.values()))
    counts, stop, first_error = {"ok": 0, "failed": 0}, Event(), None
    outcomes = closing(_outcomes(todo, config, cache, stop))  # closed on Ctrl-C: queued volumes are cancelled
    with outcomes, tqdm(total=len(todo), desc="prepare-ct", unit="volume", disable=None) as bar:
        for row, error in outcomes.thing:
            rows[row["id"]] = row
            manifest = write_manifest(cache, list(rows.values()))  # after every volume: nothing lost on a stop
            counts[row["status"]] += 1
            bar.update()
            if error is not None:
                logger.warning("%s failed: %s", row["id"], row["reason"])
                if config.on_error == "raise" and first_error is None:
                    first_error = error
                    stop.set()  # volumes already in a worker still finish and are recorded
    if first_error is not None:
        raise first_error
    logger.info("prepare-ct: %d prepared, %d failed, %d done before; the cache holds %d volume(s): %s",
                counts["ok"], counts["failed"], len(items) - len(todo),
                sum(row["status"] == "ok" for row in rows.values()), manifest)
    return manifest


def _record_preprocessing(config: PrepareCTConfig, cache: Path, has_volumes: bool) -> None:
    """Write ``preprocessing.json``; refuse a cache whose volumes were made another way."""
    record = json.loads(json.dumps(preprocessing_record(config)))
    path = cache / PREPROCESSING_FILE
    if has_volumes and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path} is unreadable ({error}); use a new cache_dir") from error
        changed = [f"{key} {previous.get(key)} -> {new}" for key, new in record.items() if previous.get(key) != new]
        if changed:
            raise ConfigError(f"{cache} holds volumes made with other preprocessing ({'; '.join(changed)}); "
                              "use another cache_dir or delete this one")
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def _outcomes(
    todo: list[InputItem], config: PrepareCTConfig, cache: Path, stop: Event
) -> Iterator[tuple[dict[str, str], Exception | None]]:
    """``(manifest row, error or None)`` per item, in this process or from a pool as they complete.

    Once ``stop`` is set no new item starts; those already running still report.
    """
    if config.workers == 1 or len(todo) < 2:
        for item in todo:
            if stop.is_set():
                return
            yield _prepare_one(item, config, cache)
        return
    # spawn, not fork: a forked child can inherit a parent's SimpleITK/OpenMP thread pool and hang
    pool = ProcessPoolExecutor(min(config.workers, len(todo)), mp_context=get_context("spawn"),
                               initializer=_start_worker, initargs=(config.workers, logging.getLogger().level))
    try:
        futures = {pool.submit(_prepare_one, item, config, cache): item for item in todo}
        for future in as_completed(futures):
            if stop.is_set():
                pool.shutdown(wait=False, cancel_futures=True)
            if future.cancelled():
                continue
            try:
                outcome = future.result()
            except Exception as error:  # BrokenProcessPool or an unpicklable result
                reason = (f"worker error ({type(error).__name__}: {error}); a worker died (out of memory?) or "
                          "prepare_ct was called from a script without `if __name__ == '__main__':`; re-run to retry")
                outcome = _failed_row(futures[future], reason), error
            yield outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(workers: int, log_level: int) -> None:
    """In each worker: log like the parent, and share the cores out among the workers' SimpleITK threads."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [worker %(process)d]: %(message)s")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // workers))


def _failed_row(item: InputItem, reason: str) -> dict[str, str]:
    return {"id": item.id, "source": item.source, "status": "failed", "reason": " ".join(reason.split()),
            **dict(item.extra)}


def _prepare_one(
    item: InputItem, config: PrepareCTConfig, cache: Path
) -> tuple[dict[str, str], Exception | None]:
    """Read, preprocess and save one volume; a failure is returned with its manifest row, not raised."""
    geometry = {}
    try:
        volume = read_ct(item.path, config.series_uid if item.path.is_dir() else None, allow_gaps=config.allow_gaps)
        geometry = {"shape": "x".join(str(n) for n in volume.hu.shape),
                    "spacing_mm": "x".join(f"{s:.4g}" for s in volume.spacing)}
        mask = None if item.mask is None else read_mask(item.mask, volume)
        image, lung, info = preprocess_volume(volume, config, mask)
        save_volume(cache / f"{item.id}.npz", image, lung)
    except Exception as error:  # recorded in the manifest; the batch goes on unless on_error="raise"
        reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
        return {**_failed_row(item, reason), **geometry}, error
    ok = {"status": "ok", "reason": "", "file": f"{item.id}.npz", "lung_ml": f"{info['lung_ml']:.1f}"}
    return {**_failed_row(item, ""), **geometry, **ok}, None
