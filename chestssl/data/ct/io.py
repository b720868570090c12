"""Read a chest CT (a DICOM series folder, NIfTI, NRRD or MHA/MHD) into one canonical orientation.

Canonical orientation, for every format: SimpleITK ``DICOMOrient(image, "LPS")``, so the voxel
axes (x, y, z) point to the patient's left, posterior and superior, and the numpy array
``hu[z, y, x]`` runs inferior→superior along z, anterior→posterior along y and right→left along x.
An axial slice ``hu[k]`` shown with ``imshow`` is in the radiological convention (anterior up,
the patient's right on the left of the image).

DICOM folders are read by :mod:`chestssl.data.ct.dicom_series` (one series chosen by rule, slices
ordered along the slice normal, rescale applied); image files by nibabel (NIfTI) or SimpleITK.
Nothing that identifies the patient is logged or kept: a volume is named by a short hash of its
SeriesInstanceUID or of its file path, and no free-text header (SeriesDescription, PatientName, ...) is read out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from chestssl.data.ct.files import IMAGE_SUFFIXES, has_dicom_preamble, short_hash
from chestssl.data.ct.dicom_series import read_dicom_folder
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPS"


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
        source_orientation: the three-letter orientation of the voxel axes as read (``"RAS"`` for a typical
            NIfTI), so an output on this grid can be turned back into the source scan's own geometry.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source_id: str
    source_orientation: str = CANONICAL_ORIENTATION

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
    files: Sequence[Path] | None = None,
) -> CTVolume:
    """Read a CT volume from a DICOM folder tree or a NIfTI/NRRD/MHA/MHD file.

    Args:
        path: a folder holding DICOM files (searched recursively), or an image file.
        series_uid: for a DICOM folder with several series, the SeriesInstanceUID or the
            ``uid_hash`` from :func:`~chestssl.data.ct.dicom_series.list_series` of the one to read; by
            default the axial CT series with the most slices (localizers excluded) is chosen and the
            choice is logged.
        allow_gaps: for DICOM, accept missing slices and irregular slice spacing by interpolating
            onto a regular grid (with a warning) instead of refusing the series.
        on_error: "raise" (default) refuses a DICOM folder with an unreadable file; "skip" leaves
            such files out when the rest still make a consistent series.
        files: for a DICOM folder, read only these files instead of scanning the folder (what
            ``prepare-ct`` passes for a series it found, so that a large tree is not scanned once per series).

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
        image, source_id = read_dicom_folder(path, series_uid, allow_gaps, on_error,
                                             None if files is None else list(files))
    elif not path.exists():
        raise DataError(f"{path}: no such file or folder")
    elif path.name.lower().endswith((".nii", ".nii.gz")):  # nibabel: SimpleITK silently turns NaN into 0
        image, source_id = _read_nifti(path), short_hash(str(path.resolve()))
    elif path.name.lower().endswith(IMAGE_SUFFIXES):
        image, source_id = _read_image_file(path), short_hash(str(path.resolve()))
    elif has_dicom_preamble(path):
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
    source_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
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
        source_orientation=source_orientation,
    )


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
