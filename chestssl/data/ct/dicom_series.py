"""Find, choose and stack the slices of one DICOM series in a folder tree (what ``read_ct`` does for a folder).

Headers are read first and grouped by SeriesInstanceUID; one series is chosen by rule (or as asked), then its
slices are read, ordered by ImagePositionPatient projected on the slice normal, checked for a consistent geometry
and stacked, with RescaleSlope/RescaleIntercept applied. The image this returns is not yet in the canonical
orientation: :func:`chestssl.data.ct.io.read_ct` reorients it. :func:`scan_dicom_files` groups any set of files into
series (what ``prepare-ct`` uses to make every series of a tree its own input).

Nothing that identifies the patient is logged or kept: a series is described by a short hash of its
SeriesInstanceUID, its modality, slice count and geometry only, never by a free-text header (SeriesDescription,
StudyDescription, ProtocolName, PatientName, PatientID, InstitutionName, ...). A DICOMDIR (the index of a CD or
PACS export) is not an image and is skipped; the images it lists are found by scanning the tree.
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
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR


@dataclass(frozen=True)
class SeriesInfo:
    """What :func:`list_series` tells about one DICOM series, with no patient identifier.

    Attributes:
        uid_hash: short hash of the SeriesInstanceUID; pass it as ``read_ct(..., series_uid=)``.
        modality: DICOM Modality ("CT", "MR", ...), "unknown" when absent.
        n_slices: number of image files in the series.
        orientation: "axial", "coronal", "sagittal", "oblique" or "unknown", from the slice normal.
        localizer: ImageType says LOCALIZER, or the series has only 1-2 slices.
        matrix: (Rows, Columns) of its first slice.
    """

    uid_hash: str
    modality: str
    n_slices: int
    orientation: str
    localizer: bool
    matrix: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        """``"<uid_hash> CT axial 64 slices of 512x512"``: what logs and error messages say about a series."""
        kind = " localizer" if self.localizer else ""
        return (f"{self.uid_hash} {self.modality} {self.orientation}{kind} {self.n_slices} slice(s) of "
                f"{self.matrix[0]}x{self.matrix[1]}")


@dataclass(frozen=True)
class DicomSeries:
    """One series found by :func:`scan_dicom_files`: its description and its files (sorted by path)."""

    info: SeriesInfo
    key: str  # the SeriesInstanceUID, or a hashed stand-in where a header has none
    files: tuple[Path, ...]


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series under ``folder`` (recursively), most slices first; unreadable files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    series, broken = scan_dicom_files(_candidate_files(folder))
    for path, problem in broken:
        logger.warning("skipping %s: %s", path, problem)
    return [s.info for s in series]


def scan_dicom_files(files: list[Path]) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Group ``files`` into DICOM image series by their headers.

    Files that are not DICOM (no DICM preamble and no DICOM suffix) and DICOM files that are not images
    (a DICOMDIR, a structured report) are left out silently.

    Returns:
        The series, most slices first, and ``(path, problem)`` for each file that should be DICOM but whose
        header cannot be read (damaged, truncated, a non-DICOM file named ``.dcm``).
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    broken = []
    for path in sorted(files):
        try:
            header = _read_header(path)
        except DataError as error:
            broken.append((path, str(error)))
            continue
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
        matrix = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
        info = SeriesInfo(short_hash(key), modality, len(members), _orientation(first), localizer, matrix)
        series.append(DicomSeries(info, key, tuple(p for p, _ in members)))
    return sorted(series, key=lambda s: (-s.info.n_slices, s.info.uid_hash)), broken


def _fail(path: Path, problem: str, on_error: str) -> None:
    """Raise a DataError naming ``path``, or log and skip the file when ``on_error == "skip"``."""
    if on_error == "raise":
        raise DataError(f"{path}: {problem}")
    logger.warning("skipping %s: %s", path, problem)


def _candidate_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that may be DICOM: not hidden, not an image file or annotation of another format."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
            and not p.name.lower().endswith(IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES)]


def _read_header(path: Path) -> Dataset | None:
    """The DICOM header of an image file; None for a file that is not DICOM or not an image.

    Raises:
        DataError: a file named like DICOM that is not, or a damaged or truncated header (message without the path).
    """
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise DataError("not a valid DICOM file (no DICM preamble)") from None
        logger.debug("%s: not DICOM, ignored", path)
        return None
    except Exception as error:  # pydicom raises many types on a damaged header
        raise DataError(f"unreadable DICOM header ({type(error).__name__}: {error})") from error
    sop_class = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID")
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        logger.debug("%s: a DICOMDIR (an index of the files), skipped", path)
        return None
    is_image = sop_class is not None and "Image Storage" in getattr(sop_class, "name", "")
    if is_image and ("Rows" not in header or "Columns" not in header):
        raise DataError("truncated or incomplete DICOM header (no Rows/Columns)")
    return header if is_image or "Rows" in header else None


def _series_key(header: Dataset, path: Path) -> str:
    uid = str(header.get("SeriesInstanceUID", "")).strip()
    if uid:
        return uid
    # No SeriesInstanceUID (some anonymisers drop it): group by what else a series shares, hashed so that the
    # SeriesDescription among them is never kept in clear.
    fields = ("FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality", "Rows", "Columns")
    return "no-uid:" + short_hash(str(path.parent.resolve()) + "|" + "|".join(str(header.get(f, "")) for f in fields))


def _orientation(header: Dataset) -> str:
    try:
        cosines = np.asarray(header.ImageOrientationPatient, dtype=float)
    except (AttributeError, ValueError, TypeError):
        return "unknown"
    normal = np.abs(np.cross(cosines[:3], cosines[3:]))
    if normal.max() < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _scan_series(folder: Path, on_error: str, files: list[Path] | None = None) -> list[DicomSeries]:
    """Every series under ``folder`` (or among ``files``), most slices first; a broken file raises or is skipped."""
    series, broken = scan_dicom_files(_candidate_files(folder) if files is None else list(files))
    for path, problem in broken:
        _fail(path, problem, on_error)
    return series


def _choose_series(folder: Path, series: list[DicomSeries], series_uid: str | None) -> DicomSeries:
    """The series asked for, or by rule the axial, non-localizer CT series with the most slices."""
    if not series:
        raise DataError(f"{folder}: no DICOM image files found")
    found = "; ".join(s.info.describe() for s in series)
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
    logger.info("%s: reading series %s: %s", folder, info.describe(), why)
    if len(series) > 1:
        logger.info("%s: all series: %s", folder, found)
    return chosen


def read_dicom_folder(folder: Path, series_uid: str | None, allow_gaps: bool,
                      on_error: str, files: list[Path] | None = None) -> tuple[sitk.Image, str]:
    """Choose a series under ``folder`` (among ``files`` when given), read and check its slices.

    Returns:
        (image, source_id): the stacked series and the short hash of its SeriesInstanceUID.
    """
    chosen = _choose_series(folder, _scan_series(folder, on_error, files), series_uid)
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
