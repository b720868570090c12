"""Read a chest CT (a DICOM series folder, NIfTI, NRRD or MHA/MHD) into one canonical orientation.

Canonical orientation, for every format: SimpleITK ``DICOMOrient(image, "LPS")``, so the voxel
axes (x, y, z) point to the patient's left, posterior and superior, and the numpy array
``hu[z, y, x]`` runs inferior→superior along z, anterior→posterior along y and right→left along x.
An axial slice ``hu[k]`` shown with ``imshow`` is in the radiological convention (anterior up,
the patient's right on the left of the image).

DICOM folders are read with pydicom: headers first (grouped by SeriesInstanceUID, one series chosen
by rule), then the chosen series' slices, ordered by ImagePositionPatient projected on the slice
normal, with RescaleSlope/RescaleIntercept applied. Nothing that identifies the patient is logged
or kept: series are named by a short hash of their SeriesInstanceUID.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from chestssl.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CANONICAL_ORIENTATION = "LPS"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # such a file that is not DICOM is corrupt, not ignored
NOT_DICOM_SUFFIXES = (".xml", ".txt", ".json", ".csv", ".md")  # annotations beside a series: not read
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


@dataclass(frozen=True)
class CTVolume:
    """One CT volume in the canonical orientation (see the module docstring).

    Attributes:
        hu: int16 (when the values are whole numbers that fit) or float32 array (z, y, x) in HU.
        spacing: (z, y, x) voxel spacing in mm.
        origin: LPS position in mm, ordered (x, y, z), of the centre of voxel ``hu[0, 0, 0]``.
        direction: 3x3 direction cosines, row-major as in SimpleITK; column i is the LPS direction
            of voxel axis i in (x, y, z) order. The identity for an axis-aligned scan.
        source_id: a short hash of the SeriesInstanceUID (DICOM) or of the file path; never a
            patient name or ID.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source_id: str

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.dtype not in (np.int16, np.float32):
            raise ValueError(f"{self.source_id}: hu must be a 3D int16 or float32 array, got {self.hu.dtype} "
                             f"{self.hu.shape}")
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f"{self.source_id}: spacing must be 3 positive values, got {self.spacing}")


def read_ct(
    path: str | Path,
    series_uid: str | None = None,
    *,
    allow_gaps: bool = False,
    on_error: str = "raise",
) -> CTVolume:
    """Read a CT volume from a DICOM folder tree or a NIfTI/NRRD/MHA/MHD file.

    Args:
        path: a folder holding DICOM files (searched recursively), or an image file.
        series_uid: for a DICOM folder with several series, the SeriesInstanceUID or the
            ``uid_hash`` from :func:`list_series` of the one to read; by default the axial CT series
            with the most slices (localizers excluded) is chosen and the choice is logged.
        allow_gaps: for DICOM, accept missing slices and irregular slice spacing by interpolating
            onto a regular grid (with a warning) instead of refusing the series.
        on_error: "raise" (default) refuses a DICOM folder with an unreadable file; "skip" leaves
            such files out when the rest still make a consistent series.

    Returns:
        The volume in the canonical orientation.

    Raises:
        DataError: naming the file or folder and the problem (not CT, missing or duplicated
            slices, inconsistent geometry, a corrupt file, NaN voxels, an unsupported format).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if series_uid is not None and not path.is_dir():
        raise ValueError(f"{path}: series_uid only applies to a DICOM folder")
    if path.is_dir():
        image, source_id = _read_dicom_folder(path, series_uid, allow_gaps, on_error)
    elif not path.exists():
        raise DataError(f"{path}: no such file or folder")
    elif path.name.lower().endswith((".nii", ".nii.gz")):  # nibabel: SimpleITK silently turns NaN into 0
        image, source_id = _read_nifti(path), short_hash(str(path.resolve()))
    elif path.name.lower().endswith(IMAGE_SUFFIXES):
        image, source_id = _read_image_file(path), short_hash(str(path.resolve()))
    elif _has_dicom_preamble(path):
        raise DataError(f"{path}: a single DICOM file; pass the folder that holds its series")
    else:
        raise DataError(f"{path}: unsupported format; expected a DICOM folder or {', '.join(IMAGE_SUFFIXES)}")
    return to_volume(image, source_id, path)


def to_volume(image: sitk.Image, source_id: str, path: Path) -> CTVolume:
    """Reorient a 3D SimpleITK image to the canonical orientation and wrap it as a CTVolume."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: expected a 3D scalar volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    values = sitk.GetArrayFromImage(image)  # (z, y, x)
    _check_finite(values, path)
    fits_int16 = values.min() >= np.iinfo(np.int16).min and values.max() <= np.iinfo(np.int16).max
    if fits_int16 and (values.dtype.kind in "iu" or np.array_equal(values, np.round(values))):
        hu = values.astype(np.int16, copy=False)
    else:
        hu = values.astype(np.float32, copy=False)
    if hu.size and hu.min() >= 0:
        logger.warning("%s: no value below 0 HU; these may be raw CT numbers without the rescale", path)
    return CTVolume(
        hu=hu,
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
        source_id=source_id,
    )


def short_hash(text: str) -> str:
    """A 12-hex-digit SHA-256 prefix: a stable id that does not reveal ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _check_finite(values: np.ndarray, path: Path) -> None:
    if values.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataError(f"{path}: {bad} of {values.size} voxels are NaN or infinite; "
                            "refusing a volume with missing values")


def _read_nifti(path: Path) -> sitk.Image:
    """A NIfTI file via nibabel (scaling applied), its RAS affine turned into LPS geometry."""
    try:
        nifti = nib.load(path)
        values = np.asanyarray(nifti.dataobj)  # (i, j, k)
    except Exception as error:  # nibabel raises several types on a damaged file
        raise DataError(f"{path}: cannot read this NIfTI file ({type(error).__name__}: {error})") from error
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {values.shape}")
    _check_finite(values, path)
    lps = np.diag([-1.0, -1.0, 1.0]) @ nifti.affine[:3]  # (3, 4): RAS to LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise DataError(f"{path}: the affine is sheared or degenerate, not a rotation with spacing")
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))  # (k, j, i)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:, 3].tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def _read_image_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise DataError(f"{path}: cannot read this image file ({detail})") from error


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


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


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


def _read_dicom_folder(folder: Path, series_uid: str | None, allow_gaps: bool,
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
