"""prepare_ct on real chest CTs mixed with hand-made bad inputs; preprocess_volume on small phantoms."""

import csv
import dataclasses
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import write_slice as write_dicom_slice
from pydicom.uid import generate_uid

import chestssl.data.ct.prepare as prepare_module
from chestssl.config import load_config
from chestssl.data.ct.inputs import discover_inputs
from chestssl.data.ct.io import CTVolume
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume
from chestssl.data.ct.prepare import prepare_ct
from chestssl.data.ct.cache import load_volume, read_manifest
from chestssl.errors import ConfigError, DataError

SECRETS = ("Doe", "Jane", "PAT-SECRET-42")  # written into every synthetic DICOM header
REASONS = {  # bad input -> what its manifest reason must say
    "truncated": r"truncated|unreadable",
    "nan": r"NaN",
    "mr": r"not CT|CT only",
    "abdomen": r"lung mask too small / not a chest CT",
}


def write_slice(path: Path, z: float, uid: str, modality: str = "CT", size: int = 16) -> Path:
    """One small synthetic DICOM slice at height ``z`` mm, carrying a patient name and ID."""
    stored = np.random.default_rng(int(z)).integers(0, 1200, (size, size), dtype=np.uint16)
    return write_dicom_slice(path, z, uid, stored=stored, modality=modality, size=size)


def write_series(folder: Path, count: int, modality: str = "CT", size: int = 16) -> Path:
    folder.mkdir(parents=True)
    uid = generate_uid()
    for i in range(count):
        write_slice(folder / f"slice{i:03d}.dcm", float(i), uid, modality, size)
    return folder


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Real chest CTs and hand-made bad inputs, bad ones first so that the batch must go on past them."""
    bad = tmp_path_factory.mktemp("inputs")
    slice_file = write_slice(write_series(bad / "cut", 0) / "only.dcm", 0.0, generate_uid())
    slice_file.write_bytes(slice_file.read_bytes()[:300])  # cut inside the header
    nan = np.full((8, 8, 8), -1000.0, np.float32)
    nan[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), bad / "nan.nii.gz")
    return {
        "truncated": bad / "cut",
        "lung1": shared_data / "ct/pyradiomics/lung1_image.nrrd",
        "nan": bad / "nan.nii.gz",
        "mr": write_series(bad / "mr", 4, modality="MR"),
        "abdomen": shared_data / "ct/totalsegmentator/abdomen_ct_dicom",
        "pulmonary": shared_data / "ct/totalsegmentator/pulmonary_report_ct_cropped.nii.gz",
    }


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    """One prepare-ct run over all inputs: (config, {input name: manifest row}, log messages)."""
    config = PrepareCTConfig(inputs=tuple(str(p) for p in inputs.values()), size=32, workers=1,
                             cache_dir=str(tmp_path_factory.mktemp("cache")))
    records, root = _Records(), logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        manifest = prepare_ct(config)
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    by_source = {row["source"]: row for row in read_manifest(manifest.parent)}
    return config, {name: by_source[str(path)] for name, path in inputs.items()}, records.messages


def test_good_volumes_cached_and_bad_ones_failed_with_reasons(prepared):
    config, rows, _ = prepared
    for name in ("lung1", "pulmonary"):
        assert rows[name]["status"] == "ok", rows[name]
        image, lung = load_volume(Path(config.cache_dir) / rows[name]["file"])
        assert image.shape == lung.shape == (32, 32, 32)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert 0.1 < lung.mean() < 0.8 and np.median(image[lung]) < 0.25  # lungs fill the crop, mostly air
        assert 1000 < float(rows[name]["lung_ml"]) < 9000
    assert rows["lung1"]["shape"] == "48x512x512"
    for name, pattern in REASONS.items():
        assert rows[name]["status"] == "failed" and rows[name]["file"] == ""
        assert re.search(pattern, rows[name]["reason"]), rows[name]


def test_preprocessing_and_config_recorded(prepared):
    config, _, _ = prepared
    record = json.loads((Path(config.cache_dir) / "preprocessing.json").read_text())
    assert record["modality"] == "ct" and record["spatial_dims"] == 3 and record["orientation"] == "LPS"
    assert record["size"] == 32 and record["spacing_mm"] == 1.5 and record["hu_window"] == [-1000.0, 200.0]
    assert record["lung_crop_margin_mm"] == 10.0
    assert load_config(PrepareCTConfig, Path(config.cache_dir) / "prepare_config.yaml") == config


def test_no_patient_identifier_in_file_names_manifest_or_logs(prepared):
    config, _, messages = prepared
    cache = Path(config.cache_dir)
    texts = [p.name for p in cache.rglob("*")] + [(cache / "manifest.csv").read_text()] + messages
    assert not [text for text in texts for secret in SECRETS if secret in text]


def test_rerun_processes_nothing_new_and_retries_failures(prepared, inputs, monkeypatch):
    config, _, _ = prepared
    cache = Path(config.cache_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    read, real_read_ct = [], prepare_module.read_ct

    def counting_read_ct(path, *args, **kwargs):
        read.append(path)
        return real_read_ct(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "read_ct", counting_read_ct)
    prepare_ct(config)
    assert sorted(map(str, read)) == sorted(str(inputs[name]) for name in REASONS)  # failures only, retried
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == mtimes
    assert [row["status"] for row in read_manifest(cache)].count("ok") == 2


def test_two_workers_give_the_same_arrays(prepared, inputs, tmp_path):
    config, rows, _ = prepared
    parallel = dataclasses.replace(config, inputs=(str(inputs["lung1"]), str(inputs["pulmonary"])),
                                   cache_dir=str(tmp_path), workers=2)
    prepare_ct(parallel)
    for name in ("lung1", "pulmonary"):
        serial = load_volume(Path(config.cache_dir) / rows[name]["file"])
        two = load_volume(tmp_path / rows[name]["file"])
        assert np.array_equal(serial[0], two[0]) and np.array_equal(serial[1], two[1])


def test_changed_preprocessing_refused_for_a_filled_cache(prepared):
    config, _, _ = prepared
    with pytest.raises(ConfigError, match="size 32 -> 48"):
        prepare_ct(dataclasses.replace(config, size=48))


def test_on_error_raise_stops_after_recording_what_was_done(inputs, tmp_path):
    config = PrepareCTConfig(inputs=(str(inputs["pulmonary"]), str(inputs["nan"]), str(inputs["lung1"])), size=32,
                             workers=1, on_error="raise", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="NaN"):
        prepare_ct(config)
    assert [(row["source"], row["status"]) for row in read_manifest(tmp_path)] == [
        (str(inputs["pulmonary"]), "ok"), (str(inputs["nan"]), "failed")]


def test_user_csv_gives_ids_labels_and_masks(tmp_path):
    write_series(tmp_path / "study" / "series", 10, size=32)  # (10, 32, 32) at (1, 0.7, 0.7) mm
    mask = np.zeros((10, 32, 32), np.uint8)
    mask[2:8, 8:24, 4:14] = 1  # a small "lung": far below min_lung_ml, but the user's masks are trusted
    image = sitk.GetImageFromArray(mask)
    image.SetSpacing((0.7, 0.7, 1.0))
    sitk.WriteImage(image, str(tmp_path / "mask.nrrd"))
    with open(tmp_path / "cases.csv", "w", newline="") as stream:
        csv.writer(stream).writerows([["path", "id", "label", "patient_id", "mask"],
                                      ["study/series", "case-001", "1", "P7", "mask.nrrd"]])
    config = PrepareCTConfig(manifest_csv=str(tmp_path / "cases.csv"), cache_dir=str(tmp_path / "cache"), size=16)
    (row,) = read_manifest(prepare_ct(config).parent)
    assert (row["id"], row["status"], row["file"], row["label"], row["patient_id"]) == (
        "case-001", "ok", "case-001.npz", "1", "P7")
    image, lung = load_volume(tmp_path / "cache" / "case-001.npz")
    assert image.shape == (16, 16, 16) and lung.any() and not lung.all()
    names = [p.name for p in (tmp_path / "cache").iterdir()] + [(tmp_path / "cache/manifest.csv").read_text()]
    assert not [text for text in names for secret in SECRETS if secret in text]


def test_duplicate_unsafe_ids_and_missing_path_column_refused(tmp_path):
    def discover(*rows):
        with open(tmp_path / "cases.csv", "w", newline="") as stream:
            csv.writer(stream).writerows(rows)
        return discover_inputs(PrepareCTConfig(manifest_csv=str(tmp_path / "cases.csv")))

    with pytest.raises(DataError, match="id a is given to two inputs"):
        discover(["path", "id"], ["x.nii", "a"], ["y.nii", "a"])
    with pytest.raises(DataError, match="id '../evil'"):
        discover(["path", "id"], ["x.nii", "../evil"])
    with pytest.raises(DataError, match="no 'path' column"):
        discover(["file", "id"], ["x.nii", "a"])


def test_folders_are_scanned_for_series_folders_and_image_files(tmp_path):
    (tmp_path / "a" / "series").mkdir(parents=True)
    (tmp_path / "a" / "series" / "1.dcm").write_bytes(b"")  # named like DICOM: one input, read (and judged) later
    (tmp_path / "a" / "series" / "sub").mkdir()  # inside a series folder: read_ct reads it recursively
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "scan.nii.gz").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.nrrd").write_bytes(b"")
    items = discover_inputs(PrepareCTConfig(inputs=(str(tmp_path),)))
    assert [Path(item.source).relative_to(tmp_path).as_posix() for item in items] == ["a/series", "b/scan.nii.gz"]
    assert all(len(item.id) == 12 for item in items)


def phantom(lung_hu: float = -850.0) -> tuple[CTVolume, np.ndarray]:
    """A (20, 40, 40) body at 40 HU with a box of ``lung_hu`` inside, 2 x 1 x 1 mm voxels."""
    hu = np.full((20, 40, 40), 40, np.int16)
    mask = np.zeros(hu.shape, bool)
    mask[5:15, 10:30, 8:32] = True
    hu[mask] = lung_hu
    return CTVolume(hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), "phantom"), mask


def test_preprocess_volume_crops_to_the_mask_and_windows():
    volume, mask = phantom()
    config = PrepareCTConfig(size=16, spacing_mm=1.0, margin_mm=0.0)
    image, lung, info = preprocess_volume(volume, config, mask)
    assert image.dtype == np.float32 and image.shape == lung.shape == (16, 16, 16) and lung.dtype == bool
    assert info["crop_shape"] == (20, 20, 24) and info["mask"] == "user"  # the box, no margin, at 1 mm
    assert info["lung_ml"] == pytest.approx(mask.sum() * 2 / 1000)
    assert lung.all() and np.allclose(image[2:-2, 2:-2, 2:-2], 150 / 1200, atol=1e-3)  # -850 HU in [-1000, 200]


def test_preprocess_volume_without_lungs_fails_clearly():
    volume, _ = phantom(lung_hu=40)
    hu = volume.hu.copy()
    hu[:, :4], hu[:, -4:] = -1000, -1000  # air in front of and behind the body: HU (unlike soft tissue alone)
    volume = dataclasses.replace(volume, hu=hu)
    with pytest.raises(DataError, match="lung mask too small / not a chest CT: 0 ml"):
        preprocess_volume(volume, PrepareCTConfig(size=16))
