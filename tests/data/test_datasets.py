"""Named datasets on the real shared data, and their errors on hand-made folders, CSVs and npz files."""

from __future__ import annotations

import csv
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import chestssl.data.xray.medmnist as medmnist
from chestssl.data.datasets import DATASETS, load_dataset
from chestssl.data.xray.sources import NIH_FINDINGS
from chestssl.data.paths import cache_dir, resolve_data_dir
from chestssl.data.xray.unlabelled import load_unlabelled
from chestssl.errors import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decodes into its own empty cache, never the user's."""
    monkeypatch.setenv("CHESTSSL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_folder(root: Path, rows: list[tuple[str, str]], extra: str = "") -> Path:
    """PNG files with distinct grey levels and a labels.csv of (path, label) rows; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for index, (name, _) in enumerate(rows):
        Image.fromarray(np.full((40, 30), 20 * index + 10, dtype=np.uint8)).save(root / name)
    lines = ["path,label" + extra] + [f"{name},{label}" for name, label in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def write_dicom(path: Path, patient_id: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Rows, ds.Columns = patient_id, 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHESTSSL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "chestssl"
    monkeypatch.setenv("CHESTSSL_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "cache"  # from the autouse fixture's CHESTSSL_CACHE


def test_derived_cache_folder_honours_xdg_and_chestssl_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHESTSSL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "chestssl" / "cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "chestssl" / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CHESTSSL_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # CHESTSSL_CACHE wins
    for off in ("off", "0", "none", "OFF", " None "):
        monkeypatch.setenv("CHESTSSL_CACHE", off)
        assert cache_dir() is None


@pytest.mark.parametrize("setting", ["xdg", "off"])
def test_decoded_xrays_are_cached_under_xdg_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         setting: str) -> None:
    root = make_folder(tmp_path / "images", [("a.png", "normal"), ("b.png", "pneumonia")])
    monkeypatch.chdir(tmp_path)  # a folder named "off" would land here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if setting == "off":
        monkeypatch.setenv("CHESTSSL_CACHE", "off")
    else:
        monkeypatch.delenv("CHESTSSL_CACHE")
    first = load_dataset("folder", image_size=8, root=root)
    again = load_dataset("folder", image_size=8, root=root)
    assert np.array_equal(first.images, again.images)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz"))
    if setting == "off":
        assert written == [] and not (tmp_path / "home").exists()  # decoded images never touch the disk
    else:
        assert len(written) == 1 and written[0].startswith("xdg/chestssl/cache/folder-8px-")


def test_pneumoniamnist_counts_and_rebuilt_md5_warning(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_dataset("pneumoniamnist", shared_data)
    assert "md5" in caplog.text and "counts match" in caplog.text
    assert data.images.shape == (5856, 1, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and set(np.unique(data.labels)) == {0, 1}
    assert {name: int((data.split == name).sum()) for name in ("train", "val", "test")} == {
        "train": 4708, "val": 524, "test": 624}
    assert data.task == "binary" and data.class_names == ("normal", "pneumonia") and data.patient_ids is None


def test_pneumoniamnist_resizes_from_larger_file_with_warning(shared_data: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_dataset("pneumoniamnist", shared_data, image_size=14)
    assert data.images.shape == (5856, 1, 14, 14) and "resizing the 28 px images" in caplog.text


def test_pneumoniamnist_offline_names_searched_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, destination: Path, md5: str) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(medmnist, "_download_file", offline)
    with pytest.raises(DataError) as info:
        load_dataset("pneumoniamnist", tmp_path, image_size=64)
    message = str(info.value)
    for path in [tmp_path / "pneumoniamnist" / "pneumoniamnist_64.npz", tmp_path / "pneumoniamnist_224.npz"]:
        assert str(path) in message
    assert "no network" in message and "--data-dir" in message and "CHESTSSL_DATA" in message


def test_npz_without_medmnist_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"pneumoniamnist\.npz.*missing keys.*train_labels.*test_images"):
        load_dataset("pneumoniamnist", tmp_path, download=False)


def test_npz_with_wrong_counts_is_rejected(tmp_path: Path) -> None:
    arrays = {f"{split}_{kind}": np.zeros((3, 28, 28) if kind == "images" else (3, 1), np.uint8)
              for split in ("train", "val", "test") for kind in ("images", "labels")}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(DataError, match="counts"):
        load_dataset("pneumoniamnist", tmp_path, download=False)


def test_kermany_subset_at_28_and_cache(shared_data: Path, private_cache: Path, caplog) -> None:
    first = load_dataset("kermany", shared_data, image_size=28, limit=300)
    assert first.images.shape == (296, 1, 28, 28) and first.images.dtype == np.uint8  # 300 rows, 4 of overlap patients
    assert set(first.split) == {"train", "test"} and set(np.unique(first.labels)) == {0, 1}
    assert first.class_names == ("normal", "pneumonia") and first.patient_ids[0].startswith("IM-")
    (cache_file,) = private_cache.glob("kermany-28px-*.npz")
    again = load_dataset("kermany", shared_data, image_size=28, limit=300)
    np.testing.assert_array_equal(again.images, first.images)
    cache_file.write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        rebuilt = load_dataset("kermany", shared_data, image_size=28, limit=300)
    assert "unreadable cache" in caplog.text
    np.testing.assert_array_equal(rebuilt.images, first.images)


def test_nih_multilabel_and_no_finding_rows(shared_data: Path) -> None:
    data = load_dataset("nih-cxr14", shared_data)
    assert data.images.shape == (1000, 1, 64, 64) and data.labels.shape == (1000, 14)
    assert data.task == "multilabel" and data.class_names == NIH_FINDINGS
    with open(shared_data / "nih-cxr14-64" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    no_finding = np.array([row["finding_labels"] == "No Finding" for row in rows])
    # 499, not 500: valid/0_normal/00000193_019.png sits in the uploader's normal folder but is labelled Pneumonia
    assert no_finding.sum() == 499 and (data.labels[no_finding] == 0).all()
    assert (data.labels[~no_finding].sum(axis=1) >= 1).all()
    assert set(data.split) == {""} and len(set(data.patient_ids)) < 1000


def test_folder_class_names_and_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "xr", [("a.png", "normal"), ("b.png", "effusion"), ("c.png", "normal")])
    data = load_dataset("folder", image_size=16, root=root)
    assert data.class_names == ("effusion", "normal") and data.labels.tolist() == [1, 0, 1]
    assert data.images.shape == (3, 1, 16, 16) and int(data.images[1].mean()) == 30
    assert data.task == "binary" and set(data.split) == {""} and data.patient_ids is None


def test_folder_multilabel_columns(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "xr", [("a.png", "1,0"), ("b.png", "0,")], extra=",effusion")
    data = load_dataset("folder", image_size=8, root=root, label_columns=["label", "effusion"])
    assert data.task == "multilabel" and data.labels.tolist() == [[1, 0], [0, -1]]


def test_folder_missing_file_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "xr", [("a.png", "x"), ("b.png", "y")])
    (root / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 of 2 listed file.*b\.png"):
        load_dataset("folder", image_size=8, root=root)


def test_folder_unknown_label(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "xr", [("a.png", "normal"), ("b.png", "pneumothorax")])
    with pytest.raises(DataError, match=r"labels\.csv.*'pneumothorax'"):
        load_dataset("folder", image_size=8, root=root, class_names=["normal", "pneumonia"])


def test_folder_empty_csv_and_missing_column(tmp_path: Path) -> None:
    root = tmp_path / "xr"
    root.mkdir()
    (root / "labels.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset("folder", root=root)
    (root / "labels.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(DataError, match=r"missing required column.*path"):
        load_dataset("folder", root=root)


def test_on_error_skip_drops_exactly_the_bad_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder(tmp_path / "xr", [("a.png", "x"), ("bad.png", "y"), ("c.png", "y")])
    (root / "bad.png").write_text("not an image")
    with pytest.raises(DataError, match=r"bad\.png"):
        load_dataset("folder", image_size=8, root=root)
    with caplog.at_level(logging.WARNING):
        data = load_dataset("folder", image_size=8, root=root, on_error="skip")
    assert len(data) == 2 and data.labels.tolist() == [0, 1]
    assert [int(image.mean()) for image in data.images] == [10, 50]
    assert "bad.png" in caplog.text and "skipped 1 of 3" in caplog.text
    with pytest.raises(DataError, match=r"bad\.png"):  # a cache built while skipping must not hide the error
        load_dataset("folder", image_size=8, root=root)


def test_dicom_folder_without_csv_and_hashed_patient_ids(tmp_path: Path) -> None:
    root = tmp_path / "dicoms"
    (root / "sub").mkdir(parents=True)
    for name, patient in [("one.dcm", "PAT-A"), ("sub/two.dcm", "PAT-A"), ("three.dcm", "PAT-B")]:
        write_dicom(root / name, patient)
    data = load_dataset("dicom", image_size=8, root=root, patient_id_from_header=True)
    assert len(data) == 3 and (data.labels == -1).all() and data.images.shape == (3, 1, 8, 8)
    ids = data.patient_ids.tolist()  # sorted paths: one, sub/two, three
    assert all(len(value) == 16 and "PAT" not in value for value in ids)
    assert ids[0] == ids[1] != ids[2]
    assert load_dataset("dicom", image_size=8, root=root).patient_ids is None


def test_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="pneumoniamnist.*kermany"):
        load_dataset("chexpert")
    with pytest.raises(ValueError, match="limt"):
        load_dataset("kermany", limt=3)
    assert set(DATASETS) == {"pneumoniamnist", "kermany", "nih-cxr14", "folder", "dicom", "sarscov2-ct", "sarscov2-ct-slices",
                             "cxr-lungseg", "cxr-lungseg-covid"}


def test_unlabelled_excludes_test_and_adds_lungseg(shared_data: Path) -> None:
    data = load_unlabelled(["pneumoniamnist", "cxr-lungseg-all"], shared_data, image_size=28)
    assert len(data) == 4708 + 524 + 72 + 42 and data.images.shape[1:] == (1, 28, 28)
    held_out = load_unlabelled(["cxr-lungseg", "cxr-lungseg-covid"], shared_data, image_size=28)
    tested = [load_dataset(name, shared_data, image_size=28) for name in ("cxr-lungseg", "cxr-lungseg-covid")]
    assert len(held_out) == sum(int((d.split != "test").sum()) for d in tested) < 72 + 42  # their test images dropped
    test_images = np.concatenate([d.images[d.split == "test"] for d in tested]).reshape(-1, 28 * 28)
    pooled = held_out.images.reshape(len(held_out), -1)
    assert not any((pooled == image).all(axis=1).any() for image in test_images)
    assert "test" not in set(data.split) and (data.labels == -1).all() and data.class_names == ()
    with pytest.raises(ValueError, match="cxr-lungseg"):
        load_unlabelled(["folder"], shared_data)


def test_kermany_children_in_both_official_splits_are_kept_out_of_training(shared_data):
    import csv

    from chestssl.data.xray.sources import kermany_disjoint

    rows = list(csv.DictReader(open(shared_data / "kermany-224" / "labels.csv")))
    split = np.array([row["split"] for row in rows])
    patients = np.array([row["patient_key"] for row in rows])
    keep = kermany_disjoint(split, patients)
    assert (~keep).sum() == 457 and len(set(patients[~keep])) == 170  # the overlap the data README reports
    assert not set(patients[keep & (split == "train")]) & set(patients[split == "test"])
    assert keep[split == "test"].all()
    data = load_dataset("kermany", shared_data, image_size=8, limit=400)  # the loader applies it
    assert not set(data.patient_ids[data.split == "train"]) & set(data.patient_ids[data.split == "test"])
