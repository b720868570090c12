"""The inputs of ``prepare-ct``: files and folders to scan, and the rows of a user's CSV, each with its id.

An id names the volume's cache file: the CSV's ``id``, else a short hash of the resolved path, never anything
from a DICOM header.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chestssl.data.ct.files import DICOM_SUFFIXES, IMAGE_SUFFIXES, NOT_DICOM_SUFFIXES, has_dicom_preamble, short_hash
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

PASSED_THROUGH = ("label", "patient_id", "split")  # user CSV columns copied into the manifest
USER_COLUMNS = ("path", "id", "mask") + PASSED_THROUGH
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # ids name files: no separators, not hidden


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
        if child.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(child):
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
