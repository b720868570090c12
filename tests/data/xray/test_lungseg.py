"""The lung segmentation sets: real files, label maps kept exact, one fixed patient-level split."""

import numpy as np
import pytest

from chestssl.data.datasets import load_dataset
from chestssl.data.splits import label_count, load_splits
from chestssl.data.xray.lungseg import COVID_CLASSES, resize_label_map
from chestssl.errors import DataError


def test_a_resized_label_map_keeps_only_its_own_classes():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[5:20, 5:15], labels[5:20, 25:35], labels[22:35, 10:30] = 1, 2, 3
    small = resize_label_map(labels, 16)
    assert small.shape == (16, 16) and set(np.unique(small)) == {0, 1, 2, 3}  # nearest: no blended values
    assert resize_label_map(labels, 40) is not labels and np.array_equal(resize_label_map(labels, 40), labels)


@pytest.mark.parametrize("name, classes, count", [("cxr-lungseg", ("background", "lung"), 72),
                                                   ("cxr-lungseg-covid", COVID_CLASSES, 42)])
def test_the_sets_load_as_label_maps_with_a_patient_disjoint_split(shared_data, name, classes, count):
    dataset = load_dataset(name, data_dir=shared_data, image_size=64)
    assert len(dataset) == count and dataset.task == "segmentation" and dataset.class_names == classes
    assert dataset.images.shape == (count, 1, 64, 64) and dataset.labels.shape == (count, 64, 64)
    assert set(np.unique(dataset.labels)) == set(range(len(classes)))
    for k in range(1, len(classes)):  # every class covers a plausible part of every image
        share = (dataset.labels == k).mean(axis=(1, 2))
        assert (share > 0.02).all() and (share < 0.5).all(), classes[k]
    parts = {part: set(dataset.patient_ids[dataset.split == part]) for part in ("train", "val", "test")}
    assert all(parts.values())
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["val"] and not parts["val"] & parts["test"]
    again = load_splits(name, str(shared_data), 64, split_seed=7)  # the split is fixed: the same test images
    assert set(again["test"].patient_ids) == parts["test"]


def test_the_montgomery_shenzhen_split_keeps_both_hospitals_in_test(shared_data):
    dataset = load_dataset("cxr-lungseg", data_dir=shared_data, image_size=32)
    test = dataset.patient_ids[dataset.split == "test"]
    assert any(p.startswith("MCUCXR") for p in test) and any(p.startswith("CHNCXR") for p in test)


def test_label_counts_are_whole_patients_and_nested():
    patients = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    subsets = [set(label_count(patients, n, seed=3).tolist()) for n in (1, 3, 5, 8)]
    for small, large in zip(subsets, subsets[1:]):
        assert small <= large
    for subset, wanted in zip(subsets, (1, 3, 5, 8)):
        chosen = patients[sorted(subset)]
        assert len(subset) >= wanted and all((patients == p).sum() == (chosen == p).sum() for p in set(chosen))
    assert set(label_count(np.array(list("abcdef")), 4, seed=0)) == set(label_count(np.array(list("abcdef")), 4, seed=0))
    with pytest.raises(DataError, match="ask for 1 to 8"):
        label_count(patients, 9, seed=0)
