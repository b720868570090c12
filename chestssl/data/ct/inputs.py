"""The inputs of ``prepare-ct``: files and folders to scan, and the rows of a user's CSV, each with its id.

A folder is scanned as a whole tree: every NIfTI/NRRD/MHA file is an input, and the DICOM files, wherever they
sit (beside a DICOMDIR at the root of a CD or PACS export, or one folder per series), are grouped by their headers
into series, each series an input with its own manifest row. A DICOMDIR is an index, not an image: it is skipped.

An id names the volume's cache file: the CSV's ``id``, else a short hash of the resolved path (of the series'
folder, with the hash of its SeriesInstanceUID where that folder holds several series), never anything from a
DICOM header in clear.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chestssl.data.ct.dicom_series import scan_dicom_files
from chestssl.data.ct.files import IMAGE_SUFFIXES, NOT_DICOM_SUFFIXES, short_hash
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

PASSED_THROUGH = ("label", "patient_id", "split")  # user CSV columns copied into the manifest
USER_COLUMNS = ("path", "id", "mask") + PASSED_THROUGH
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                "pretrain": "pretrain", "": ""}  # a user's split value -> the one recorded
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # ids name files: no separators, not hidden


@dataclass(frozen=True)
class InputItem:
    """One volume to prepare: ``id`` names its cache file, ``source`` is the input as the user named it.

    ``series`` (the short hash of a SeriesInstanceUID) and ``files`` pick one DICOM series of the folder
    ``path``; both are empty for image files, user CSV rows and folders where no series was found.
    """

    id: str
    source: str
    path: Path
    mask: Path | None = None
    extra: tuple[tuple[str, str], ...] = ()  # (column, value) for PASSED_THROUGH columns of the user CSV
    series: str = ""
    files: tuple[Path, ...] = ()


def discover_inputs(config: PrepareCTConfig) -> list[InputItem]:
    """The inputs of ``config``, each with its id (the CSV's ``id``, else a short hash of the resolved path).

    An explicit path that is missing, a folder where nothing is found, or DICOM files whose headers cannot be
    read are kept as inputs so that their failure is recorded. With ``config.series_uid`` only that series of
    each DICOM tree is an input. Raises DataError for an unreadable CSV, an unsafe id or a duplicated id.
    """
    items = []
    for entry in config.inputs:
        items += list(_scan(Path(entry), config.series_uid))
    if config.manifest_csv is not None:
        items += read_user_csv(Path(config.manifest_csv))
    sources: dict[str, str] = {}
    for item in items:
        if item.id in sources:
            raise DataError(f"id {item.id} is given to two inputs, {sources[item.id]} and {item.source}")
        sources[item.id] = item.source
    return items


def _scan(entry: Path, series_uid: str | None) -> Iterator[InputItem]:
    """The inputs under ``entry``: itself if it is not a folder, else its image files and DICOM series."""
    if not entry.is_dir():
        yield InputItem(short_hash(str(entry.resolve())), str(entry), entry)  # read_ct says what is wrong
        return
    images, maybe_dicom = [], []
    for folder, subfolders, names in os.walk(entry):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.lower().endswith(NOT_DICOM_SUFFIXES):
                continue
            (images if name.lower().endswith(IMAGE_SUFFIXES) else maybe_dicom).append(Path(folder) / name)
    series, broken = scan_dicom_files(maybe_dicom)
    if series_uid is not None:
        series = [s for s in series if series_uid in (s.key, s.info.uid_hash)]
    # (folder, series hash, files): a series sits in the deepest folder holding all its files
    found = [[Path(os.path.commonpath([str(p.parent) for p in s.files])), s.info.uid_hash, s.files] for s in series]
    unreadable = defaultdict(list)
    for path, _ in broken:
        unreadable[path.parent].append(path)
    for parent, paths in unreadable.items():
        # a damaged file fails every series beside it, as reading their folder would, or is an input of its own
        owners = [group for group in found if any(p.parent == parent for p in group[2])]
        for group in owners:
            group[2] = tuple(sorted(group[2] + tuple(paths)))
        if not owners:
            found.append([parent, "", tuple(paths)])
    if not found and not images:
        found.append([entry, "", ()])  # nothing found (or not the series asked for): read_ct says so
    per_folder = defaultdict(int)
    for folder, _, _ in found:
        per_folder[folder] += 1
    items = [InputItem(short_hash(str(image.resolve())), str(image), image) for image in images]
    for folder, key, files in found:
        resolved = str(folder.resolve())
        item_id = short_hash(resolved) if per_folder[folder] == 1 else short_hash(f"{resolved}|series {key}")
        items.append(InputItem(item_id, str(folder), folder, series=key, files=files))
    logger.info("%s: %d DICOM series and %d image file(s) found", entry, len(series), len(images))
    yield from sorted(items, key=lambda item: (item.source, item.series))


def read_user_csv(path: Path) -> list[InputItem]:
    """The rows of a user's input CSV (see the module docstring); DataError naming the line of a bad row."""
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
        split = (row.get("split") or "").strip()
        if split.lower() not in SPLIT_VALUES:
            raise DataError(f"{path}, line {line}: split {split!r} is not one of train, val, test, pretrain "
                            "(or empty, to have prepare-ct assign one)")
        mask = (row.get("mask") or "").strip()
        extra = {column: (row.get(column) or "").strip() for column in PASSED_THROUGH}
        extra["split"] = SPLIT_VALUES[split.lower()]
        items.append(InputItem(item_id, source, resolved, path.parent / mask if mask else None,
                               tuple(extra.items())))
    return items
