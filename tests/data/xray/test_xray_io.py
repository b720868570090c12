"""read_xray / resize_image on real files and on hand-made PNG, JPEG and DICOM files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from chestssl.data.xray.io import read_xray, resize_image
from chestssl.errors import DataError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", slope: float = 1.0,
    intercept: float = 0.0, samples: int = 1, frames: int = 1,
) -> Path:
    """A minimal 12-bit DX DICOM with a patient name and ID that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "SECRET-ID-42", "DX"
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(rows: int = 16, columns: int = 16) -> np.ndarray:
    """12-bit stored values 0..4095 rising along the columns."""
    return np.tile(np.linspace(0, 4095, columns).round(), (rows, 1)).astype(np.uint16)


def test_real_kermany_jpeg_is_2d_uint8(shared_data: Path) -> None:
    image = read_xray(shared_data / "kermany-224" / "test" / "NORMAL" / "IM-0001-0001.jpeg")
    assert image.shape == (224, 224) and image.dtype == np.uint8
    assert image.std() > 10  # a real radiograph, not a blank


def test_real_ct_dicom_slice_reads(shared_data: Path) -> None:
    image = read_xray(shared_data / "ct" / "CT_small.dcm")
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255


def test_monochrome1_is_inverted_after_rescale(tmp_path: Path) -> None:
    stored = gradient()
    path = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", slope=2.0, intercept=-1024.0)
    image = read_xray(path)
    assert image.shape == stored.shape and image.dtype == np.uint8
    # the brightest stored value (right edge) must display dark, the darkest bright
    assert image[:, -1].max() == 0 and image[:, 0].min() == 255
    assert np.all(np.diff(image[0].astype(int)) <= 0)


def test_monochrome2_keeps_polarity_and_rescales_to_full_range(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "m2.dcm", gradient() // 2 + 100, "MONOCHROME2", slope=0.5, intercept=10.0)
    image = read_xray(path)
    assert image[:, 0].max() == 0 and image[:, -1].min() == 255


def test_dicom_detected_by_preamble_without_suffix(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM0001", gradient(), "MONOCHROME2")
    assert read_xray(path).shape == (16, 16)


@pytest.mark.parametrize("kind, expected", [("colour", "colour"), ("multiframe", "multi-frame")])
def test_colour_and_multiframe_dicom_are_rejected_without_leaking_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, expected: str
) -> None:
    if kind == "colour":
        path = write_dicom(tmp_path / "rgb.dcm", np.zeros((8, 8, 3)), "RGB", samples=3)
    else:
        path = write_dicom(tmp_path / "frames.dcm", np.zeros((3, 8, 8)), frames=3)
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError, match=expected) as info:
        read_xray(path)
    assert str(path) in str(info.value)
    assert "SECRET-ID-42" not in str(info.value) + caplog.text and "Doe" not in str(info.value) + caplog.text


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.png"):
        read_xray(path)


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png.*not a readable image"):
        read_xray(path)


def test_text_file_named_dcm_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not a dicom file either")
    with pytest.raises(DataError, match=r"notes\.dcm"):
        read_xray(path)


def test_truncated_dicom_names_the_file(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", gradient(64, 64))
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(DataError, match=r"cut\.dcm.*pixel data"):
        read_xray(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_xray(tmp_path / "absent.png")


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "sixteen.png"
    Image.fromarray(gradient(8, 16)).save(path)  # 12-bit values in a 16-bit PNG
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    image = read_xray(path)
    assert image.min() == 0 and image.max() == 255
    assert len(np.unique(image)) == 16  # clipping at 255 would leave only 2 levels


def test_rgba_png_becomes_grayscale(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = read_xray(path)
    assert image.shape == (8, 8) and int(image[0, 0]) == 200


def test_resize_is_square_uint8_and_antialiased() -> None:
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = resize_image(checkerboard, 8)
    assert small.shape == (8, 8) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - 128).max() <= 8  # averaged, not aliased to 0/255
    assert resize_image(np.zeros((30, 50), dtype=np.uint8), 28).shape == (28, 28)
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 4, 3), dtype=np.uint8), 2)
