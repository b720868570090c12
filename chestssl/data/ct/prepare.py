"""Preprocess chest CTs at scale into the volume cache (what ``chestssl prepare-ct`` runs).

:func:`prepare_ct` finds the inputs (:mod:`chestssl.data.ct.inputs`), gives each an id (never anything from a
DICOM header), runs :func:`~chestssl.data.ct.preprocess.preprocess_volume` on the volumes not already done in
worker processes and records every outcome in the cache manifest of :mod:`chestssl.data.ct.cache` after each
one, so an interrupted run loses nothing and a re-run only retries what failed. ``preprocessing.json`` in the
cache records how the volumes were made. At the end every prepared volume has a patient-level ``split``
(:mod:`chestssl.data.ct.manifest_splits`; the user's own split wins). The run holds the cache's write lock
(:func:`~chestssl.data.ct.cache.cache_lock`): a second ``prepare-ct`` on the same folder is refused, not mixed in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from multiprocessing import get_context
from pathlib import Path
from threading import Event

import SimpleITK as sitk
from tqdm import tqdm

from chestssl.config import save_config
from chestssl.data.ct.inputs import InputItem, discover_inputs
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume, preprocessing_record, read_mask
from chestssl.data.ct.cache import (PREPROCESSING, atomic_write_text, cache_lock, read_manifest, save_volume,
                                    write_manifest)
from chestssl.data.ct.manifest_splits import assign_splits
from chestssl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CONFIG_FILE = "prepare_config.yaml"


def prepare_ct(config: PrepareCTConfig) -> Path:
    """Preprocess every input not yet in the cache and record each outcome in the manifest.

    With ``workers > 1`` the volumes go to spawned worker processes: call this from a script only
    under ``if __name__ == "__main__":``.

    Returns:
        The path of ``<cache_dir>/manifest.csv``.

    Raises:
        ConfigError: nothing to prepare, or a cache holding volumes made with other preprocessing.
        CacheBusyError: another process is writing to ``cache_dir``.
        DataError: an unreadable user CSV or a duplicated id; with ``on_error="raise"``, the first
            volume that fails (after its failure is recorded).
    """
    if not config.inputs and config.manifest_csv is None:
        raise ConfigError("prepare-ct: nothing to prepare; set inputs and/or manifest_csv")
    cache = Path(config.cache_dir)
    with cache_lock(cache):
        return _prepare_locked(config, cache)


def _prepare_locked(config: PrepareCTConfig, cache: Path) -> Path:
    """:func:`prepare_ct` once the cache's write lock is held."""
    items = discover_inputs(config)
    rows = {row["id"]: row for row in read_manifest(cache)}
    done = {key for key, row in rows.items() if row["status"] == "ok" and (cache / row["file"]).is_file()}
    for item in items:  # the user's CSV wins over what an earlier run recorded (a corrected label or split)
        if item.id in done:
            rows[item.id].update({column: value for column, value in item.extra if value})
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
            if not row.get("split") and rows.get(row["id"], {}).get("split"):
                row["split"] = rows[row["id"]]["split"]  # a volume prepared again keeps its split
            rows[row["id"]] = row
            manifest = write_manifest(cache, list(rows.values()))  # after every volume: nothing lost on a stop
            counts[row["status"]] += 1
            bar.update()
            if error is not None:
                logger.warning("%s failed: %s", row["id"], row["reason"])
                if config.on_error == "raise" and first_error is None:
                    first_error = error
                    stop.set()  # volumes already in a worker still finish and are recorded
    assigned = assign_splits(list(rows.values()), config.split_seed)
    if assigned:
        manifest = write_manifest(cache, list(rows.values()))
        logger.info("prepare-ct: %d prepared volume(s) given a patient-level split (split_seed %d)", assigned,
                    config.split_seed)
    if first_error is not None:
        raise first_error
    logger.info("prepare-ct: %d prepared, %d failed, %d done before; the cache holds %d volume(s): %s",
                counts["ok"], counts["failed"], len(items) - len(todo),
                sum(row["status"] == "ok" for row in rows.values()), manifest)
    return manifest


def _record_preprocessing(config: PrepareCTConfig, cache: Path, has_volumes: bool) -> None:
    """Write ``preprocessing.json``; refuse a cache whose volumes were made another way."""
    record = json.loads(json.dumps(preprocessing_record(config)))
    path = cache / PREPROCESSING
    if has_volumes and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path} is unreadable ({error}); use a new cache_dir") from error
        changed = [f"{key} {previous.get(key)} -> {new}" for key, new in record.items() if previous.get(key) != new]
        if changed:
            raise ConfigError(f"{cache} holds volumes made with other preprocessing ({'; '.join(changed)}); "
                              "use another cache_dir or delete this one")
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


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
    return {"id": item.id, "source": item.source, "series": item.series, "status": "failed",
            "reason": " ".join(reason.split()), **dict(item.extra)}


def _prepare_one(
    item: InputItem, config: PrepareCTConfig, cache: Path
) -> tuple[dict[str, str], Exception | None]:
    """Read, preprocess and save one volume; a failure is returned with its manifest row, not raised."""
    geometry = {}
    try:
        series = item.series or (config.series_uid if item.path.is_dir() else None)
        volume = read_ct(item.path, series, allow_gaps=config.allow_gaps, files=item.files or None)
        geometry = {"shape": "x".join(str(n) for n in volume.hu.shape),
                    "spacing_mm": "x".join(f"{s:.4g}" for s in volume.spacing)}
        mask = None if item.mask is None else read_mask(item.mask, volume)
        image, lung, info = preprocess_volume(volume, config, mask)
        save_volume(cache / f"{item.id}.npz", image, lung, config.compress)
    except Exception as error:  # recorded in the manifest; the batch goes on unless on_error="raise"
        reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
        return {**_failed_row(item, reason), **geometry}, error
    ok = {"status": "ok", "reason": "", "file": f"{item.id}.npz", "lung_ml": f"{info['lung_ml']:.1f}"}
    return {**_failed_row(item, ""), **geometry, **ok}, None
