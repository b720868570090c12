"""Is a volume a CT in Hounsfield units, and is its automatic lung mask made of lungs? What keeps others out of a cache.

Arrays are (z, y, x) in the canonical orientation of :func:`chestssl.data.ct.io.read_ct` (the last slice is the
most superior, x runs patient right→left); spacings are ``(z, y, x)`` in mm.

:func:`check_hu` refuses values that are not HU whatever the lung mask (a pre-windowed 8-bit image, stored values
without their rescale, a normalised array): in HU the darkest voxels are air, about -1000 (or lung, -850).
:func:`check_lungs` refuses an automatic lung mask that is not two lungs: a chest CT's lung candidate lies on both
sides of the mid-line, reaches the upper half of the body and is mostly lung parenchyma (-950 to -500 HU); bowel gas
of an abdominal CT is pure gas (about -1000 HU) in pockets below the diaphragm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chestssl.errors import DataError

TOO_SMALL = "lung mask too small / not a chest CT"
NOT_CHEST = "not a chest CT"
NOT_HU = "not HU"
PADDING_BELOW_HU = -1500.0  # outside the reconstruction circle scanners store -2048, -3024 or -32768
AIR_HU = (-1200.0, -800.0)  # where the darkest 0.5% of the other voxels lie in HU: air (-1000) or lung (-850)
MAX_HU = 4000.0  # the 99.9th percentile: bone and contrast stay below 3071 HU, the top of 12-bit CT
MAX_LUNG_ML = 12000.0  # adult total lung capacity is 4-8 L
PARENCHYMA_HU = (-950.0, -500.0)  # aerated lung; vessels filled into the mask lie above, pure gas below
MIN_PARENCHYMA_SHARE = 0.4  # of the mask (0.89-0.92 on the real chests; pure gas pockets about 0.1)
MIN_SIDE_SHARE = 0.2  # of the mask on each side of the body's mid-line (0.40-0.60 on the real chests)
MIN_TOP_HEIGHT = 0.5  # the mask's top (98th percentile) as a share of the body's height (0.78-0.97 on the chests)
SAMPLED_VOXELS = 2_000_000  # check_hu looks at about this many voxels


def check_hu(hu: np.ndarray) -> None:
    """Refuse an array whose values are not HU.

    Args:
        hu: (z, y, x) array, padding outside the field of view allowed.

    Raises:
        DataError: "not HU: ..." with the values found, when the darkest 0.5% of the voxels above padding are
            not air or lung (within :data:`AIR_HU`) or the brightest 0.1% exceed :data:`MAX_HU`.
    """
    step = max(1, round((hu.size / SAMPLED_VOXELS) ** (1 / 3)))
    sample = np.asarray(hu[::step, ::step, ::step], dtype=np.float32).ravel()
    values = sample[sample > PADDING_BELOW_HU]
    if values.size < 0.5 * sample.size:
        raise DataError(f"{NOT_HU}: {1 - values.size / max(sample.size, 1):.0%} of the voxels are below "
                        f"{PADDING_BELOW_HU:g}, padding in HU; is this a CT in Hounsfield units?")
    low, high = np.percentile(values, [0.5, 99.9])
    if not AIR_HU[0] <= low <= AIR_HU[1] or high > MAX_HU:
        raise DataError(
            f"{NOT_HU}: the darkest voxels are at {low:.4g} and the brightest at {high:.4g}, where a CT in Hounsfield "
            f"units has air at about -1000 (the darkest 0.5% between {AIR_HU[0]:g} and {AIR_HU[1]:g}) and bone below "
            f"{MAX_HU:g}; a pre-windowed 8-bit image, pixel values without RescaleSlope/Intercept, or a crop "
            "without air?")


def check_lungs(hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float], min_lung_ml: float) -> float:
    """Refuse an automatic lung mask that is too small or not lungs; return its volume in ml.

    An empty mask passes when ``min_lung_ml`` is 0: there is nothing to judge, the caller says what is missing.

    Args:
        hu: (z, y, x) HU.
        lung: bool (z, y, x), the candidate from :func:`~chestssl.data.ct.lung_mask.lung_mask`.
        spacing: (z, y, x) mm.
        min_lung_ml: the least volume of a lung mask.

    Raises:
        DataError: "lung mask too small / not a chest CT: ..." below ``min_lung_ml``, else
            "not a chest CT: ..." listing :func:`lung_problems`.
    """
    lung_ml = float(np.count_nonzero(lung)) * float(np.prod(spacing)) / 1000.0
    if lung_ml < min_lung_ml:
        raise DataError(f"{TOO_SMALL}: {lung_ml:.0f} ml of lung found, min_lung_ml is {min_lung_ml:g} ml")
    problems = lung_problems(hu, lung, spacing) if lung_ml > 0 else []
    if problems:
        raise DataError(f"{NOT_CHEST}: the {lung_ml:.0f} ml lung candidate " + "; ".join(problems))
    return lung_ml


def lung_problems(hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float]) -> list[str]:
    """What makes a non-empty lung candidate unlike two lungs (an empty list for a chest CT).

    Volume at most :data:`MAX_LUNG_ML`; at least :data:`MIN_PARENCHYMA_SHARE` of it lung parenchyma (not pure
    gas); at least :data:`MIN_SIDE_SHARE` on each side of the body's mid-line; its top in the upper half of the
    body (below a soft-tissue dome lies the abdomen). The body is what is denser than -500 HU.
    """
    problems = []
    lung_ml = float(np.count_nonzero(lung)) * float(np.prod(spacing)) / 1000.0
    if lung_ml > MAX_LUNG_ML:
        problems.append(f"is larger than lungs can be (at most {MAX_LUNG_ML:g} ml)")
    inside = hu[lung]
    parenchyma = float(np.mean((inside > PARENCHYMA_HU[0]) & (inside <= PARENCHYMA_HU[1])))
    if parenchyma < MIN_PARENCHYMA_SHARE:
        problems.append(f"is {parenchyma:.0%} lung-density tissue ({PARENCHYMA_HU[0]:g} to {PARENCHYMA_HU[1]:g} HU; "
                        f"median {np.median(inside):.0f} HU): gas, not lung parenchyma (about -850 HU)")
    body = hu > -500
    lung_z, lung_x = lung.sum(axis=(1, 2)), lung.sum(axis=(0, 1))  # lung voxels per slice, per column
    rows = np.flatnonzero(lung_z)
    body_x = body[rows[0]:rows[-1] + 1].sum(axis=(0, 1))  # body voxels per column beside the lungs
    midline = (_percentile(body_x, 0.02) + _percentile(body_x, 0.98)) / 2 if body_x.any() else lung.shape[2] / 2
    right = lung_x[: int(np.ceil(midline))].sum() / lung_x.sum()  # x runs patient right -> left
    side = min(right, 1 - right)
    if side < MIN_SIDE_SHARE:
        problems.append(f"lies on one side of the body ({side:.0%} across the mid-line; two lungs lie on both)")
    area = body.sum(axis=(1, 2))
    slices = np.flatnonzero(area >= 0.1 * area.max()) if area.max() > 0 else np.arange(lung.shape[0])
    height = (_percentile(lung_z, 0.98) - slices[0] + 1) / (slices[-1] - slices[0] + 1)
    if height < MIN_TOP_HEIGHT:
        problems.append(f"lies low in the body (its top at {height:.0%} of the body's height; lungs reach the "
                        "upper half, the abdomen lies below them)")
    return problems


def _percentile(counts: np.ndarray, quantile: float) -> int:
    """The index below which ``quantile`` of the voxels counted per index lie (a percentile from a histogram)."""
    return int(np.searchsorted(np.cumsum(counts), quantile * counts.sum()))
