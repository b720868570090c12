"""Loaders of the 2D chest X-ray datasets (Kermany, NIH ChestX-ray14, a user folder, user DICOMs).

Shapes: ``N`` images, ``S`` the side of the square images, ``K`` classes. Every loader returns images
(N, 1, S, S) uint8. Folder-based loaders (kermany, nih-cxr14, folder, dicom) decode with
:func:`~chestssl.data.xray.io.read_xrays` and cache the decoded, resized arrays under
:func:`~chestssl.data.paths.cache_dir` (``$CHESTSSL_CACHE``, else ``$XDG_CACHE_HOME/chestssl/cache`` or
``~/.cache/chestssl/cache``; ``CHESTSSL_CACHE=off`` decodes every time and writes nothing), keyed by the dataset
name, the size, the labels CSV's bytes, the root folder and each file's size and mtime.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pydicom

from chestssl.data.xray.io import is_dicom, read_xrays
from chestssl.data.paths import cache_dir
from chestssl.data.types import ImageDataset
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "": ""}
DEFAULT_PATIENT_SALT = "chestssl-patient-id-v1"

def _read_csv(csv_path: Path, required: list[str]) -> tuple[list[dict[str, str]], bytes]:
    """Rows of a labels CSV (as str dicts) and its raw bytes; DataError when absent, empty or incomplete."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: labels CSV does not exist")
    raw = csv_path.read_bytes()
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
        rows = [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: not a readable UTF-8 CSV ({err})") from err
    if not rows:
        raise DataError(f"{csv_path}: labels CSV is empty (a header and at least one row are needed)")
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{csv_path}: missing required column(s) {missing}; it has {reader.fieldnames}")
    return rows, raw


def _class_labels(
    csv_path: Path, values: list[str], class_names: tuple[str, ...] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices (N,) from names or integers; "" or "-1" mean unlabelled (-1)."""
    given = [value for value in values if value not in ("", "-1")]
    if class_names is None:
        if all(value.lstrip("-").isdigit() for value in given):
            class_names = tuple(str(index) for index in range(max((int(v) for v in given), default=-1) + 1))
        else:
            class_names = tuple(sorted(set(given)))
    lookup = {str(index): index for index in range(len(class_names))}
    lookup.update({name: index for index, name in enumerate(class_names)})  # a name wins over an index
    unknown = [(row + 2, value) for row, value in enumerate(values) if value not in ("", "-1") and value not in lookup]
    if unknown:
        shown = ", ".join(f"line {line}: {value!r}" for line, value in unknown[:5])
        raise DataError(f"{csv_path}: {len(unknown)} label(s) not in class_names {list(class_names)} ({shown})")
    labels = np.array([lookup.get(value, -1) for value in values], dtype=np.int64)
    return labels, tuple(class_names)


def _multilabel(csv_path: Path, rows: list[dict[str, str]], columns: list[str]) -> np.ndarray:
    """Multi-hot labels (N, K) from 0/1 columns; "" or "-1" mean unknown (-1)."""
    codes = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "": -1, "-1": -1}
    bad = [
        (line, column, row[column]) for line, row in enumerate(rows, 2) for column in columns
        if row[column] not in codes
    ]
    if bad:
        shown = ", ".join(f"line {line} {column}={value!r}" for line, column, value in bad[:5])
        raise DataError(f"{csv_path}: {len(bad)} label value(s) that are not 0/1 ({shown})")
    return np.array([[codes[row[column]] for column in columns] for row in rows], dtype=np.int64)


def _splits(csv_path: Path, rows: list[dict[str, str]]) -> np.ndarray:
    values = [row.get("split", "").lower() for row in rows]
    unknown = sorted({value for value in values if value not in SPLIT_ALIASES})
    if unknown:
        raise DataError(f"{csv_path}: unknown split value(s) {unknown}; use train, val, test or leave empty")
    return np.array([SPLIT_ALIASES[value] for value in values], dtype=str)


def _evenly_spaced(count: int, limit: int | None) -> np.ndarray:
    """Row indices: all, or ``limit`` rows spread evenly over the table (deterministic)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max(int(limit), 1)).round().astype(np.int64))


def _hashed_patient_ids(paths: list[Path], salt: str) -> np.ndarray:
    """First 16 hex digits of SHA-256(salt + PatientID) from each DICOM header; the raw ID never leaves here."""
    hashed = []
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
        patient = str(header.get("PatientID", "") or "")
        if not patient:
            logger.warning("%s: no PatientID in the header; it is treated as its own patient", path)
            patient = f"missing:{path}"
        hashed.append(hashlib.sha256(f"{salt}\0{patient}".encode()).hexdigest()[:16])
    return np.array(hashed, dtype=str)


def _decode_table(
    name: str, root: Path, fingerprint: bytes, relative_paths: list[str], image_size: int, on_error: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check that the files exist, then decode them through the cache: images (N_kept, 1, S, S), kept (N_kept,)."""
    paths = [root / relative for relative in relative_paths]
    digest = hashlib.sha256(f"{name}\0{image_size}\0{root.resolve()}\0".encode() + fingerprint)
    present, missing = [], []
    for index, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError:
            missing.append(index)
            continue
        present.append(index)
        digest.update(f"\0{relative_paths[index]}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    if missing:
        shown = ", ".join(str(paths[index]) for index in missing[:5])
        message = f"{name}: {len(missing)} of {len(paths)} listed file(s) do not exist under {root}: {shown}"
        if on_error == "raise" or not present:
            raise DataError(message + (" ..." if len(missing) > 5 else ""))
        logger.warning("%s; skipping them", message)
    folder = cache_dir()  # None: caching is off
    cache_file = None if folder is None else folder / f"{name}-{image_size}px-{digest.hexdigest()[:24]}.npz"
    images, kept = read_xrays([paths[index] for index in present], image_size, on_error, cache_file)
    return images[:, None], np.asarray(present, dtype=np.int64)[kept]


def _load_table(
    name: str, root: Path, csv_path: Path, image_size: int, on_error: str, *, label_column: str | None = "label",
    label_columns: list[str] | None = None, class_names: tuple[str, ...] | None = None,
    patient_column: str = "patient_id", limit: int | None = None,
) -> tuple[ImageDataset, list[Path]]:
    """Load a labels CSV (path relative to ``root``, label(s), optional split/patient column) with its images."""
    required = ["path"] + (list(label_columns) if label_columns else [label_column] if label_column else [])
    rows, raw = _read_csv(csv_path, required)
    rows = [rows[index] for index in _evenly_spaced(len(rows), limit)]
    if label_columns:
        labels, task = _multilabel(csv_path, rows, list(label_columns)), "multilabel"
        class_names = tuple(class_names or label_columns)
    else:
        labels, class_names = _class_labels(csv_path, [row.get(label_column or "", "") for row in rows], class_names)
        task = "binary" if len(class_names) == 2 else "multiclass"
    split = _splits(csv_path, rows)  # every CSV problem is reported before any image is decoded
    has_patients = patient_column in rows[0]
    patients = np.array([row[patient_column] for row in rows], dtype=str) if has_patients else None
    images, kept = _decode_table(name, root, raw, [row["path"] for row in rows], image_size, on_error)
    dataset = ImageDataset(
        images=images, labels=labels[kept], task=task, class_names=class_names, split=split[kept],
        patient_ids=None if patients is None else patients[kept], name=name,
    )
    return dataset, [root / rows[index]["path"] for index in kept]


def _load_kermany(data_dir: Path, image_size: int | None, on_error: str, *, limit: int | None = None) -> ImageDataset:
    """Kermany pediatric pneumonia X-rays (``kermany-224/``): official train/test split, no val; patient_key ids.

    The Kermany test split is the PneumoniaMNIST test set: never pretrain on it. 170 patient keys (from the file
    names) appear in both official splits (457 training images): they are taken to be the same children, and
    their training images are dropped, so no child is in training (or pretraining) and test.
    """
    root = data_dir / "kermany-224"
    dataset, _ = _load_table(
        "kermany", root, root / "labels.csv", image_size or 224, on_error,
        class_names=("normal", "pneumonia"), patient_column="patient_key", limit=limit,
    )
    keep = kermany_disjoint(dataset.split, dataset.patient_ids)
    if not keep.all():
        logger.info("kermany: %d training images of %d patients who are also in the test split dropped",
                    int((~keep).sum()), len(set(dataset.patient_ids[~keep])))
    return dataset.subset(np.flatnonzero(keep))


def kermany_disjoint(split: np.ndarray, patient_ids: np.ndarray) -> np.ndarray:
    """bool (N,): False for the non-test images of patients who also have a test image."""
    tested = set(patient_ids[split == "test"])
    return (split == "test") | ~np.isin(patient_ids, list(tested))


def _load_nih(data_dir: Path, image_size: int | None, on_error: str, *, limit: int | None = None) -> ImageDataset:
    """NIH ChestX-ray14 subset (``nih-cxr14-64/``): 14 findings, multi-hot (N, 14); "No Finding" is all zeros.

    The uploader's train/valid/test folders are not patient-level (some patients span them), so ``split`` is ""
    for every image: make a patient-level split from ``patient_ids`` instead.
    """
    root = data_dir / "nih-cxr14-64"
    csv_path = root / "labels.csv"
    rows, raw = _read_csv(csv_path, ["path", "finding_labels", "patient_id"])
    rows = [rows[index] for index in _evenly_spaced(len(rows), limit)]
    labels = np.zeros((len(rows), len(NIH_FINDINGS)), dtype=np.int64)
    for line, row in enumerate(rows):
        findings = [finding for finding in row["finding_labels"].split("|") if finding and finding != "No Finding"]
        unknown = [finding for finding in findings if finding not in NIH_FINDINGS]
        if unknown:
            raise DataError(f"{csv_path}: unknown finding(s) {unknown} for {row['path']}")
        labels[line, [NIH_FINDINGS.index(finding) for finding in findings]] = 1
    images, kept = _decode_table("nih-cxr14", root, raw, [row["path"] for row in rows], image_size or 64, on_error)
    patients = np.array([row["patient_id"] for row in rows], dtype=str)
    return ImageDataset(
        images=images, labels=labels[kept], task="multilabel", class_names=NIH_FINDINGS,
        split=np.full(len(kept), "", dtype=str), patient_ids=patients[kept], name="nih-cxr14",
    )


def _user_root(root: str | os.PathLike | None, name: str) -> Path:
    if root is None:
        raise DataError(f"{name}: option root=FOLDER is required (the folder the CSV paths are relative to)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: root folder {root} does not exist")
    return root


def _load_folder(
    data_dir: Path, image_size: int | None, on_error: str, *, root: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None, label_columns: list[str] | None = None,
    class_names: list[str] | None = None, limit: int | None = None,
) -> ImageDataset:
    """User images listed in a CSV: ``path`` (relative to ``root``) and ``label`` (name or integer), or 0/1
    ``label_columns`` for multilabel; optional ``patient_id`` and ``split``. Class names default to the sorted
    unique label names (or 0..max for integer labels). ``image_size`` defaults to 224."""
    folder = _user_root(root, "folder")
    csv_path = Path(labels_csv).expanduser() if labels_csv else folder / "labels.csv"
    dataset, _ = _load_table(
        "folder", folder, csv_path, image_size or 224, on_error, label_columns=label_columns,
        class_names=tuple(class_names) if class_names else None, limit=limit,
    )
    return dataset


def _load_dicom(
    data_dir: Path, image_size: int | None, on_error: str, *, root: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None, label_columns: list[str] | None = None,
    class_names: list[str] | None = None, limit: int | None = None, patient_id_from_header: bool = False,
    patient_id_salt: str = DEFAULT_PATIENT_SALT,
) -> ImageDataset:
    """Chest X-ray DICOMs: the ``folder`` CSV contract, or with no CSV every DICOM under ``root`` (labels -1).

    Patient ids come from the CSV's ``patient_id`` column; with ``patient_id_from_header=True`` they are the
    first 16 hex digits of SHA-256(``patient_id_salt`` + header PatientID) instead, never the raw ID. The
    default salt is public (reproducible across machines); set a secret one before sharing derived files.
    """
    folder = _user_root(root, "dicom")
    csv_path = Path(labels_csv).expanduser() if labels_csv else folder / "labels.csv"
    if labels_csv or csv_path.is_file():
        dataset, paths = _load_table(
            "dicom", folder, csv_path, image_size or 224, on_error, label_columns=label_columns,
            class_names=tuple(class_names) if class_names else None, limit=limit,
        )
    else:
        found = sorted(path for path in folder.rglob("*") if path.is_file() and is_dicom(path))
        found = [found[index] for index in _evenly_spaced(len(found), limit)]
        if not found:
            raise DataError(f"dicom: no labels.csv and no DICOM files under {folder}")
        relative = [str(path.relative_to(folder)) for path in found]
        listing = "\n".join(relative).encode()  # stands in for the CSV bytes in the cache key
        images, kept = _decode_table("dicom", folder, listing, relative, image_size or 224, on_error)
        paths = [found[index] for index in kept]
        dataset = ImageDataset(
            images=images, labels=np.full(len(kept), -1, dtype=np.int64), task="binary",
            class_names=tuple(class_names or ()), split=np.full(len(kept), "", dtype=str), patient_ids=None,
            name="dicom",
        )
    if not patient_id_from_header:
        return dataset
    return ImageDataset(
        images=dataset.images, labels=dataset.labels, task=dataset.task, class_names=dataset.class_names,
        split=dataset.split, patient_ids=_hashed_patient_ids(paths, patient_id_salt), name=dataset.name,
    )
