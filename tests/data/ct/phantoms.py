"""Synthetic CT volumes for the chest checks: a chest, abdomens with gas below a soft-tissue dome, an 8-bit chest.

Arrays are (z, y, x) in the canonical orientation of read_ct (the last slice most superior) at 3 mm voxels:
(60, 96, 96) = 180 x 288 x 288 mm, a body of soft tissue (40 HU) in air (-1000 HU).
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from chestssl.data.ct.io import CTVolume

SPACING = (3.0, 3.0, 3.0)
SHAPE = (60, 96, 96)


def _grid_mm():
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return z * SPACING[0] + 1.5, y * SPACING[1] - 144.0 + 1.5, x * SPACING[2] - 144.0 + 1.5  # mm, centre 0


def _body() -> np.ndarray:
    _, y, x = _grid_mm()
    hu = np.full(SHAPE, -1000.0)
    hu[np.broadcast_to((y / 95) ** 2 + (x / 130) ** 2 <= 1, SHAPE)] = 40.0
    return hu


def _ellipsoid(centre, radii) -> np.ndarray:
    z, y, x = _grid_mm()
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip((z, y, x), centre, radii)) <= 1


def _lung_tissue(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """-850 HU parenchyma with about 8% of vessels (40 HU) inside ``region``."""
    values = rng.normal(-850.0, 30.0, SHAPE)
    vessels = rng.random(SHAPE) < 0.08
    return np.where(region & vessels, 40.0, values)


def chest_lungs() -> np.ndarray:
    """The lungs of :func:`chest`, bool (z, y, x): what a user's lung mask would hold."""
    return _ellipsoid((100, 0, -60), (70, 65, 45)) | _ellipsoid((100, 0, 60), (70, 65, 45))


def chest(seed: int = 0) -> np.ndarray:
    """Two lungs (about 0.85 L each, -850 HU, from 30 to 170 mm) and a trachea in the top 30 mm."""
    rng = np.random.default_rng(seed)
    hu = _body()
    lungs = chest_lungs()
    hu = np.where(lungs, _lung_tissue(rng, lungs), hu)
    z, y, x = _grid_mm()
    hu[np.broadcast_to((z >= 150) & ((y + 40) ** 2 + x**2 <= 64), SHAPE)] = -1000.0
    return (hu + rng.normal(0, 10, SHAPE)).astype(np.float32)


def abdomen(kind: str = "gas", seed: int = 0) -> np.ndarray:
    """An abdomen under a soft-tissue dome (the liver, the top 45 mm) with gas pockets below it.

    ``kind="gas"``: pure gas (-1000 HU): two large pockets left and right (about 95 ml each, up to 115 mm, past
    the middle of the body) and ten small ones. ``kind="stool"``: the two large pockets of mottled, lung-like
    density (-850 HU), low in the body (up to 75 mm).
    """
    rng = np.random.default_rng(seed)
    hu = _body()
    if kind == "gas":
        pockets = _ellipsoid((90, 10, -55), (25, 30, 30)) | _ellipsoid((90, 10, 55), (25, 30, 30))
        for z, y, x, side in zip(*rng.uniform([20, -50, 40, -1], [120, 50, 100, 1], (10, 4)).T):
            pockets |= _ellipsoid((z, y, x * np.sign(side)), (8, 8, 8))  # off the mid-line: not taken for a trachea
        hu[pockets] = -1000.0
    elif kind == "stool":
        pockets = _ellipsoid((50, 10, -55), (25, 30, 30)) | _ellipsoid((50, 10, 55), (25, 30, 30))
        hu = np.where(pockets, _lung_tissue(rng, pockets), hu)
    else:
        raise ValueError(f"kind must be 'gas' or 'stool', got {kind!r}")
    return (hu + rng.normal(0, 10, SHAPE)).astype(np.float32)


def eight_bit(hu: np.ndarray) -> np.ndarray:
    """``hu`` pre-windowed to [-1000, 200] HU and stored as 0..255 (as exported for viewing)."""
    return np.round(np.clip((hu + 1000.0) / 1200.0, 0, 1) * 255).astype(np.int16)


def as_volume(hu: np.ndarray, name: str = "phantom") -> CTVolume:
    values = hu.astype(np.int16) if hu.dtype == np.int16 else hu.astype(np.float32)
    return CTVolume(values, SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), name)


def write_image(path: Path, array: np.ndarray) -> Path:
    """An MHA file (LPS, axis-aligned) that read_ct gives back as ``array``."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING[::-1])
    sitk.WriteImage(image, str(path))
    return path
