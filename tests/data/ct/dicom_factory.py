"""Small synthetic DICOM slices for the CT reader tests, carrying a patient name and ID that must never leak."""

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_slice(path, z, uid, stored=None, modality="CT", spacing=(0.7, 0.7), slope=1.0, intercept=-1024.0,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"), size=16, headers=None):
    """One small synthetic DICOM slice at height ``z`` mm of series ``uid``; ``headers`` set further elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.ImageType = modality, uid, list(image_type)
    ds.PatientName, ds.PatientID, ds.SeriesDescription = "Doe^Jane", "PAT-SECRET-42", f"{modality} test"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-5.0, -5.0, float(z)], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = list(spacing), 1.0
    stored = np.zeros((size, size), np.uint16) if stored is None else stored.astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for keyword, value in (headers or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_volume(folder, hu, spacing, uid=None, modality="CT", headers=None, prefix="IM"):
    """A series of slices from ``hu`` (z, y, x), slice k at height k * spacing[0] mm; read_ct gives ``hu`` back.

    Stored values are ``hu + 1024`` (rounded) with RescaleIntercept -1024. Returns the SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    stored = np.clip(np.round(np.asarray(hu, dtype=np.float64)) + 1024, 0, 65535).astype(np.uint16)
    for k, pixels in enumerate(stored):
        write_slice(folder / f"{prefix}{k:04d}.dcm", k * spacing[0], uid, stored=pixels, modality=modality,
                    spacing=tuple(spacing[1:]), headers={"InstanceNumber": k + 1, **(headers or {})})
    return uid
