"""Every DICOM series of a tree is an input with its own manifest row, wherever its files sit (DICOMDIR exports)."""

from pathlib import Path

import numpy as np
import phantoms
import pydicom
from dicom_factory import write_slice, write_volume
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from chestssl.data.ct.cache import read_manifest
from chestssl.data.ct.files import short_hash
from chestssl.data.ct.inputs import discover_inputs
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.ct.prepare import prepare_ct


def cd_export(root: Path, staging: Path, patients: tuple[str, ...]) -> dict[str, str]:
    """A CD/PACS-style export: DICOMDIR at ``root``, images in PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx (no suffix).

    Each patient has one chest CT series (the chest phantom); returns {patient id: SeriesInstanceUID}.
    """
    fileset, uids = FileSet(), {}
    for index, patient in enumerate(patients):
        study = {"PatientID": patient, "StudyInstanceUID": generate_uid(), "SeriesNumber": 1, "StudyID": "1",
                 "StudyDate": "20200101", "StudyTime": "120000", "AccessionNumber": "1"}
        uids[patient] = write_volume(staging / patient, phantoms.chest(index), phantoms.SPACING, headers=study)
        for path in sorted((staging / patient).iterdir()):
            fileset.add(pydicom.dcmread(path))
    fileset.write(root)
    assert (root / "DICOMDIR").is_file() and not list(root.glob("*.dcm"))
    return uids


def test_a_dicomdir_tree_of_two_patients_gives_two_inputs_and_two_rows(tmp_path):
    uids = cd_export(tmp_path / "cd", tmp_path / "staging", ("P1", "P2"))
    config = PrepareCTConfig(inputs=(str(tmp_path / "cd"),), cache_dir=str(tmp_path / "cache"), size=16,
                             spacing_mm=3.0, workers=1)
    items = discover_inputs(config)
    assert len(items) == 2 and len({item.id for item in items}) == 2
    assert {item.series for item in items} == {short_hash(uid) for uid in uids.values()}
    assert all(len(item.files) == phantoms.SHAPE[0] for item in items)  # the DICOMDIR is not among them
    rows = read_manifest(prepare_ct(config).parent)
    assert len(rows) == 2 and [row["status"] for row in rows] == ["ok", "ok"], rows
    assert {row["series"] for row in rows} == {short_hash(uid) for uid in uids.values()}
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert [item.id for item in discover_inputs(config)] == [item.id for item in items]  # stable ids: a re-run skips


def test_a_dicom_file_at_the_root_does_not_swallow_the_series_below(tmp_path):
    """The old layout that lost a patient: one stray DICOM file at the root, a series in each subfolder."""
    (tmp_path / "tree").mkdir()
    write_slice(tmp_path / "tree" / "stray.dcm", 0.0, generate_uid())
    first = write_volume(tmp_path / "tree/a", np.full((3, 16, 16), -1000.0), (1.0, 0.7, 0.7))
    second = write_volume(tmp_path / "tree/b", np.full((4, 16, 16), -1000.0), (1.0, 0.7, 0.7))
    items = discover_inputs(PrepareCTConfig(inputs=(str(tmp_path / "tree"),)))
    by_source = {Path(item.source).relative_to(tmp_path / "tree").as_posix(): item for item in items}
    assert sorted(by_source) == [".", "a", "b"]  # the stray slice is a (one-slice) series of its own, and fails
    assert by_source["a"].series == short_hash(first) and by_source["b"].series == short_hash(second)
    assert by_source["a"].id == short_hash(str((tmp_path / "tree/a").resolve()))  # as before for a series folder


def test_several_series_in_one_folder_are_inputs_with_distinct_ids(tmp_path):
    folder = tmp_path / "mixed"
    ct = write_volume(folder, np.full((4, 16, 16), -1000.0), (1.0, 0.7, 0.7), prefix="ct")
    mr = write_volume(folder, np.full((5, 16, 16), -1000.0), (1.0, 0.7, 0.7), modality="MR", prefix="mr")
    config = PrepareCTConfig(inputs=(str(folder),), cache_dir=str(tmp_path / "cache"), workers=1)
    items = discover_inputs(config)
    assert sorted(item.series for item in items) == sorted([short_hash(ct), short_hash(mr)])
    assert len({item.id for item in items}) == 2 and {item.source for item in items} == {str(folder)}
    rows = {row["series"]: row for row in read_manifest(prepare_ct(config).parent)}
    assert "is MR, not CT" in rows[short_hash(mr)]["reason"]
    assert rows[short_hash(ct)]["status"] == "failed" and rows[short_hash(ct)]["reason"]  # all air: not HU
    only_ct = discover_inputs(PrepareCTConfig(inputs=(str(folder),), series_uid=short_hash(ct)))
    assert [item.series for item in only_ct] == [short_hash(ct)]


def test_a_damaged_file_fails_the_series_beside_it(tmp_path):
    write_volume(tmp_path / "s", np.full((4, 16, 16), -1000.0), (1.0, 0.7, 0.7))
    (tmp_path / "s" / "IM0004.dcm").write_bytes(b"not dicom")
    config = PrepareCTConfig(inputs=(str(tmp_path / "s"),), cache_dir=str(tmp_path / "cache"), workers=1)
    (item,) = discover_inputs(config)
    assert item.source == str(tmp_path / "s") and len(item.files) == 5
    (row,) = read_manifest(prepare_ct(config).parent)
    assert row["status"] == "failed" and "IM0004.dcm: not a valid DICOM file" in row["reason"]
