"""prepare-ct records a stratified, patient-level train/val/test split; ensure_splits adds one to older caches."""

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import chestssl.data.ct.cache as cache_module
from chestssl.data.ct.cache import MANIFEST, ensure_splits, read_manifest
from chestssl.data.ct.manifest_splits import assign_splits
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.ct.prepare import prepare_ct
from chestssl.data.splits import patient_split
from chestssl.errors import DataError


def write(path: Path, array: np.ndarray) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(path))
    return path.name


def cases(folder: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """Small CTs (air around a -850 HU box) with user masks and a CSV of (id, label, patient_id, split)."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.full((8, 16, 16), -1000, np.int16)
    hu[2:6, 4:12, 4:12] = -850
    mask = write(folder / "mask.mha", (hu == -850).astype(np.uint8))
    lines = [["path", "id", "label", "patient_id", "split", "mask"]]
    for case_id, label, patient, split in rows:
        lines.append([write(folder / f"{case_id}.mha", hu), case_id, label, patient, split, mask])
    with open(folder / "cases.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(lines)
    return folder / "cases.csv"


def prepare(csv_path: Path, cache: Path, split_seed: int = 0) -> dict[str, dict[str, str]]:
    config = PrepareCTConfig(manifest_csv=str(csv_path), cache_dir=str(cache), size=8, workers=1,
                             split_seed=split_seed)
    return {row["id"]: row for row in read_manifest(prepare_ct(config).parent)}


# 30 patients, half with two volumes; labels 0/1, alternating; no user splits
PATIENTS = [(f"c{i:02d}{'ab'[k]}", str(i % 2), f"P{i:02d}", "") for i in range(30) for k in range(1 + i % 2)]


def patient_disjoint(rows: dict[str, dict[str, str]]) -> bool:
    splits = defaultdict(set)
    for row in rows.values():
        splits[row["patient_id"] or row["id"]].add(row["split"])
    return all(len(names) == 1 for names in splits.values())


def test_prepared_cache_has_a_patient_level_split_for_every_ok_row(tmp_path):
    rows = prepare(cases(tmp_path / "in", PATIENTS), tmp_path / "cache")
    assert len(rows) == 45 and all(row["status"] == "ok" for row in rows.values())
    assert {row["split"] for row in rows.values()} == {"train", "val", "test"} and patient_disjoint(rows)
    per_split = defaultdict(set)
    for row in rows.values():
        per_split[row["split"]].add(row["patient_id"])
    counts = {name: len(p) for name, p in per_split.items()}  # 70/10/20 of 30, rounded in each label's 15
    assert 20 <= counts["train"] <= 22 and 2 <= counts["val"] <= 4 and 5 <= counts["test"] <= 7, counts
    for name in ("train", "test"):  # stratified: both labels in each
        assert {rows[k]["label"] for k in rows if rows[k]["split"] == name} == {"0", "1"}
    again = prepare(cases(tmp_path / "in2", PATIENTS), tmp_path / "cache2")  # the same inputs elsewhere
    assert {k: r["split"] for k, r in again.items()} == {k: r["split"] for k, r in rows.items()}
    other_seed = prepare(cases(tmp_path / "in3", PATIENTS), tmp_path / "cache3", split_seed=1)
    assert {k: r["split"] for k, r in other_seed.items()} != {k: r["split"] for k, r in rows.items()}


def test_user_split_wins_and_a_rerun_keeps_earlier_assignments(tmp_path):
    first = PATIENTS[:20] + [("given", "1", "P99", "test")]
    rows = prepare(cases(tmp_path / "in", first), tmp_path / "cache")
    assert rows["given"]["split"] == "test"
    more = first + [(f"new{i}", str(i % 2), f"N{i}", "") for i in range(10)] + [("c01b2", "1", "P01", "")]
    rerun = prepare(cases(tmp_path / "in", more), tmp_path / "cache")
    assert all(rerun[k]["split"] == rows[k]["split"] for k in rows)  # nothing assigned before moves
    assert rerun["c01b2"]["split"] == rows["c01a"]["split"]  # a known patient's new volume joins its split
    assert patient_disjoint(rerun) and {rerun[f"new{i}"]["split"] for i in range(10)} <= {"train", "val", "test"}
    counts = defaultdict(set)
    for row in rerun.values():
        counts[row["split"]].add(row["patient_id"])
    assert abs(len(counts["test"]) / sum(map(len, counts.values())) - 0.2) < 0.08  # shares kept near 70/10/20
    with pytest.raises(DataError, match="line 2: split 'holdout'"):
        prepare(cases(tmp_path / "bad", [("x", "0", "P1", "holdout")]), tmp_path / "cache4")


def old_manifest(cache: Path, rows: list[dict[str, str]]) -> None:
    """A manifest as written before splits were recorded: no split column at all."""
    cache.mkdir()
    columns = ["id", "source", "status", "reason", "file", "label", "patient_id", "shape", "spacing_mm", "lung_ml"]
    with open(cache / MANIFEST, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


OLD_ROWS = [{"id": f"v{i}", "source": f"v{i}.nii", "status": "ok", "file": f"v{i}.npz", "label": str(i % 2),
             "patient_id": f"P{i // 2}"} for i in range(40)] + [{"id": "bad", "status": "failed", "reason": "x"}]


def test_ensure_splits_writes_a_split_into_an_old_manifest(tmp_path):
    old_manifest(tmp_path / "a", OLD_ROWS)
    assert "split" not in (tmp_path / "a" / MANIFEST).read_text().splitlines()[0]
    rows = ensure_splits(tmp_path / "a")
    assert [row["id"] for row in rows] == [row["id"] for row in OLD_ROWS]
    assert all(row["split"] in ("train", "val", "test") for row in rows if row["status"] == "ok")
    assert [row for row in rows if row["id"] == "bad"][0]["split"] == ""
    assert read_manifest(tmp_path / "a") == rows  # written into the manifest
    ok = [row for row in OLD_ROWS if row["status"] == "ok"]
    expected = patient_split(np.array([int(r["label"]) for r in ok]), np.array([r["patient_id"] for r in ok]),
                             (0.7, 0.1, 0.2), 0)  # the split fine-tuning drew from the same rows
    for name, indices in zip(("train", "val", "test"), expected):
        assert {rows[i]["split"] for i in indices} == {name}
    mtime = (tmp_path / "a" / MANIFEST).stat().st_mtime_ns
    assert ensure_splits(tmp_path / "a") == rows and (tmp_path / "a" / MANIFEST).stat().st_mtime_ns == mtime
    old_manifest(tmp_path / "b", OLD_ROWS)
    assert ensure_splits(tmp_path / "b") == rows  # deterministic
    old_manifest(tmp_path / "c", OLD_ROWS)
    assert ensure_splits(tmp_path / "c", split_seed=3) != rows
    with pytest.raises(DataError, match="no manifest.csv"):
        ensure_splits(tmp_path / "none")


def test_assign_splits_keeps_given_splits_and_protects_test_patients():
    rows = [{"id": "a", "status": "ok", "patient_id": "P", "split": "test"},
            {"id": "b", "status": "ok", "patient_id": "P", "split": "train"},  # the user's, inconsistent
            {"id": "c", "status": "ok", "patient_id": "P"},
            {"id": "d", "status": "ok", "patient_id": "Q", "split": "pretrain"},
            {"id": "e", "status": "ok", "patient_id": "Q"},
            {"id": "f", "status": "failed", "patient_id": "R"}]
    assert assign_splits(rows) == 2
    assert [row.get("split") for row in rows] == ["test", "train", "test", "pretrain", "pretrain", None]



def test_ensure_splits_on_a_read_only_cache_computes_the_same_split(tmp_path, monkeypatch):
    old_manifest(tmp_path / "writable", OLD_ROWS)
    old_manifest(tmp_path / "read_only", OLD_ROWS)
    expected = ensure_splits(tmp_path / "writable")

    def read_only(cache_dir, wait_s=0.0):  # what os.open raises in a folder this user cannot write
        raise PermissionError(13, "Permission denied", str(Path(cache_dir) / ".lock"))

    monkeypatch.setattr(cache_module, "cache_lock", read_only)
    assert ensure_splits(tmp_path / "read_only") == expected
    assert "split" not in (tmp_path / "read_only" / MANIFEST).read_text().splitlines()[0]  # nothing written
