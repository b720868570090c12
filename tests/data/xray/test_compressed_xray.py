"""read_xray decodes compressed DICOM (RLE, JPEG, JPEG Lossless, JPEG-LS, JPEG 2000): pydicom's files and our own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_xray_io import gradient, write_dicom

from chestssl.data.xray.io import read_xray
from chestssl.errors import DataError

LOSSLESS_MR = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]  # of MR_small.dcm
OTHERS = ["JPEG2000.dcm", "693_J2KI.dcm", "JPEGLSNearLossless_16.dcm"]  # lossy or no reference


def jpeg_lossless():
    """The test encoder beside the CT tests (pydicom writes no JPEG Lossless)."""
    path = Path(__file__).resolve().parents[1] / "ct" / "jpeg_lossless.py"
    spec = importlib.util.spec_from_file_location("jpeg_lossless", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_lossless_compressed_dicom_decodes_like_the_uncompressed_file(name):
    assert pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    image = read_xray(get_testdata_file(name))
    assert image.shape == (64, 64) and np.array_equal(image, read_xray(get_testdata_file("MR_small.dcm")))


@pytest.mark.parametrize("name", OTHERS)
def test_other_compressed_grayscale_dicom_decodes(name):
    image = read_xray(get_testdata_file(name))
    assert image.dtype == np.uint8 and image.ndim == 2 and image.std() > 5


def test_twelve_bit_jpeg_extended_decodes_or_says_which_extra_it_needs():
    """GDCM cannot decode 12-bit JPEG Extended; the optional (GPL-3.0) libjpeg decoder can."""
    try:
        import libjpeg  # noqa: F401  (pylibjpeg-libjpeg)
    except ImportError:
        with pytest.raises(DataError, match=r"chestssl\[jpeg-extended\]"):
            read_xray(get_testdata_file("JPGExtended.dcm"))
    else:
        image = read_xray(get_testdata_file("JPGExtended.dcm"))
        assert image.dtype == np.uint8 and image.std() > 5


def test_jpeg_lossless_xray_decodes_like_the_uncompressed_one(tmp_path):
    stored = (gradient(40, 48).astype(np.int64) + np.random.default_rng(0).integers(0, 200, (40, 48))).clip(0, 4095)
    plain = write_dicom(tmp_path / "plain.dcm", stored, "MONOCHROME1", slope=2.0, intercept=-1024.0)
    dataset = jpeg_lossless().compress_jpeg_lossless(pydicom.dcmread(plain))
    dataset.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "jpeg.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(read_xray(tmp_path / "jpeg.dcm"), read_xray(plain))


def test_compressed_colour_dicom_is_decoded_then_refused_as_colour():
    with pytest.raises(DataError, match="colour DICOM"):  # not "cannot decode"
        read_xray(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))  # JPEG Lossless, RGB
