"""HU window, resampling, crop/resize on hand-made arrays; the lung mask on the real chest CTs."""

import functools
import logging

import numpy as np
import pytest
from scipy import ndimage as ndi

from chestssl.data.ct.chest_checks import check_hu, lung_problems
from chestssl.data.ct.ops import crop_to_mask, mask_bounding_box, resample, resize_to_cube, window_hu
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.lung_mask import lung_mask

FULL_CHESTS = {  # full field of view: outside air around the body
    "lung1": "ct/pyradiomics/lung1_image.nrrd",
    "lung2": "ct/pyradiomics/lung2_image.nrrd",
    "lung_pet_ct_dx": "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2",
}
CROPPED_CHESTS = {  # cropped to heart and lungs: lungs touch the image border, partly cut off
    "aorta_crop": "ct/totalsegmentator/aorta_report_ct_cropped.nii.gz",
    "pulmonary_crop": "ct/totalsegmentator/pulmonary_report_ct_cropped.nii.gz",
}
LITRES_RANGE = {name: (1.5, 9.0) for name in FULL_CHESTS} | {name: (1.0, 6.0) for name in CROPPED_CHESTS}


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@functools.cache
def volume_and_mask(path: str):
    """Read a real volume and compute its lung mask once for all tests; also what lung_mask logged."""
    volume = read_ct(path)
    messages, logger = _Messages(), logging.getLogger("chestssl.data.ct.lung_mask")
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        mask = lung_mask(volume.hu, volume.spacing)
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return volume, mask, " ".join(messages.lines)


def test_window_hu_on_hand_made_values():
    hu = np.array([-3024, -1000, -400, 200, 1500], dtype=np.int16)
    out = window_hu(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_hu(np.array([-160.0, 40.0, 240.0]), low=-160, high=240), [0, 0.5, 1])
    with pytest.raises(ValueError, match="high > low"):
        window_hu(hu, low=100, high=100)


def test_resample_keeps_physical_positions():
    x_mm = (np.arange(20) + 0.5) * 1.0  # voxel centres along x at 1 mm
    ramp = np.broadcast_to(x_mm, (4, 6, 20)).astype(np.float32)
    half = resample(ramp, (2.0, 1.0, 1.0), (2.0, 1.0, 0.5))
    assert half.shape == (4, 6, 40) and half.dtype == np.float32
    np.testing.assert_allclose(half[0, 0, 1:-1], (np.arange(1, 39) + 0.5) * 0.5, atol=1e-4)  # interior
    back = resample(half, (2.0, 1.0, 0.5), (2.0, 1.0, 1.0), order="nearest")
    assert back.shape == ramp.shape
    with pytest.raises(ValueError, match="order must be one of"):
        resample(ramp, (1, 1, 1), (2, 2, 2), order="cubic")


def test_resample_mask_stays_bool_and_nearest():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 3:7, 4:6] = True
    up = resample(mask, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), order="linear")
    assert up.dtype == bool and up.shape == (20, 20, 20) and up.sum() == mask.sum() * 8


def test_crop_to_mask_uses_a_margin_in_mm():
    volume = np.arange(20 * 30 * 40).reshape(20, 30, 40)
    mask = np.zeros(volume.shape, bool)
    mask[10, 10:12, 20] = True
    box = mask_bounding_box(mask, (5.0, 1.0, 0.5), margin_mm=4.0)
    assert box == (slice(9, 12), slice(6, 16), slice(12, 29))
    np.testing.assert_array_equal(crop_to_mask(volume, mask, (5.0, 1.0, 0.5), 4.0), volume[box])
    assert crop_to_mask(mask, mask, (1, 1, 1), margin_mm=100).shape == mask.shape  # clipped to the array
    with pytest.raises(ValueError, match="empty"):
        crop_to_mask(volume, np.zeros_like(mask), (1, 1, 1))


def test_resize_to_cube_shapes_and_mask_values():
    volume = np.random.default_rng(0).normal(size=(7, 30, 25)).astype(np.float32)
    cube = resize_to_cube(volume, 16)
    assert cube.shape == (16, 16, 16) and cube.dtype == np.float32
    assert volume.min() - 1e-5 <= cube.min() and cube.max() <= volume.max() + 1e-5  # linear: no overshoot
    mask = resize_to_cube((volume > 0).astype(np.uint8), 16, is_mask=True)
    assert mask.dtype == bool and 0 < mask.mean() < 1


def test_lung_mask_of_a_volume_without_air_is_empty():
    soft_tissue = np.full((12, 64, 64), 40, np.int16)
    assert not lung_mask(soft_tissue, (5.0, 0.8, 0.8)).any()


def phantom_chest(junction: bool):
    """A (40, 128, 128) chest at (5, 2.5, 2.5) mm: body, two lungs, a trachea running into both.

    With ``junction`` the lungs touch in front of the mediastinum (a thin band of lung, like the
    anterior junction line), so they form one air component.
    """
    z, y, x = np.ogrid[:40, :128, :128]
    hu = np.full((40, 128, 128), -1000.0)
    hu[np.broadcast_to(((y - 64) / 50) ** 2 + ((x - 64) / 60) ** 2 <= 1, hu.shape)] = 40
    lungs = np.zeros(hu.shape, bool)
    for centre_x in (36, 92):
        lungs |= ((z - 18) / 14) ** 2 + ((y - 64) / 32) ** 2 + ((x - centre_x) / 20) ** 2 <= 1
    if junction:
        lungs |= np.broadcast_to((np.abs(z - 18) <= 8) & (np.abs(y - 44) <= 1) & (np.abs(x - 64) <= 14), hu.shape)
    trachea = np.broadcast_to((z >= 22) & ((y - 50) ** 2 + (x - 64) ** 2 <= 16), hu.shape)
    bronchi = np.broadcast_to((z >= 20) & (z <= 22) & (np.abs(y - 50) <= 3) & (np.abs(x - 64) <= 30), hu.shape)
    hu[lungs] = -850
    hu[trachea | bronchi] = -1000
    hu += np.random.default_rng(0).normal(0, 15, hu.shape)
    return hu.astype(np.float32), lungs, trachea


@pytest.mark.parametrize("junction", [False, True], ids=["apart", "touching"])
def test_lung_mask_on_a_phantom_keeps_lungs_and_drops_trachea(junction):
    hu, lungs, trachea = phantom_chest(junction)
    assert ndi.label(lungs)[1] == (1 if junction else 2)
    mask = lung_mask(hu, (5.0, 2.5, 2.5))
    assert ndi.label(mask)[1] == 2  # lungs that touch are split at their junction
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.95, dice
    assert mask[trachea & ~lungs].mean() < 0.02


@pytest.mark.parametrize("name", list(FULL_CHESTS) + list(CROPPED_CHESTS))
def test_lung_mask_volume_and_components(shared_data, name):
    volume, mask, logged = volume_and_mask(str(shared_data / {**FULL_CHESTS, **CROPPED_CHESTS}[name]))
    assert mask.dtype == bool and mask.shape == volume.hu.shape
    litres = mask.sum() * np.prod(volume.spacing) / 1e6
    low, high = LITRES_RANGE[name]
    assert low <= litres <= high, f"{name}: lung volume {litres:.2f} L outside [{low}, {high}]"
    labels, count = ndi.label(mask)
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1] * np.prod(volume.spacing) / 1e6
    # Two lungs, each at least 0.3 L, or one component holding both, which lung_mask must have logged.
    assert (count == 2 and sizes[1] >= 0.3) or (count == 1 and "one lung component" in logged), sizes
    assert np.median(volume.hu[mask]) < -600, "the mask should be mostly aerated lung"


@pytest.mark.parametrize("name", list(FULL_CHESTS))
def test_lung_mask_inside_body_and_away_from_border(shared_data, name):
    volume, mask, _ = volume_and_mask(str(shared_data / FULL_CHESTS[name]))
    body, count = ndi.label(volume.hu > -500)
    body = body == np.argmax(np.bincount(body.ravel())[1:]) + 1
    body = np.stack([ndi.binary_fill_holes(s) for s in body])
    assert np.mean(body[mask]) > 0.99, "the lung mask should lie inside the body"
    edges = [mask[:, 0, :], mask[:, -1, :], mask[:, :, 0], mask[:, :, -1]]
    assert not any(e.any() for e in edges), "no outside air: nothing may touch the in-plane border"


@pytest.mark.parametrize("name", list(FULL_CHESTS) + list(CROPPED_CHESTS))
def test_lung_mask_excludes_trachea(shared_data, name):
    volume, mask, _ = volume_and_mask(str(shared_data / {**FULL_CHESTS, **CROPPED_CHESTS}[name]))
    # The trachea in the top slices: a small round region of pure air near the body's mid-line.
    checked = 0
    for z in range(volume.hu.shape[0] - 1, volume.hu.shape[0] - 1 - round(30 / volume.spacing[0]), -1):
        regions, count = ndi.label(volume.hu[z] < -950)
        area_mm2 = np.bincount(regions.ravel())[1:] * volume.spacing[1] * volume.spacing[2]
        centre_x = np.array([c[1] for c in ndi.center_of_mass(regions > 0, regions, range(1, count + 1))])
        body_x = np.nonzero(volume.hu[z] > -500)[1].mean()
        central = np.abs(centre_x - body_x) * volume.spacing[2] < 30
        for label in np.flatnonzero((area_mm2 > 80) & (area_mm2 < 600) & central) + 1:
            assert mask[z][regions == label].mean() < 0.05, f"trachea in the mask at slice {z}"
            checked += 1
    assert checked >= 2, "the trachea should be visible in the top 30 mm of every chest volume"


def test_lung_mask_on_abdomen_does_not_crash(shared_data):
    volume = read_ct(shared_data / "ct/totalsegmentator/abdomen_ct_dicom")
    mask = lung_mask(volume.hu, volume.spacing)
    assert mask.shape == volume.hu.shape and mask.dtype == bool
    assert mask.sum() * np.prod(volume.spacing) / 1e6 < 0.3  # lung bases at most


@pytest.mark.parametrize("name", list(FULL_CHESTS) + list(CROPPED_CHESTS))
def test_every_real_chest_is_hu_and_its_lung_mask_is_lungs(shared_data, name):
    volume, mask, _ = volume_and_mask(str(shared_data / {**FULL_CHESTS, **CROPPED_CHESTS}[name]))
    check_hu(volume.hu)
    assert lung_problems(volume.hu, mask, volume.spacing) == []


def test_real_abdomen_is_hu(shared_data):
    check_hu(read_ct(shared_data / "ct/totalsegmentator/abdomen_ct_dicom").hu)  # refused for its lungs, not its HU
