"""Find, choose and stack the slices of one DICOM series in a folder tree (what ``read_ct`` does for a folder).

Headers are read first and grouped by SeriesInstanceUID; one series is chosen by rule (or as asked), then its
slices are read, ordered by ImagePositionPatient projected on the slice normal, checked for a consistent geometry
and stacked, with RescaleSlope/RescaleIntercept applied. The image this returns is not yet in the canonical
orientation: :func:`chestssl.data.ct.io.read_ct` reorients it. Nothing that identifies the patient is logged or
kept: series are named by a short hash of their SeriesInstanceUID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from chestssl.data.ct.files import DICOM_SUFFIXES, IMAGE_SUFFIXES, NOT_DICOM_SUFFIXES, short_hash
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

GAP_FACTOR = 1.5  # a step between slices above 1.5x the median step means a missing slice
SPACING_TOLERANCE = 0.05  # steps may differ from the median by 5% (rounded positions)


@dataclass(frozen=True)
class SeriesInfo:
    """What :func:`list_series` tells about one DICOM series, with no patient identifier.

    Attributes:
        uid_hash: short hash of the SeriesInstanceUID; pass it as ``read_ct(..., series_uid=)``.
        modality: DICOM Modality ("CT", "MR", ...), "unknown" when absent.
        n_slices: number of image files in the series.
        description: SeriesDescription ("" when absent).
        orientation: "axial", "coronal", "sagittal", "oblique" or "unknown", from the slice normal.
        localizer: ImageType says LOCALIZER, or the series has only 1-2 slices.
    """

    uid_hash: str
    modality: str
    n_slices: int
    description: str
    orientation: str
    localizer: bool


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series under ``folder`` (recursively), most slices first; unreadable files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return [series.info for series in _scan_series(folder, on_error="skip")]


@dataclass(frozen=True)
class _Series:
    info: SeriesInfo
    key: str  # the SeriesInstanceUID, or a stand-in where a header has none
    files: list[Path]


def _fail(path: Path, problem: str, on_error: str) -> None:
    """Raise a DataError naming ``path``, or log and skip the file when ``on_error == "skip"``."""
    if on_error == "raise":
        raise DataError(f"{path}: {problem}")
    logger.warning("skipping %s: %s", path, problem)


def _read_header(path: Path, on_error: str) -> Dataset | None:
    """The DICOM header of an image file, None for a file that is not DICOM (or skipped)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _fail(path, "not a valid DICOM file (no DICM preamble)", on_error)
        logger.debug("%s: not DICOM, ignored", path)
        return None
    except Exception as error:  # pydicom raises many types on a damaged header
        return _fail(path, f"unreadable DICOM header ({type(error).__name__}: {error})", on_error)
    sop_class = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID")
    is_image = sop_class is not None and "Image Storage" in getattr(sop_class, "name", "")
    if is_image and ("Rows" not in header or "Columns" not in header):
        return _fail(path, "truncated or incomplete DICOM header (no Rows/Columns)", on_error)
    return header if is_image or "Rows" in header else None


def _series_key(header: Dataset, path: Path) -> str:
    uid = str(header.get("SeriesInstanceUID", "")).strip()
    if uid:
        return uid
    # No SeriesInstanceUID (some anonymisers drop it): group by what else a series shares.
    fields = ("FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality", "Rows", "Columns")
    return "no-uid:" + str(path.parent.resolve()) + "|" + "|".join(str(header.get(f, "")) for f in fields)


def _orientation(header: Dataset) -> str:
    try:
        cosines = np.asarray(header.ImageOrientationPatient, dtype=float)
    except (AttributeError, ValueError, TypeError):
        return "unknown"
    normal = np.abs(np.cross(cosines[:3], cosines[3:]))
    if normal.max() < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _scan_series(folder: Path, on_error: str) -> list[_Series]:
    """Every series under ``folder``, most slices first."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name.lower().endswith(IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES):
            continue
        header = _read_header(path, on_error)
        if header is not None:
            groups.setdefault(_series_key(header, path), []).append((path, header))
    series = []
    for key, members in groups.items():
        first = members[0][1]
        modality = str(first.get("Modality", "")).strip().upper()
        if not modality:  # a stripped header: the storage class still says what it is
            sop_class = getattr(first.get("SOPClassUID"), "name", "")
            modality = "CT" if sop_class.startswith("CT ") else "unknown"
        localizer = len(members) <= 2 or any(
            "LOCALIZER" in [str(v).upper() for v in h.get("ImageType", [])] for _, h in members
        )
        description = str(first.get("SeriesDescription", ""))
        info = SeriesInfo(short_hash(key), modality, len(members), description, _orientation(first), localizer)
        series.append(_Series(info, key, [p for p, _ in members]))
    return sorted(series, key=lambda s: (-s.info.n_slices, s.info.uid_hash))


def _choose_series(folder: Path, series: list[_Series], series_uid: str | None) -> _Series:
    """The series asked for, or by rule the axial, non-localizer CT series with the most slices."""
    if not series:
        raise DataError(f"{folder}: no DICOM image files found")
    found = "; ".join(f"{i.uid_hash} {i.modality} {i.orientation} {i.n_slices} slices '{i.description}'"
                      for i in (s.info for s in series))
    if series_uid is not None:
        matches = [s for s in series if series_uid in (s.key, s.info.uid_hash)]
        if not matches:
            raise DataError(f"{folder}: no series {series_uid!r}; found: {found}")
        chosen, why = matches[0], "as requested"
    else:
        candidates = [s for s in series
                      if s.info.modality == "CT" and not s.info.localizer and s.info.orientation == "axial"]
        if not any(s.info.modality == "CT" for s in series):
            raise DataError(f"{folder}: no CT series, chestssl reads CT only; found: {found}")
        if not candidates:
            raise DataError(f"{folder}: no axial CT volume (only localizers or other planes); found: {found}; "
                            "pass series_uid= to read one of them")
        chosen = candidates[0]
        why = f"the most slices of {len(candidates)} axial CT series (localizers excluded; {len(series)} in all)"
    info = chosen.info
    if info.modality != "CT":
        raise DataError(f"{folder}: series {info.uid_hash} is {info.modality}, not CT; chestssl reads CT only")
    logger.info("%s: reading series %s (%s, %d slices, '%s'): %s", folder, info.uid_hash, info.modality,
                info.n_slices, info.description, why)
    if len(series) > 1:
        logger.info("%s: all series: %s", folder, found)
    return chosen


def read_dicom_folder(folder: Path, series_uid: str | None, allow_gaps: bool,
                      on_error: str) -> tuple[sitk.Image, str]:
    """Choose a series under ``folder``, read and check its slices, return (image, source_id)."""
    chosen = _choose_series(folder, _scan_series(folder, on_error), series_uid)
    where = f"{folder} (series {chosen.info.uid_hash})"
    slices = []  # (path, orientation cosines, pixel spacing, position, pixels in HU)
    for path in chosen.files:
        try:
            dataset = pydicom.dcmread(path)
            if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
                raise DataError(f"{path}: a multi-frame DICOM image; only one slice per file is supported")
            stored = dataset.pixel_array
            cosines = np.asarray(dataset.ImageOrientationPatient, dtype=float)
            pixel_spacing = np.asarray(dataset.PixelSpacing, dtype=float)
            position = np.asarray(dataset.ImagePositionPatient, dtype=float)
        except DataError:
            raise
        except Exception as error:  # truncated pixel data, missing geometry, undecodable codec
            _fail(path, f"unreadable slice ({type(error).__name__}: {error})", on_error)
            continue
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        slices.append((path, cosines, pixel_spacing, position, stored.astype(np.float32) * slope + intercept))
    if len(slices) < 2:
        raise DataError(f"{where}: {len(slices)} readable slice(s); a volume needs at least 2")
    path0, cosines, pixel_spacing, _, pixels0 = slices[0]
    for path, other_cosines, other_spacing, _, pixels in slices[1:]:
        if pixels.shape != pixels0.shape:
            raise DataError(f"{where}: slice sizes differ: {path0} is {pixels0.shape}, {path} is {pixels.shape}")
        if not np.allclose(other_cosines, cosines, atol=1e-3):
            raise DataError(f"{where}: slice orientations differ: {path0} {cosines.tolist()}, "
                            f"{path} {other_cosines.tolist()}")
        if not np.allclose(other_spacing, pixel_spacing, rtol=1e-3):
            raise DataError(f"{where}: inconsistent pixel spacing: {path0} {pixel_spacing.tolist()}, "
                            f"{path} {other_spacing.tolist()}")
    normal = np.cross(cosines[:3], cosines[3:])
    depth = np.array([s[3] @ normal for s in slices])  # slice positions along the normal, mm
    shift = np.ptp([[s[3] @ cosines[:3], s[3] @ cosines[3:]] for s in slices], axis=0)
    if np.any(shift > pixel_spacing[::-1] / 2):
        logger.warning("%s: slices shifted in-plane by up to %s mm (gantry tilt?); the shift is ignored",
                       where, shift.round(2))
    order = np.argsort(depth, kind="stable")
    slices, depth = [slices[i] for i in order], depth[order]
    volume, step = _regular_stack(where, [s[0] for s in slices], depth, [s[4] for s in slices], allow_gaps)
    image = sitk.GetImageFromArray(volume)  # (z, y, x): z along the normal, y down a column, x along a row
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), float(step)))
    image.SetOrigin(tuple(float(v) for v in slices[0][3]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([cosines[:3], cosines[3:], normal]).ravel()))
    return image, chosen.info.uid_hash


def _regular_stack(where: str, paths: list[Path], depth: np.ndarray, pixels: list[np.ndarray],
                   allow_gaps: bool) -> tuple[np.ndarray, float]:
    """Stack sorted slices (z, y, x) after checking their steps; interpolate when gaps are allowed."""
    steps = np.diff(depth)
    duplicate = np.flatnonzero(steps < 1e-3)
    if len(duplicate):
        i = duplicate[0]
        raise DataError(f"{where}: duplicated slice position {depth[i]:.2f} mm ({paths[i]} and {paths[i + 1]}); "
                        f"{len(duplicate)} duplicate(s) in all")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * step)
    uneven = np.flatnonzero((np.abs(steps - step) > SPACING_TOLERANCE * step) & (steps <= GAP_FACTOR * step))
    if (len(gaps) or len(uneven)) and not allow_gaps:
        if len(gaps):
            listed = ", ".join(f"{depth[i]:.2f} to {depth[i + 1]:.2f} mm" for i in gaps[:5])
            raise DataError(f"{where}: missing slice(s) (slice spacing {step:.2f} mm) between {listed}; "
                            "pass allow_gaps=True to interpolate")
        listed = ", ".join(f"{steps[i]:.2f} mm at {depth[i]:.2f} mm" for i in uneven[:5])
        raise DataError(f"{where}: inconsistent slice spacing (median {step:.2f} mm): {listed}; "
                        "pass allow_gaps=True to interpolate")
    stack = np.stack(pixels)
    if len(gaps) or len(uneven):
        logger.warning("%s: %d gap(s) and %d uneven step(s); interpolating onto a %.2f mm grid",
                       where, len(gaps), len(uneven), step)
        grid = depth[0] + step * np.arange(round((depth[-1] - depth[0]) / step) + 1)
        upper = np.clip(np.searchsorted(depth, grid), 1, len(depth) - 1)
        weight = ((grid - depth[upper - 1]) / (depth[upper] - depth[upper - 1])).astype(np.float32)[:, None, None]
        stack = (1 - weight) * stack[upper - 1] + weight * stack[upper]
    if np.issubdtype(stack.dtype, np.integer) or np.array_equal(stack, np.round(stack)):
        if stack.min() >= np.iinfo(np.int16).min and stack.max() <= np.iinfo(np.int16).max:
            return stack.astype(np.int16), step
    return stack.astype(np.float32), step
