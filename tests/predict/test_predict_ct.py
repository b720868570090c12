"""predict on CT: heat maps on the source scan's grid, inputs that are not chest CT in HU refused with the reason,
no DICOM header identifier in any output, nodule models fed their VOI and mask."""

import csv

import numpy as np
import phantoms
import pytest
import SimpleITK as sitk
import torch
from dicom_factory import write_volume

from chestssl.data.ct.dicom_series import read_dicom_folder
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocessing_record
from chestssl.models.encoders import architecture, build_encoder, record_of
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig
from chestssl.predict import load_model, predict_to_folder
from chestssl.train.checkpoint import save_model
from chestssl.train.tasks import Classification

SECRETS = {"PatientName": "Quorrax^Zyxwut", "PatientID": "PID-7788-QX", "AccessionNumber": "ACC998877"}
CT = PrepareCTConfig(size=16, spacing_mm=3.0)


def _model(tmp_path, kind: str, preprocessing: dict) -> str:
    """A small untrained 3D classifier saved as fine-tuning saves one (the pipeline, not its accuracy, is tested)."""
    torch.manual_seed(0)
    sizes = ResNetConfig(widths=(4, 4, 8, 8)) if kind == "resnet" else ViTConfig(patch_size=8, hidden_size=16, depth=1, num_heads=2)
    encoder = build_encoder(architecture(kind, sizes, 3, 16))
    task = Classification("binary", ("benign", "malignant"))
    model = task.build_model(encoder, encoder.feature_size, encoder.head_norm)
    path = tmp_path / f"{kind}_model" / "model.safetensors"
    path.parent.mkdir()
    save_model(path, model, {**task.describe(), "encoder": record_of(encoder),
                             "head": {"feature_size": encoder.feature_size, "feature_norm": encoder.head_norm},
                             "preprocessing": {**preprocessing, "normalisation": {"mean": 0.5, "std": 0.25}},
                             "dataset": "ct-cache", "mode": "full", "init": "scratch", "label_fraction": 1.0})
    return str(path.parent)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A chest phantom as a DICOM series (identifying headers set) and as an MHA in RAS order; an MR series, an
    8-bit pre-windowed chest and an abdomen (no lungs)."""
    root = tmp_path_factory.mktemp("scans")
    write_volume(root / "dicom_chest", phantoms.chest(), phantoms.SPACING, headers=SECRETS)
    image = sitk.GetImageFromArray(phantoms.chest(1))
    image.SetSpacing(phantoms.SPACING[::-1])
    image.SetOrigin((-100.0, 20.0, -300.0))
    sitk.WriteImage(sitk.DICOMOrient(image, "RAS"), str(root / "chest_ras.mha"))
    write_volume(root / "mr", np.full((6, 16, 16), 100.0), (5.0, 1.0, 1.0), modality="MR", headers=SECRETS)
    phantoms.write_image(root / "eight_bit.mha", phantoms.eight_bit(phantoms.chest()))
    phantoms.write_image(root / "abdomen.mha", phantoms.abdomen())
    return root


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_ct_heat_map_has_the_source_scan_geometry(scans, tmp_path, kind):
    model = _model(tmp_path, kind, preprocessing_record(CT))
    out = tmp_path / "out"
    report = predict_to_folder(model, [str(scans / "chest_ras.mha"), str(scans / "dicom_chest")], out, device="cpu")
    assert report["predicted"] == 2, report["failures"]
    rows = {row["source"]: row for row in csv.DictReader(open(out / "predictions.csv"))}
    sources = {"chest_ras.mha": sitk.ReadImage(str(scans / "chest_ras.mha")),
               "dicom_chest": read_dicom_folder(scans / "dicom_chest", None, False, "raise")[0]}
    for name, source in sources.items():
        heat = sitk.ReadImage(str(out / "heatmaps" / f"{rows[str(scans / name)]['id']}_heatmap.nii.gz"))
        assert heat.GetSize() == source.GetSize(), name
        np.testing.assert_allclose(heat.GetSpacing(), source.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(heat.GetOrigin(), source.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(heat.GetDirection(), source.GetDirection(), atol=1e-6)
        values = sitk.GetArrayFromImage(heat)
        assert 0 <= values.min() and values.max() <= 1 and values.max() > 0.5


def test_cube_maps_back_onto_the_lungs(scans):
    """A map that is 1 on the cube's lung voxels lands on the phantom's lungs in the source scan."""
    from chestssl.data.ct.io import read_ct
    from chestssl.data.ct.preprocess import cube_to_scan, preprocess_volume

    volume = read_ct(scans / "chest_ras.mha")
    _, lung, info = preprocess_volume(volume, CT)
    back = cube_to_scan(lung, volume, CT.spacing_mm, info["crop_start"], info["crop_shape"], info["resampled_shape"])
    mapped = sitk.GetArrayFromImage(sitk.DICOMOrient(back, "LPS")) > 0
    truth = phantoms.chest_lungs()
    dice = 2 * (mapped & truth).sum() / (mapped.sum() + truth.sum())
    assert dice > 0.8, dice


def test_inputs_that_are_not_chest_ct_in_hu_are_refused_and_the_rest_go_on(scans, tmp_path):
    model = _model(tmp_path, "resnet", preprocessing_record(CT))
    inputs = [scans / "mr", scans / "eight_bit.mha", scans / "abdomen.mha", scans / "chest_ras.mha"]
    report = predict_to_folder(model, [str(p) for p in inputs], tmp_path / "out", heatmap=False, device="cpu")
    reasons = {f["source"]: f["reason"] for f in report["failures"]}
    assert "not CT" in reasons[str(scans / "mr")] or "no CT series" in reasons[str(scans / "mr")]
    assert "not HU" in reasons[str(scans / "eight_bit.mha")]
    assert "not a chest CT" in reasons[str(scans / "abdomen.mha")]
    assert report["predicted"] == 1


def test_no_dicom_header_identifier_reaches_any_output(scans, tmp_path):
    model = _model(tmp_path, "resnet", preprocessing_record(CT))
    out = tmp_path / "out"
    predict_to_folder(model, [str(scans / "dicom_chest"), str(scans / "mr")], out, device="cpu")
    secrets = list(SECRETS.values()) + ["Quorrax", "Zyxwut"]
    for path in out.rglob("*"):
        assert not any(s in path.name for s in secrets), path
        if path.is_file():
            content = path.read_bytes()
            assert not any(s.encode() in content for s in secrets), path


def test_a_nodule_model_takes_the_voi_and_its_mask(tmp_path):
    """A prepare-lidc model: the VOI and mask pairs of a CSV, cut to the cube the cache holds."""
    from chestssl.data.ct.cache import stored_values
    from chestssl.data.ct.io import read_ct
    from chestssl.data.ct.nodule_cube import nodule_cube

    hu = np.full((12, 40, 40), -850.0, np.float32)
    hu[4:8, 15:25, 15:25] = 30.0
    for name, values in (("voi.nii.gz", hu), ("mask.nii.gz", (hu > 0).astype(np.uint8))):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((0.7, 0.7, 2.5))
        sitk.WriteImage(image, str(tmp_path / name))
    (tmp_path / "nodules.csv").write_text("path,id,mask\nvoi.nii.gz,n1,mask.nii.gz\nvoi.nii.gz,n2,\n")
    record = {"modality": "ct", "spatial_dims": 3, "channels": 1, "size": 16, "axes": "zyx", "spacing_mm": 1.0,
              "hu_window": [-1000.0, 400.0], "value_range": [0.0, 1.0], "crop": "nodule-centred cube, air padding",
              "orientation": "LPS"}
    model = _model(tmp_path, "resnet", record)
    predictor = load_model(model, "cpu")
    first, second = predictor.predict([tmp_path / "nodules.csv"], heatmap=True)
    assert second.status == "failed" and "mask" in second.reason
    volume = read_ct(tmp_path / "voi.nii.gz")
    cube = nodule_cube(volume.hu, read_ct(tmp_path / "mask.nii.gz").hu, volume.spacing, 16, 1.0, -1000.0, 400.0)
    expected = predictor.probabilities(stored_values(cube.image).astype(np.float32)[None])
    assert first.probabilities["malignant"] == pytest.approx(float(expected[0]), abs=1e-7)
    assert first.heatmap.GetSize() == sitk.ReadImage(str(tmp_path / "voi.nii.gz")).GetSize()
