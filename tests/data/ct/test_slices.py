"""sarscov2-ct: runs of one patient's slices never cross splits; the slice-level split does leak them."""

import numpy as np

from chestssl.data.ct.slices import series_runs
from chestssl.data.datasets import load_dataset


def test_runs_start_where_the_slice_area_drops():
    classes = np.array([0, 0, 0, 0, 1, 1])
    order = np.array([3, 1, 2, 4, 1, 2])
    areas = np.array([110, 100, 105, 60, 50, 52])  # class 0 in file order: 100, 105, 110, 60 -> a new run at 60
    runs = series_runs(classes, order, areas)
    assert runs[1] == runs[2] == runs[0] != runs[3] and runs[4] == runs[5]


def test_the_run_split_keeps_every_run_in_one_split_and_the_slice_split_does_not(shared_data):
    data = load_dataset("sarscov2-ct", shared_data, image_size=32)
    assert len(data) == 2435 and data.images.shape[1:] == (1, 32, 32)
    assert len(np.unique(data.patient_ids)) == 116  # the source has 120 patients
    for run in np.unique(data.patient_ids):
        assert len(set(data.split[data.patient_ids == run])) == 1, run
    assert {name: int((data.split == name).sum()) for name in ("train", "val", "test")}["test"] > 300
    leaky = load_dataset("sarscov2-ct-slices", shared_data, image_size=32)
    crossing = sum(len(set(leaky.split[data.patient_ids == run])) > 1 for run in np.unique(data.patient_ids))
    assert crossing > 100  # nearly every patient's slices land in several splits
