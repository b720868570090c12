"""CT series stored with compressed transfer syntaxes (as PACS exports them) read to the same HU as uncompressed."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_volume
from jpeg_lossless import compress_jpeg_lossless
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from chestssl.data.ct.io import read_ct

SYNTAXES = [RLELossless, JPEG2000Lossless, JPEGLosslessSV1]


def recompress(source: Path, target: Path, syntax: str) -> Path:
    """Every slice of the series in ``source`` re-encoded with ``syntax`` into ``target``."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        if syntax == JPEGLosslessSV1:  # pydicom has no JPEG Lossless encoder
            compress_jpeg_lossless(dataset)
        else:
            dataset.compress(syntax)
        dataset.save_as(target / path.name, enforce_file_format=True)
        assert pydicom.dcmread(target / path.name, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return target


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda uid: uid.name.split(",")[0].split(" (")[0])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_compressed_synthetic_series_reads_to_the_same_hu(tmp_path, syntax, signed):
    hu = np.random.default_rng(0).integers(-1024, 3071, (4, 48, 40)).astype(np.float64)  # J2K: 32+ px a side
    hu[0, 0, :2] = [-1024, 3071]  # the extremes of 12-bit CT
    if signed:  # PixelRepresentation 1, stored values are the HU themselves
        write_volume(tmp_path / "plain", hu - 1024, (2.0, 0.7, 0.7), headers={"PixelRepresentation": 1,
                                                                            "RescaleIntercept": 0})
    else:
        write_volume(tmp_path / "plain", hu, (2.0, 0.7, 0.7))
    plain = read_ct(tmp_path / "plain")
    compressed = read_ct(recompress(tmp_path / "plain", tmp_path / "compressed", syntax))
    assert compressed.hu.dtype == plain.hu.dtype and np.array_equal(compressed.hu, plain.hu)
    assert compressed.spacing == plain.spacing and compressed.origin == plain.origin


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless], ids=["JPEG Lossless", "JPEG 2000"])
def test_real_chest_ct_slices_read_the_same_compressed(shared_data, tmp_path, syntax):
    series = shared_data / "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2"
    heights = {path: float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])
               for path in series.iterdir()}
    (tmp_path / "plain").mkdir()
    for path in sorted(heights, key=heights.get)[30:34]:  # four adjacent slices through the lungs
        shutil.copy(path, tmp_path / "plain" / path.name)
    plain = read_ct(tmp_path / "plain")
    compressed = read_ct(recompress(tmp_path / "plain", tmp_path / "compressed", syntax))
    assert compressed.hu.shape == (4, 512, 512) and np.array_equal(compressed.hu, plain.hu)
    assert -1030 <= np.median(plain.hu[plain.hu < -900]) <= -940  # real HU: air near -1000
