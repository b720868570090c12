"""Only chest CTs in HU reach the cache: abdomens with gas below a soft-tissue dome and 8-bit volumes are refused."""

import csv

import numpy as np
import pytest
import phantoms

from chestssl.data.ct.cache import read_manifest
from chestssl.data.ct.chest_checks import check_hu, lung_problems
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume
from chestssl.data.ct.prepare import prepare_ct
from chestssl.errors import DataError

CONFIG = PrepareCTConfig(size=16, spacing_mm=3.0)  # the phantoms' own grid: no resampling


def test_chest_phantom_passes():
    image, lung, info = preprocess_volume(phantoms.as_volume(phantoms.chest()), CONFIG)
    assert info["mask"] == "auto" and 1200 < info["lung_ml"] < 2200 and lung.any()


@pytest.mark.parametrize("kind, reason", [
    ("gas", r"not a chest CT: the \d+ ml lung candidate is \d+% lung-density tissue .*gas, not lung parenchyma"),
    ("stool", r"not a chest CT: the \d+ ml lung candidate lies low in the body"),
])
def test_abdomen_with_gas_pockets_below_a_soft_tissue_dome_is_refused(kind, reason):
    hu = phantoms.abdomen(kind)
    assert (hu < -500).sum() * 27 / 1000 > 150  # well over min_lung_ml of "lung": accepted by a volume check alone
    with pytest.raises(DataError, match=reason):
        preprocess_volume(phantoms.as_volume(hu), CONFIG)


@pytest.mark.parametrize("with_mask", [False, True], ids=["auto mask", "user mask"])
def test_eight_bit_volume_is_refused_as_not_hu(with_mask):
    volume = phantoms.as_volume(phantoms.eight_bit(phantoms.chest()))
    mask = phantoms.chest_lungs() if with_mask else None
    with pytest.raises(DataError, match=r"^not HU: the darkest voxels are at 0 "):
        preprocess_volume(volume, CONFIG, mask)


@pytest.mark.parametrize("values, ok", [
    (lambda hu: hu, True),
    (lambda hu: np.where(hu < -1200, -3024, hu), True),  # padding outside the field of view is not air
    (lambda hu: hu + 1024, False),  # stored values without RescaleIntercept
    (lambda hu: (hu + 1000) / 1200, False),  # normalised to [0, 1]
    (lambda hu: hu * 16, False),  # a wrong RescaleSlope
])
def test_check_hu_on_hand_made_scales(values, ok):
    hu = phantoms.chest()
    hu[:, :4, :4] = -3024  # a corner outside the reconstruction circle
    scaled = values(hu).astype(np.float32)
    if ok:
        check_hu(scaled)
    else:
        with pytest.raises(DataError, match="not HU"):
            check_hu(scaled)


def test_prepare_ct_records_each_refusal_and_goes_on(tmp_path):
    """Through prepare-ct: every refusal is a manifest row with its reason, and the chest is still prepared."""
    chest, eight_bit = phantoms.chest(), phantoms.eight_bit(phantoms.chest())
    files = {
        "abdomen": phantoms.write_image(tmp_path / "abdomen.mha", phantoms.abdomen("gas")),
        "eight_bit": phantoms.write_image(tmp_path / "eight_bit.mha", eight_bit),
        "chest": phantoms.write_image(tmp_path / "chest.mha", chest),
    }
    phantoms.write_image(tmp_path / "masked.mha", eight_bit)
    phantoms.write_image(tmp_path / "mask.mha", phantoms.chest_lungs().astype(np.uint8))
    with open(tmp_path / "cases.csv", "w", newline="") as stream:
        csv.writer(stream).writerows([["path", "id", "mask"], ["masked.mha", "eight-bit-with-mask", "mask.mha"]])
    config = PrepareCTConfig(inputs=tuple(str(p) for p in files.values()), manifest_csv=str(tmp_path / "cases.csv"),
                             cache_dir=str(tmp_path / "cache"), size=16, spacing_mm=3.0, workers=1)
    rows = {row["source"]: row for row in read_manifest(prepare_ct(config).parent)}
    assert rows[str(files["chest"])]["status"] == "ok"
    assert rows[str(files["abdomen"])]["status"] == "failed"
    assert rows[str(files["abdomen"])]["reason"].startswith("not a chest CT")
    for source in (str(files["eight_bit"]), "masked.mha"):
        assert rows[source]["status"] == "failed" and rows[source]["reason"].startswith("not HU"), rows[source]
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npz")) == [rows[str(files["chest"])]["file"]]


def test_lung_problems_of_a_one_sided_candidate():
    hu = phantoms.chest()
    lungs = phantoms.chest_lungs()
    lungs[:, :, 48:] = False  # one lung only
    problems = lung_problems(hu, lungs, phantoms.SPACING)
    assert len(problems) == 1 and "one side" in problems[0]
