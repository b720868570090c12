"""The classical lung mask of a chest CT, :func:`lung_mask`, and the stages it is made of.

Arrays are (z, y, x) in the canonical orientation of :func:`chestssl.data.ct.io.read_ct`: axis 0 runs
inferior→superior (so the last slice is the most superior), axis 1 anterior→posterior, axis 2 patient
right→left; :func:`lung_mask` depends on it (it looks for the trachea from the top). Spacings are
``(z, y, x)`` in mm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from chestssl.data.ct.ops import check_spacing, resample

logger = logging.getLogger(__name__)

IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndi.generate_binary_structure(2, 1)  # labels 2D components of each axial slice at once
OUTSIDE_AIR_HU = -950.0  # below this a voxel is pure air (lung parenchyma is about -850 HU)
MAX_AIRWAY_AREA_MM2 = 1200.0  # a larger air region in a slice is a lung, not the trachea or a bronchus
MAX_FILLED_HOLE_MM2 = 1000.0  # holes filled inside a lung: vessels and nodules, not the heart


def lung_mask(
    hu: np.ndarray,
    spacing: Sequence[float],
    working_spacing_mm: float = 2.0,
    air_threshold: float = -320.0,
    min_volume_ml: float = 20.0,
) -> np.ndarray:
    """A classical lung mask (no learned weights): both lungs, trachea and main bronchi excluded.

    Stages, all at a working resolution of about ``working_spacing_mm`` (block-averaged, so a
    512x512 slice becomes about 170x170): air below ``air_threshold`` inside the body (outside air,
    the table and the mattress removed per slice); the trachea and main bronchi followed down from
    the top slices and removed; the one or two largest remaining air components kept, where lungs
    that touch at the junction lines are split by erosion (else kept as one component, logged);
    vessels and nodules filled by a closing and per-slice hole filling; the mask brought back to the
    input grid by linear interpolation. A series without lungs (abdomen) gives a small or empty mask.
    The field of view may be cropped inside the body (lungs touching the image border).

    Args:
        hu: array (z, y, x) in HU, canonical orientation (last slice most superior).
        spacing: (z, y, x) voxel spacing in mm.
        working_spacing_mm: the coarsest voxel size the mask is computed at.
        air_threshold: HU below which a voxel counts as air or lung parenchyma.
        min_volume_ml: air components smaller than this are never taken for a lung.

    Returns:
        Bool array of the shape of ``hu``, True inside the lungs.
    """
    spacing = check_spacing(spacing, hu)
    factors = tuple(max(1, round(working_spacing_mm / s)) for s in spacing)
    hu_small = _block_mean(hu, factors)  # (z, y, x) at the working resolution
    spacing_small = tuple(s * f for s, f in zip(spacing, factors))
    air = _inside_air(hu_small, air_threshold, spacing_small)
    airway = _track_airway(air, hu_small, spacing_small)
    lungs = _keep_lungs(air & ~airway, spacing_small, min_volume_ml)
    if not lungs.any():
        logger.warning("lung_mask: no lung-sized air component found; returning an empty mask")
        return np.zeros(hu.shape, dtype=bool)
    lungs = _largest_components(_fill_vessels(lungs, spacing_small), 2)
    soft = resample(lungs.astype(np.float32), spacing_small, spacing, "linear", shape_out=hu.shape)
    return soft > 0.5


def _inside_air(hu: np.ndarray, air_threshold: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Air below ``air_threshold`` inside the body: per slice, outside air is removed.

    The body is the largest component of denser voxels after a small in-plane opening (which
    detaches the table). Outside air is, per slice, a region outside the body that touches the image
    border; this takes the air around the patient, between table and back, and in the mattress.
    When the volume is cropped inside the body (few border voxels are pure air), lungs cut by the
    field of view touch the border too, so there only mostly pure-air regions (median below -950 HU;
    lung parenchyma is about -850) count as outside.
    """
    air = hu < air_threshold
    radius = max(1, round(3.0 / min(spacing[1:])))
    disk = ndi.iterate_structure(IN_PLANE, radius)
    body, n = ndi.label(ndi.binary_opening(~air, disk))
    body = body == np.argmax(np.bincount(body.ravel())[1:]) + 1 if n else np.zeros_like(air)
    labels, n = ndi.label(~body, IN_PLANE)
    count = np.bincount(labels.ravel(), minlength=n + 1)
    pure_air = np.bincount(labels.ravel(), weights=(hu < OUTSIDE_AIR_HU).ravel(), minlength=n + 1)
    outside = np.zeros(n + 1, dtype=bool)
    outside[_border_labels(labels)] = True
    edges = np.concatenate([e.ravel() for e in (hu[:, 0], hu[:, -1], hu[:, :, 0], hu[:, :, -1])])
    if np.mean(edges < OUTSIDE_AIR_HU) < 0.25:  # a crop inside the body: lungs may touch the border
        logger.debug("lung_mask: cropped field of view, keeping border regions that are not pure air")
        outside &= pure_air > 0.5 * count
    outside[0] = False
    return air & ~outside[labels]


def _track_airway(air: np.ndarray, hu: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Trachea and main bronchi: small central air regions followed down from the top slices.

    A seed is a small (< 8 cm^2), central (< 35 mm from the body's mid-line), pure-air region in the
    top 80 mm. It is followed slice by slice through overlapping regions while they stay small.
    Where the airway merges into a lung (its region becomes large) only its pure-air lumen is
    followed, for at most 30 mm (about the length of the main bronchi).
    """
    labels, n = ndi.label(air, IN_PLANE)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)
    area_mm2 = count * spacing[1] * spacing[2]
    mean_hu = np.bincount(flat, weights=hu.ravel(), minlength=n + 1) / np.maximum(count, 1)
    x_mm = np.broadcast_to(np.arange(air.shape[2], dtype=np.float32) * spacing[2], air.shape).ravel()
    centre_x = np.bincount(flat, weights=x_mm, minlength=n + 1) / np.maximum(count, 1)
    body = ~air & (hu > -500)
    body_x = (body * x_mm.reshape(air.shape)).sum(axis=(1, 2)) / np.maximum(body.sum(axis=(1, 2)), 1)
    small = (area_mm2 >= 20) & (area_mm2 <= 800)
    lowest_seed_slice = max(0, air.shape[0] - 1 - round(80 / spacing[0]))
    for z in range(air.shape[0] - 1, lowest_seed_slice - 1, -1):
        ids = np.unique(labels[z])[1:]
        seeds = ids[small[ids] & (mean_hu[ids] < -900) & (np.abs(centre_x[ids] - body_x[z]) < 35)]
        if len(seeds):
            break
    else:
        logger.info("lung_mask: no trachea found in the top 80 mm; airways are not removed")
        return np.zeros(air.shape, dtype=bool)
    disk = ndi.generate_binary_structure(2, 1)
    reach = ndi.iterate_structure(disk, max(1, round(5 / spacing[2])))
    airway = np.zeros(air.shape, dtype=bool)
    current, merged_at = np.isin(labels[z], seeds), None
    while current.any():
        airway[z] |= current
        if z == 0:
            break
        near = ndi.binary_dilation(current, reach)
        below = np.unique(labels[z - 1][near])
        below = below[below > 0]
        under = np.setdiff1d(labels[z - 1][current], [0])
        current = np.isin(labels[z - 1], below[area_mm2[below] <= MAX_AIRWAY_AREA_MM2])
        merged = under[area_mm2[under] > MAX_AIRWAY_AREA_MM2]  # the airway ran into a lung
        merged_at = (z if merged_at is None else merged_at) if len(merged) else None
        if len(merged) and (merged_at - z + 1) * spacing[0] <= 30:  # main bronchi: follow the lumen
            inside = np.isin(labels[z - 1], merged)
            lumen = near & inside & (hu[z - 1] < OUTSIDE_AIR_HU)
            current |= ndi.binary_dilation(lumen, disk) & inside
        z -= 1
    logger.debug("lung_mask: airway followed down to slice %d", z)
    return airway


def _keep_lungs(air: np.ndarray, spacing: tuple[float, ...], min_volume_ml: float) -> np.ndarray:
    """The largest air component and the second largest if it is at least 10% of the first.

    A single component holding both lungs (they touch at the junction lines) is split where it is
    narrowest when that is possible, and logged either way.
    """
    labels, n = ndi.label(air)
    if n == 0:
        return air
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1] + 1
    voxel_litres = float(np.prod(spacing)) / 1e6
    if sizes[order[0] - 1] * voxel_litres * 1000 < min_volume_ml:
        return np.zeros_like(air)
    second = sizes[order[1] - 1] if n > 1 else 0
    if second >= 0.1 * sizes[order[0] - 1] and second * voxel_litres * 1000 >= min_volume_ml:
        return np.isin(labels, order[:2])
    largest = labels == order[0]
    split = _split_touching_lungs(largest, spacing)
    if split is None:
        logger.info("lung_mask: one lung component (%.2f L); the lungs touch or one is missing",
                    sizes[order[0] - 1] * voxel_litres)
        return largest
    return split


def _split_touching_lungs(
    lungs: np.ndarray, spacing: tuple[float, ...], max_erosion_mm: float = 10.0
) -> np.ndarray | None:
    """Split one component holding both lungs into two, with a one-voxel gap at their junction.

    The component is eroded in-plane until it falls into two parts (each at least 15% of it, their
    centres at least 60 mm apart left-right); every voxel then goes to the nearer part. Returns None
    when no such split exists within ``max_erosion_mm``.
    """
    box = ndi.find_objects(lungs.astype(np.uint8))[0]
    lungs_box = lungs[box]
    x_mm = np.arange(lungs_box.shape[2]) * spacing[2]
    eroded = lungs_box
    for step in range(1, max(1, round(max_erosion_mm / spacing[2])) + 1):
        eroded = ndi.binary_erosion(eroded, IN_PLANE)
        parts, n = ndi.label(eroded)
        if n < 2:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        first, second = np.argsort(sizes)[::-1][:2] + 1
        if sizes[second - 1] < 0.15 * lungs_box.sum():
            continue
        centre_x = [(x_mm * (parts == p).sum(axis=(0, 1))).sum() / sizes[p - 1] for p in (first, second)]
        if abs(centre_x[0] - centre_x[1]) < 60:
            continue
        seeds = np.where(parts == first, 1, 0) + np.where(parts == second, 2, 0)
        nearest = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False,
                                             return_indices=True)
        side = np.where(lungs_box, seeds[tuple(nearest)], 0)  # (z, y, x) 0, 1 or 2
        junction = (side == 1) & ndi.binary_dilation(side == 2)
        split = np.zeros_like(lungs)
        split[box] = _largest_components((side > 0) & ~junction, 2)
        logger.info("lung_mask: the lungs touched; split at their junction after %.0f mm of erosion",
                    step * spacing[2])
        return split
    return None


def _fill_vessels(lungs: np.ndarray, spacing: tuple[float, ...], radius_mm: float = 5.0) -> np.ndarray:
    """Close each lung component and fill its per-slice holes (vessels, nodules) below 10 cm^2."""
    radius = [round(radius_mm / s) for s in spacing]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius)) <= 1
    labels, n = ndi.label(lungs)
    out = np.zeros(lungs.shape, dtype=np.int32)  # (z, y, x) lung index after filling
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        component = np.pad(labels[box] == index, [(r, r) for r in radius])
        closed = ndi.binary_closing(component, ball)
        holes, m = ndi.label(~closed, IN_PLANE)
        hole_area = np.bincount(holes.ravel(), minlength=m + 1) * spacing[1] * spacing[2]
        fill = hole_area < MAX_FILLED_HOLE_MM2
        fill[_border_labels(holes)] = False
        fill[0] = False
        closed |= fill[holes]
        inner = tuple(slice(r, r + (b.stop - b.start)) for r, b in zip(radius, box))
        out[box] = np.where(closed[inner] & (out[box] == 0), index, out[box])
    # Lungs filled one by one may meet again; keep a one-voxel gap wherever two of them touch.
    touching = ndi.grey_dilation(out, size=(3, 3, 3)) > out
    return (out > 0) & ~(touching & (out > 0) & (n > 1))


def _largest_components(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest 6-connected components of ``mask``."""
    labels, n = ndi.label(mask)
    if n <= count:
        return mask
    return np.isin(labels, np.argsort(np.bincount(labels.ravel())[1:])[::-1][:count] + 1)


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Labels present on the in-plane (y, x) border of a (z, y, x) label array."""
    edges = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    return np.unique(np.concatenate([e.ravel() for e in edges]))


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Average ``array`` over blocks of ``factors`` voxels (edge-padded to a whole number of blocks)."""
    array = np.asarray(array, dtype=np.float32)
    if all(f == 1 for f in factors):
        return array
    pad = [(0, -n % f) for n, f in zip(array.shape, factors)]
    array = np.pad(array, pad, mode="edge")
    nz, ny, nx = (n // f for n, f in zip(array.shape, factors))
    fz, fy, fx = factors
    return array.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5))  # (z, y, x) blocks
