"""What ``predict`` is asked to read: files, folders and CSV lists, each input with an id safe to name files by.

An X-ray model takes image files (PNG, JPEG, TIFF, BMP, DICOM): a folder is searched recursively for them. A CT
model takes what ``prepare-ct`` takes (NIfTI/NRRD/MHA files, DICOM series found anywhere in a folder tree, one
input per series). A CSV has a ``path`` column (relative to the CSV's folder), an optional ``id`` and, for a
nodule model, the ``mask`` of the nodule (the VOI and mask pairs of LIDC). An id is the CSV's ``id``, else a
short hash of the resolved path (and series): never a file name, which may hold a patient's name, and nothing
read from a DICOM header.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chestssl.data.ct.files import short_hash
from chestssl.data.ct.inputs import discover_inputs, read_user_csv
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.xray.io import is_dicom
from chestssl.errors import DataError

XRAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")


@dataclass(frozen=True)
class Input:
    """One input: ``id`` names its outputs; ``source`` is the path as the user gave it (a DICOM series: its
    folder); ``series``/``files`` pick one DICOM series; ``mask`` is a nodule mask (nodule models)."""

    id: str
    source: str
    path: Path
    series: str = ""
    files: tuple[Path, ...] = ()
    mask: Path | None = None


def _xray_files(folder: Path) -> list[Path]:
    found = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if not name.startswith(".") and (name.lower().endswith(XRAY_SUFFIXES) or is_dicom(path)):
                found.append(path)
    return found


def find_inputs(entries: list[str], modality: str) -> list[Input]:
    """Every input named by ``entries`` (files, folders, CSVs) for a model of ``modality`` ("xray" or "ct").

    A missing path stays an input, so its failure is recorded with the others. Raises DataError for an
    unreadable CSV, an unsafe id or an id given to two inputs.
    """
    inputs: list[Input] = []
    for entry in entries:
        path = Path(entry)
        if path.suffix.lower() == ".csv" and path.is_file():
            inputs += [Input(i.id, i.source, i.path, mask=i.mask) for i in read_user_csv(path)]
        elif modality == "xray" and path.is_dir():
            inputs += [Input(short_hash(str(f.resolve())), str(f), f) for f in _xray_files(path)]
        elif modality == "ct" and path.is_dir():
            inputs += [Input(i.id, i.source, i.path, i.series, i.files)
                       for i in discover_inputs(PrepareCTConfig(inputs=(str(path),)))]
        else:
            inputs.append(Input(short_hash(str(path.resolve())), str(path), path))
    seen: dict[str, str] = {}
    for item in inputs:
        if item.id in seen and seen[item.id] != item.source:
            raise DataError(f"id {item.id} is given to two inputs, {seen[item.id]} and {item.source}")
        seen[item.id] = item.source
    unique = {item.id: item for item in inputs}  # the same input named twice is predicted once
    return list(unique.values())
