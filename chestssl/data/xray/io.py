"""Reading 2D chest X-rays (PNG, JPEG, DICOM) into uint8 grayscale arrays.

Shapes: ``H``/``W`` pixels of one image, ``S`` the side of a square resized image, ``N`` images.

DICOM pixels go through the standard display pipeline (DICOM PS3.3 C.11): stored values → modality LUT
(RescaleSlope/Intercept) → VOI LUT or window → inversion for MONOCHROME1 → min..max scaled to 0..255, so
that dense tissue and bone are bright for every photometric interpretation. Compressed pixel data is decoded by
pydicom's plugins: JPEG Baseline, JPEG Lossless, JPEG-LS and JPEG 2000 by GDCM (python-gdcm, a dependency of
chestssl), RLE Lossless by pydicom itself; 12-bit JPEG Extended by the optional GPL-3.0 pylibjpeg-libjpeg
(``pip install 'chestssl[jpeg-extended]'``). Header
identifiers and free text (PatientName, PatientID, descriptions) are never logged nor returned.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from tqdm import tqdm

from chestssl.data.paths import load_cached_arrays, save_cached_arrays
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
PROGRESS_MIN_FILES = 200  # show a progress bar only for folders bigger than this
MAX_DECODE_THREADS = 2  # the shared machines have two cores


def is_dicom(path: str | os.PathLike) -> bool:
    """True if ``path`` ends in .dcm/.dicom or carries the 'DICM' marker after its 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale values min..max to 0..255 (a constant image becomes all zeros)."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_dicom(path: Path, apply_window: bool) -> np.ndarray:
    try:
        # force: a .dcm without the DICM preamble (old ACR-NEMA style) is still worth a try; the
        # PixelData check below rejects files that were not DICOM after all
        dataset = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if "PixelData" not in dataset:
        raise DataError(f"{path}: DICOM file has no pixel data (truncated, not an image, or not DICOM at all)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); expected one 2D chest X-ray")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"{path}: colour DICOM ({photometric}, {samples} samples per pixel); expected a grayscale X-ray"
        )
    try:
        stored = dataset.pixel_array
    except Exception as err:  # truncated data, unsupported compression, ...
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        hint = ("; chestssl decodes compressed DICOM with python-gdcm (is it installed?); 12-bit JPEG Extended "
                "needs the optional GPL-3.0 decoder: pip install 'chestssl[jpeg-extended]'"
                if getattr(syntax, "is_compressed", False) else "")
        raise DataError(f"{path}: cannot decode DICOM pixel data (transfer syntax "
                        f"{getattr(syntax, 'name', 'unknown')}; {type(err).__name__}: {err}){hint}") from err
    if stored.ndim != 2:
        raise DataError(f"{path}: DICOM pixel data has shape {stored.shape}; expected a 2D image")
    values = apply_modality_lut(stored, dataset)
    if apply_window:
        values = apply_voi_lut(values, dataset)
    values = np.asarray(values, dtype=np.float64)
    if photometric == "MONOCHROME1":  # MONOCHROME1: low values are bright; flip to MONOCHROME2
        values = values.max() + values.min() - values
    return _to_uint8(values)


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now so a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return _to_uint8(np.asarray(image))  # 16-bit/float: scale the used range, do not clip at 255
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: not a readable image file (PIL cannot identify it)") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from err


def read_xray(path: str | os.PathLike, apply_window: bool = True) -> np.ndarray:
    """Read one chest X-ray as a grayscale uint8 image.

    Args:
        path: a PNG/JPEG (any PIL mode; RGB/RGBA to luma, 16-bit scaled min..max) or a DICOM file
            (recognised by a .dcm/.dicom suffix or the DICM marker).
        apply_window: for DICOM, apply the VOI LUT / window stored in the header (default True).

    Returns:
        uint8 array (H, W); for DICOM, bright means dense (bone) whatever the photometric interpretation.

    Raises:
        DataError: the file is missing, truncated, not an image, or a multi-frame/colour DICOM; the message
            names the path and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    image = _read_dicom(path, apply_window) if is_dicom(path) else _read_raster(path)
    if image.ndim != 2 or image.size == 0:
        raise DataError(f"{path}: decoded to shape {image.shape}; expected a non-empty 2D image")
    return image


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2D uint8 image to ``size`` x ``size`` with antialiased bilinear interpolation (PIL).

    Args:
        image: uint8 array (H, W).
        size: side S of the square output, > 0.

    Returns:
        uint8 array (S, S). The aspect ratio is not kept (chest X-ray datasets are conventionally squashed).
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"resize_image expects a 2D uint8 image, got {image.dtype} {image.shape}")
    if int(size) <= 0:
        raise ValueError(f"resize_image: size must be positive, got {size}")
    if image.shape == (size, size):
        return image.copy()
    # Pillow widens the bilinear kernel when shrinking, so downscaling is antialiased
    resized = Image.fromarray(image).resize((int(size), int(size)), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _decode_one(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return resize_image(read_xray(path), size), None
    except DataError as err:
        return None, str(err)


def read_xrays(
    paths: Sequence[Path], size: int, on_error: str = "raise", cache_file: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize many X-rays with a small thread pool, optionally through an .npz cache.

    Args:
        paths: N image files.
        size: side S of the resized images.
        on_error: "raise" stops at the first unreadable file; "skip" warns per bad file and drops it.
        cache_file: where to keep the result; a valid cache is returned without decoding, a corrupt one is
            rebuilt. The caller's file name must change whenever the inputs change.

    Returns:
        images uint8 (N_kept, S, S) and kept int64 (N_kept,), the indices into ``paths`` that decoded.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    count = len(paths)
    cached = load_cached_arrays(cache_file) if cache_file is not None else None
    if cached is not None:
        images, kept = cached.get("images"), cached.get("kept")
        valid = (
            images is not None and kept is not None and images.dtype == np.uint8
            and images.shape[1:] == (size, size) and len(images) == len(kept)
            and (len(kept) == 0 or int(kept.max()) < count)
        )
        if not valid:
            logger.warning("ignoring inconsistent cache %s; it will be rebuilt", cache_file)
        elif len(kept) == count or on_error == "skip":
            if len(kept) < count:
                logger.warning("%d of %d files were unreadable and are skipped (cached)", count - len(kept), count)
            return images, kept.astype(np.int64)
    images = np.zeros((count, size, size), dtype=np.uint8)
    good = np.zeros(count, dtype=bool)
    threads = max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))
    progress = tqdm(total=count, desc="decoding X-rays", disable=count <= PROGRESS_MIN_FILES)
    with progress, ThreadPoolExecutor(max_workers=threads) as pool:
        for index, (image, problem) in enumerate(pool.map(_decode_one, paths, [size] * count)):
            progress.update(1)
            if problem is None:
                images[index], good[index] = image, True
            elif on_error == "raise":
                pool.shutdown(wait=False, cancel_futures=True)
                raise DataError(problem)
            else:
                logger.warning("skipping unreadable file: %s", problem)
    kept = np.flatnonzero(good).astype(np.int64)
    if len(kept) < count:
        logger.warning("skipped %d of %d files that could not be read", count - len(kept), count)
        images = images[kept]
    if cache_file is not None:
        save_cached_arrays(cache_file, {"images": images, "kept": kept})
    return images, kept
