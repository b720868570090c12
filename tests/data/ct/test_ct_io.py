"""read_ct and list_series on the real public CT data and on small hand-made DICOM/NIfTI files."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import write_slice
from pydicom.uid import generate_uid

from chestssl.data.ct.io import CTVolume, read_ct
from chestssl.data.ct.dicom_series import list_series
from chestssl.errors import DataError

REAL_VOLUMES = [  # path under the data root, (z, y, x) shape, (z, y, x) spacing in mm
    ("ct/lung-pet-ct-dx/Lung_Dx-A0001_series2", (64, 512, 512), (5.0, 0.8418, 0.8418)),
    ("ct/totalsegmentator/abdomen_ct_dicom", (20, 512, 512), (2.0, 0.9766, 0.9766)),
    ("ct/pyradiomics/lung1_image.nrrd", (48, 512, 512), (5.0, 0.5703, 0.5703)),
    ("ct/pyradiomics/lung2_image.nrrd", (61, 512, 512), (5.0, 0.6270, 0.6270)),
    ("ct/totalsegmentator/aorta_report_ct_cropped.nii.gz", (164, 126, 120), (1.5, 1.5, 1.5)),
    ("ct/totalsegmentator/pulmonary_report_ct_cropped.nii.gz", (112, 102, 122), (1.5, 1.5, 1.5)),
]


@pytest.mark.parametrize("relative, shape, spacing", REAL_VOLUMES, ids=[Path(v[0]).name for v in REAL_VOLUMES])
def test_real_volumes_have_expected_geometry_and_plausible_hu(shared_data, relative, shape, spacing):
    volume = read_ct(shared_data / relative)
    assert isinstance(volume, CTVolume) and volume.hu.dtype == np.int16
    assert volume.hu.shape == shape
    np.testing.assert_allclose(volume.spacing, spacing, atol=1e-3)
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-6)  # axis-aligned scans
    air = np.median(volume.hu[volume.hu < -900])
    assert -1030 <= air <= -940, f"air (trachea, outside) should be near -1000 HU, got {air}"
    counts, edges = np.histogram(volume.hu, bins=23, range=(-30, 200))
    soft_tissue_peak = edges[np.argmax(counts)] + 5
    assert 0 <= soft_tissue_peak <= 120, f"muscle/blood/liver peak should be 0-120 HU, got {soft_tissue_peak}"
    assert len(volume.source_id) == 12 and volume.source_id.isalnum()


def test_dicom_slices_run_inferior_to_superior(shared_data):
    folder = shared_data / "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2"
    volume = read_ct(folder)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()]
    heights = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    assert volume.origin[2] == pytest.approx(heights[0])  # hu[0] is the most inferior slice
    assert list_series(folder)[0].uid_hash == volume.source_id


def write_series(folder, heights, uid=None, prefix="s", **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    # Files named out of order on purpose: slices must be sorted by position, not by name.
    return uid, [write_slice(folder / f"{prefix}{i:03d}.dcm", z, uid, **kwargs) for i, z in enumerate(heights[::-1])]


def test_rescale_slope_and_intercept_give_hu(tmp_path):
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16) * 10
    write_series(tmp_path / "a", [0, 1, 2], stored=stored, slope=2.0, intercept=-1024.0)
    volume = read_ct(tmp_path / "a")
    assert volume.hu.dtype == np.int16 and volume.hu.shape == (3, 16, 16)
    np.testing.assert_array_equal(volume.hu[1], stored.astype(np.int32) * 2 - 1024)
    write_series(tmp_path / "b", [0, 1, 2], stored=stored, slope=0.5, intercept=-1000.5)
    volume = read_ct(tmp_path / "b")
    assert volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.hu[0], stored * 0.5 - 1000.5)
    assert volume.spacing == pytest.approx((1.0, 0.7, 0.7))


def test_flipped_nifti_affine_gives_the_same_canonical_array(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)  # (i, j, k)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])  # RAS+: i runs to the patient's right, j anterior, k superior
    affine[:3, 3] = [10.0, -20.0, 30.0]
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)  # same voxels, stored right-to-left
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "plain.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1].copy(), flipped), tmp_path / "flipped.nii")
    plain, other = read_ct(tmp_path / "plain.nii.gz"), read_ct(tmp_path / "flipped.nii")
    np.testing.assert_array_equal(plain.hu, other.hu)
    np.testing.assert_allclose(plain.origin, other.origin, atol=1e-4)
    assert plain.hu.shape == (4, 5, 6) and plain.spacing == pytest.approx((2.5, 0.9, 0.8))
    # LPS canonical: x runs to the patient's left (i = 0 is the leftmost voxel), y runs posterior (j = 0 is).
    np.testing.assert_array_equal(plain.hu, data.transpose(2, 1, 0)[:, ::-1, ::-1])


def test_two_series_chosen_by_rule_and_by_series_uid(tmp_path, caplog):
    long_uid, _ = write_series(tmp_path / "study/long", list(range(8)))
    short_uid, _ = write_series(tmp_path / "study/short", list(range(4)))
    write_series(tmp_path / "study/scout", [0], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path / "study/scout2", list(range(10)), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with caplog.at_level(logging.INFO, logger="chestssl"):
        assert read_ct(tmp_path / "study").hu.shape[0] == 8  # the 10-slice localizer is not chosen
    assert "most slices" in caplog.text
    assert "Doe" not in caplog.text and "PAT-SECRET" not in caplog.text
    infos = list_series(tmp_path / "study")
    assert [i.n_slices for i in infos] == [10, 8, 4, 1] and [i.localizer for i in infos] == [True, False, False, True]
    assert "Doe" not in repr(infos) and "PAT-SECRET" not in repr(infos) and short_uid not in repr(infos)
    assert read_ct(tmp_path / "study", series_uid=short_uid).hu.shape[0] == 4
    assert read_ct(tmp_path / "study", series_uid=infos[2].uid_hash).hu.shape[0] == 4
    with pytest.raises(DataError, match="no series"):
        read_ct(tmp_path / "study", series_uid="1.2.3.4")
    assert read_ct(tmp_path / "study").source_id != long_uid


def test_mr_series_refused(tmp_path):
    mr_uid, _ = write_series(tmp_path / "mr", list(range(5)), modality="MR")
    with pytest.raises(DataError, match=r"mr: no CT series.*MR"):
        read_ct(tmp_path / "mr")
    write_series(tmp_path / "mr/ct", list(range(3)))
    assert read_ct(tmp_path / "mr").hu.shape[0] == 3  # the CT series, though the MR one has more slices
    with pytest.raises(DataError, match="is MR, not CT"):
        read_ct(tmp_path / "mr", series_uid=mr_uid)


def test_missing_slice_refused_unless_gaps_allowed(tmp_path):
    write_series(tmp_path / "gap", [0, 2, 4, 8, 10])
    with pytest.raises(DataError, match=r"gap.*missing slice.*4\.00 to 8\.00 mm"):
        read_ct(tmp_path / "gap")
    volume = read_ct(tmp_path / "gap", allow_gaps=True)
    assert volume.hu.shape[0] == 6 and volume.spacing[0] == pytest.approx(2.0)


def test_duplicated_and_uneven_slices_refused(tmp_path):
    write_series(tmp_path / "dup", [0, 1, 2, 2, 3])
    with pytest.raises(DataError, match=r"dup.*duplicated slice position 2\.00 mm"):
        read_ct(tmp_path / "dup")
    write_series(tmp_path / "uneven", [0, 1, 2, 3.3, 4.3, 5.3])
    with pytest.raises(DataError, match="inconsistent slice spacing"):
        read_ct(tmp_path / "uneven")


def test_inconsistent_pixel_spacing_refused(tmp_path):
    uid, _ = write_series(tmp_path / "px", [0, 1, 2])
    write_slice(tmp_path / "px/odd.dcm", 3, uid, spacing=(0.8, 0.8))
    with pytest.raises(DataError, match="inconsistent pixel spacing"):
        read_ct(tmp_path / "px")


def test_truncated_dicom_named_or_skipped(tmp_path):
    _, files = write_series(tmp_path / "cut", list(range(8)))  # files[0] is the top slice (z = 7)
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) - 100])  # pixel data cut short
    with pytest.raises(DataError, match=f"{files[0].name}.*unreadable slice"):
        read_ct(tmp_path / "cut")
    assert read_ct(tmp_path / "cut", on_error="skip").hu.shape[0] == 7  # an end slice: still consistent
    files[4].write_bytes(files[4].read_bytes()[:300])  # a middle slice, cut inside the header
    with pytest.raises(DataError, match=f"{files[4].name}.*truncated"):
        read_ct(tmp_path / "cut")
    with pytest.raises(DataError, match="missing slice"):  # skipping it leaves a gap
        read_ct(tmp_path / "cut", on_error="skip")


def test_nifti_with_nan_refused(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 1 of 48 voxels are NaN"):
        read_ct(tmp_path / "nan.nii.gz")


def test_unsupported_or_missing_inputs_named(tmp_path, shared_data):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt: unsupported format"):
        read_ct(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="nowhere.nii: no such file"):
        read_ct(tmp_path / "nowhere.nii")
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ngarbage")
    with pytest.raises(DataError, match="broken.nrrd: cannot read"):
        read_ct(tmp_path / "broken.nrrd")
    with pytest.raises(DataError, match="single DICOM file"):
        read_ct(shared_data / "ct/CT_small.dcm")
    with pytest.raises(DataError, match="no DICOM image files"):
        read_ct(tmp_path)
