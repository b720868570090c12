"""The patient-level train/val/test split recorded in a volume cache's manifest, so no test patient is pretrained on.

A unit is a patient: the row's ``patient_id``, else its ``id`` (each volume its own patient). Rules, in order:

1. a split already in a row (the user's CSV, an earlier run, a dataset builder's "pretrain") is kept;
2. a patient with a split keeps it for its new rows (test first where its rows disagree, so nothing leaks);
3. in a cache where nobody has a train/val/test split yet, the patients are split at once by
   :func:`~chestssl.data.splits.patient_split`: stratified by label (unlabelled rows are one stratum), 70/10/20,
   fixed by the seed;
4. patients added to a split cache are dealt, in a seeded order, one by one to the split of their stratum that is
   furthest below its 70/10/20 share, so earlier assignments never move and the shares stay close.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from chestssl.data.splits import patient_split

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)
PRECEDENCE = ("test", "val", "train")  # a patient whose rows disagree counts as its most protected split


def needs_split(row: dict[str, str]) -> bool:
    """A prepared (ok) row that has no split yet."""
    return row.get("status") == "ok" and not row.get("split")


def assign_splits(rows: list[dict[str, str]], seed: int = 0) -> int:
    """Fill in the ``split`` of every ok row that has none, in place (rules in the module docstring).

    Args:
        rows: manifest rows (``id``, ``status``, optional ``label``, ``patient_id``, ``split``).
        seed: the split's seed.

    Returns:
        How many rows were given a split.
    """
    todo = [row for row in rows if needs_split(row)]
    if not todo:
        return 0
    strata = _label_strata(rows)
    known: dict[str, list[str]] = defaultdict(list)  # patient -> the splits of its rows
    patient_stratum: dict[str, int] = {}  # a patient with any positive row counts as positive
    for row in rows:
        patient = _patient(row)
        patient_stratum[patient] = max(patient_stratum.get(patient, -1), strata[row.get("label") or ""])
        if row.get("split"):
            known[patient].append(row["split"])
    new = []
    for row in todo:
        splits = known.get(_patient(row))
        if splits:
            row["split"] = next((s for s in PRECEDENCE if s in splits), splits[0])
        else:
            new.append(row)
    if not new:
        return len(todo)
    if not any(split in SPLITS for splits in known.values() for split in splits):
        labels = np.array([strata[row.get("label") or ""] for row in new])
        patients = np.array([_patient(row) for row in new])
        for name, indices in zip(SPLITS, patient_split(labels, patients, FRACTIONS, seed)):
            for index in indices:
                new[index]["split"] = name
        return len(todo)
    _deal(new, known, patient_stratum, seed)
    return len(todo)


def _deal(new: list[dict[str, str]], known: dict[str, list[str]], patient_stratum: dict[str, int],
          seed: int) -> None:
    """Give each new patient the split of its stratum furthest below its share (rule 4)."""
    counts: dict[int, Counter] = defaultdict(Counter)  # stratum -> patients per split
    for patient, splits in known.items():
        split = next((s for s in PRECEDENCE if s in splits), None)
        if split is not None:
            counts[patient_stratum[patient]][split] += 1
    patients = sorted({_patient(row) for row in new})
    chosen = {}
    for index in np.random.default_rng(seed).permutation(len(patients)):
        patient = patients[index]
        count = counts[patient_stratum[patient]]
        total = sum(count[s] for s in SPLITS) + 1
        deficits = [fraction * total - count[name] for name, fraction in zip(SPLITS, FRACTIONS)]
        chosen[patient] = SPLITS[int(np.argmax(deficits))]  # ties go to the first: train, then val
        count[chosen[patient]] += 1
    for row in new:
        row["split"] = chosen[_patient(row)]


def _patient(row: dict[str, str]) -> str:
    return row.get("patient_id") or row["id"]


def _label_strata(rows: list[dict[str, str]]) -> dict[str, int]:
    """Label value -> stratum index (numbers in numeric order, then names); "" and "-1" (unlabelled) -> -1."""
    values = {row.get("label") or "" for row in rows} - {"", "-1"}
    numeric = lambda v: v.lstrip("-").isdigit()  # noqa: E731
    ordered = sorted(values, key=lambda v: (not numeric(v), int(v) if numeric(v) else 0, v))
    return {"": -1, "-1": -1} | {value: index for index, value in enumerate(ordered)}
