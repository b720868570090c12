import numpy as np
import pytest

from chestssl.data.splits import label_fraction, patient_split, stratum_keys
from chestssl.errors import DataError


def imbalanced(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.74).astype(np.int64)
    patients = np.array([f"p{i // 2}" for i in range(n)])  # two images per patient
    labels[1::2] = labels[::2]  # both images of a patient share the label
    return labels, patients


@pytest.mark.parametrize("use_patients", [False, True])
def test_fractions_are_nested_deterministic_and_stratified(use_patients):
    labels, patients = imbalanced()
    patients = patients if use_patients else None
    subsets = {f: label_fraction(labels, f, seed=7, patient_ids=patients) for f in (0.01, 0.1, 0.5, 1.0)}
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[0.5]) <= set(subsets[1.0])
    assert np.array_equal(subsets[0.1], label_fraction(labels, 0.1, seed=7, patient_ids=patients))
    assert not np.array_equal(subsets[0.1], label_fraction(labels, 0.1, seed=8, patient_ids=patients))
    for f in (0.1, 0.5):
        share = labels[subsets[f]].mean()
        assert abs(share - labels.mean()) < 0.03
        assert abs(len(subsets[f]) - f * len(labels)) <= 4


def test_patients_are_never_split_by_a_fraction():
    labels, patients = imbalanced()
    chosen = label_fraction(labels, 0.1, seed=0, patient_ids=patients)
    chosen_patients = set(patients[chosen])
    assert all(p in chosen_patients for p in patients[chosen])
    assert len(chosen) == 2 * len(chosen_patients)


def test_fraction_that_empties_a_class_is_a_clear_error():
    labels = np.array([0] * 20 + [1] * 980)
    with pytest.raises(DataError, match="leaves class 'normal'.*no example"):
        label_fraction(labels, 0.01, seed=0, class_names=("normal", "pneumonia"))


def test_pneumoniamnist_one_percent_keeps_both_classes():
    labels = np.array([0] * 1214 + [1] * 3494)
    chosen = label_fraction(labels, 0.01, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [12, 35]


def test_patient_split_is_disjoint_complete_and_repeatable():
    labels, patients = imbalanced()
    parts = patient_split(labels, patients, (0.7, 0.1, 0.2), seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    sets = [set(patients[p]) for p in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert [len(p) for p in parts] == [len(p) for p in patient_split(labels, patients, (0.7, 0.1, 0.2), seed=3)]
    assert abs(len(parts[0]) / len(labels) - 0.7) < 0.02


def test_multilabel_rows_stratify_by_their_rarest_finding():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert stratum_keys(labels).tolist() == [0, 1, -1, 2]
