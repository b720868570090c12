"""LIDC-IDRI nodule cubes on real VOIs (a subset of the index), the split on the whole index, and CT lung patches."""

import csv
import logging
from collections import Counter, defaultdict

import numpy as np
import pytest
from scipy import ndimage as ndi

from chestssl.data.ct.ops import window_hu
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.patches import ct_patches
from chestssl.data.ct.lidc import INDEX, SIDECAR, build_lidc_nodules, lidc_splits, nodule_id, nodule_label, read_index
from chestssl.data.ct.nodule_cube import nodule_cube
from chestssl.data.ct.cache import load_volume, read_manifest
from chestssl.errors import DataError

LIMIT = 12  # index rows spread over the 996 (the full build takes about 12-30 s on this machine)
THIN_VOI = "LIDC-IDRI-0003_R_3.nii.gz"  # 4 slices of 2.5 mm: 10 mm along z, padded to the 32 mm cube


@pytest.fixture(scope="module")
def lidc_dir(shared_data):
    return shared_data / "lidc-nodules"


@pytest.fixture(scope="module")
def index(lidc_dir):
    return read_index(lidc_dir)


@pytest.fixture(scope="module")
def cache(lidc_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lidc")
    build_lidc_nodules(lidc_dir, folder, limit=LIMIT)
    return folder


def test_cubes_have_the_shape_and_range(cache):
    rows = [row for row in read_manifest(cache) if row["status"] == "ok"]
    assert len(rows) == LIMIT
    for row in rows:
        image, lung = load_volume(cache / row["file"])
        assert image.shape == lung.shape == (32, 32, 32) and row["shape"] == "32x32x32"
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert 0.02 < lung.mean() < 1.0  # the lung slot marks lung inside the VOI, never the air padding


def test_a_thin_voi_is_centred_and_padded_with_air(lidc_dir):
    image, mask = read_ct(lidc_dir / "VOIs/image" / THIN_VOI), read_ct(lidc_dir / "VOIs/nodule_mask" / THIN_VOI)
    cube = nodule_cube(image.hu, mask.hu, image.spacing)
    assert np.abs(np.array(ndi.center_of_mass(cube.nodule)) - 15.5).max() <= 1.0
    assert cube.nodule_kept == 1.0
    slices = np.flatnonzero(cube.inside.any(axis=(1, 2)))
    assert len(slices) == 10  # 4 x 2.5 mm at 1 mm; the rest of z is padding
    outside = ~cube.inside
    assert outside[:slices[0]].all() and (cube.image[outside] == 0).all() and not cube.lung[outside].any()
    assert cube.image[cube.nodule].mean() > cube.image[cube.inside & ~cube.nodule].mean() + 0.1
    assert cube.lung[cube.nodule].all()  # the nodule belongs to the lung region


def test_labels_and_patients_come_from_the_index(cache, index):
    """The default rule is the common protocol: score < 3 benign, > 3 malignant, 3 unlabelled."""
    by_id = {nodule_id(row): row for row in index}
    for row in read_manifest(cache):
        score = float(by_id[row["id"]]["Malignancy_value"])
        assert row["label"] == ("0" if score < 3 else "1" if score > 3 else "")
        assert row["patient_id"] == by_id[row["id"]]["patient_id"]
    with (cache / SIDECAR).open() as stream:
        sidecar = list(csv.DictReader(stream))
    assert {row["diagnosis"] for row in sidecar} <= {"Benign", "Malign"} and len(sidecar) == LIMIT


def test_the_split_is_patient_level_deterministic_and_stratified(index):
    splits = lidc_splits(index, seed=0)
    assert splits == lidc_splits(index, seed=0) and splits != lidc_splits(index, seed=1)
    patients = defaultdict(set)
    for row, split in zip(index, splits):
        patients[row["patient_id"]].add(split)
    assert all(len(names) == 1 for names in patients.values())
    malignant = np.array([row["Diagnosis"] == "Malign" for row in index])
    for name, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        members = np.array(splits) == name
        assert abs(members.mean() - fraction) < 0.03
        assert abs(malignant[members].mean() - malignant.mean()) < 0.05, name


def test_two_builds_give_the_same_split_as_the_whole_index(cache, lidc_dir, index, tmp_path):
    build_lidc_nodules(lidc_dir, tmp_path, limit=LIMIT, workers=2)  # the process pool builds the same cubes
    first, second = read_manifest(cache), read_manifest(tmp_path)
    assert first == second
    for row in first:
        for one, other in zip(load_volume(cache / row["file"]), load_volume(tmp_path / row["file"])):
            assert np.array_equal(one, other)
    expected = {nodule_id(row): split for row, split in zip(index, lidc_splits(index, seed=0))}
    assert all(row["split"] == expected[row["id"]] for row in first)


def test_rows_without_an_image_fail_with_a_reason(lidc_dir, index, tmp_path):
    data = tmp_path / "data"  # an index of the four LIDC-IDRI-1002 rows beside the real VOIs
    data.mkdir()
    (data / "VOIs").symlink_to(lidc_dir / "VOIs")
    rows = [row for row in index if row["patient_id"] == "LIDC-IDRI-1002"]
    with (data / INDEX).open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_lidc_nodules(data, tmp_path / "cache")
    manifest = read_manifest(tmp_path / "cache")
    failed = [row for row in manifest if row["status"] == "failed"]
    assert len(manifest) == 4 and len(failed) == 2
    assert all("no VOI image" in row["reason"] and "mask" in row["reason"] for row in failed)


def test_a_rerun_builds_nothing_and_refuses_other_settings(cache, lidc_dir, caplog):
    times = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}
    with caplog.at_level(logging.INFO, logger="chestssl.data.ct.lidc"):
        build_lidc_nodules(lidc_dir, cache, limit=LIMIT)
    assert "0 built, 0 failed, 12 already done" in caplog.text
    assert times == {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npz")}
    with pytest.raises(DataError, match="another cache_dir"):
        build_lidc_nodules(lidc_dir, cache, size=16, limit=LIMIT)


def test_ct_patches_are_made_like_the_cubes_and_mostly_lung(shared_data, cache, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "preprocessing.json").write_text((cache / "preprocessing.json").read_text())  # 32^3, 1 mm, [-1000, 400]
    chest, abdomen = shared_data / "ct/pyradiomics/lung1_image.nrrd", shared_data / "ct/totalsegmentator/abdomen_ct_dicom"
    assert ct_patches([chest, abdomen], patches, per_volume=4, seed=0) == patches / "manifest.csv"
    manifest = read_manifest(patches)
    crops = [row for row in manifest if row["status"] == "ok"]
    assert len(crops) == 4 and {row["split"] for row in manifest} == {"pretrain"}
    assert all(row["label"] == "" and row["source"].startswith(f"{chest}@") and row["spacing_mm"] == "1x1x1"
               for row in crops)
    [failed] = [row for row in manifest if row["status"] == "failed"]  # lung bases only: one row, with the reason
    assert failed["source"] == str(abdomen) and "no 32^3 crop at 1 mm is 50% lung" in failed["reason"]

    volume = read_ct(chest)  # the crops hold HU windowed like the cubes, at 1 mm
    hu_range = window_hu(np.array([volume.hu.min(), volume.hu.max()]), -1000, 400)
    for row in crops:
        image, crop_lung = load_volume(patches / row["file"])
        assert image.shape == (32, 32, 32) and crop_lung.mean() >= 0.5
        assert hu_range[0] - 1e-3 <= image.min() and image.max() <= hu_range[1] + 1e-3
        assert image[crop_lung].mean() < 0.3  # lung parenchyma: about -850 HU -> 0.11 in [-1000, 400]

    ct_patches([chest, abdomen], patches, per_volume=4, seed=0)  # a re-run keeps the crops and the failure
    assert read_manifest(patches) == manifest
    with pytest.raises(DataError, match="no preprocessing.json"):
        ct_patches([chest], tmp_path / "empty")


def test_the_label_rules_count_as_published_and_a_cache_keeps_its_rule(lidc_dir, tmp_path):
    index = read_index(lidc_dir)
    counts = Counter(nodule_label(row) for row in index)
    assert (counts["0"], counts["1"], counts[""]) == (377, 255, 364)  # benign, malignant, indeterminate (score 3)
    max_vote = Counter(nodule_label(row, "max-vote") for row in index)
    assert max_vote[""] == 0 and sum(nodule_label(row, "max-vote") == "1" and float(row["Malignancy_value"]) < 3
                                     for row in index) == 40  # scored 1-2 yet malignant by max vote
    build_lidc_nodules(lidc_dir, tmp_path, limit=4, labels="max-vote")
    with pytest.raises(DataError, match="another cache_dir"):
        build_lidc_nodules(lidc_dir, tmp_path, limit=4)
