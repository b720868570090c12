"""predict on X-rays: the same probabilities as the fine-tuning evaluation, failures recorded, --continue, heat
maps in the image's own geometry, ONNX equal to PyTorch, models that do not match refused."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

import chestssl
from chestssl.cli import main
from chestssl.data.batch import Batches, xray_preprocessing
from chestssl.data.datasets import load_labelled
from chestssl.errors import CheckpointError, DataError
from chestssl.models.resnet import ResNetConfig
from chestssl.predict import predict_to_folder
from chestssl.train.checkpoint import atomic_save, read
from chestssl.train.finetune import FinetuneConfig, finetune
from chestssl.train.tasks import load_model as load_task_model

SPLITS = ["train"] * 16 + ["val"] * 4 + ["test"] * 6


@pytest.fixture(scope="module")
def xray_run(tmp_path_factory):
    """A tiny ResNet fine-tuned on a folder of PNGs (bright disc: pneumonia), and the test images' paths."""
    folder = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(0)
    lines, tests = [["path", "label", "split", "patient_id"]], []
    yy, xx = np.mgrid[:40, :36]
    for index, split in enumerate(SPLITS):
        label = index % 2
        image = rng.integers(0, 120, (40, 36)).astype(np.uint8)  # not square: resized to 16 x 16 for the model
        if label:
            image[(yy - 20) ** 2 + (xx - 12) ** 2 < 60] = 230
        name = f"img{index:02d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append([name, ["normal", "pneumonia"][label], split, f"p{index}"])
        if split == "test":
            tests.append(folder / name)
    with open(folder / "labels.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(lines)
    config = FinetuneConfig(run_dir=str(folder / "run"), dataset="folder", dataset_root=str(folder), image_size=16,
                            encoder="resnet", resnet=ResNetConfig(widths=(4, 4, 8, 8)), epochs=2, batch_size=8,
                            device="cpu", checkpoint_every=0)
    finetune(config)
    return config, tests


def test_prediction_equals_the_fine_tuning_evaluation(xray_run):
    config, tests = xray_run
    data = load_labelled("folder", None, 16, 0, xray_preprocessing(16, config.normalisation()), root=config.dataset_root)
    loaded = load_task_model(config.run_dir)
    evaluated = loaded.task.scores(loaded.module, Batches(data.test.inputs, None, 256, loaded.normalisation, (),
                                                           False, False))
    predictions = chestssl.load_model(config.run_dir, device="cpu").predict(tests)
    assert [p.status for p in predictions] == ["ok"] * len(tests)
    predicted = np.array([p.probabilities["pneumonia"] for p in predictions])
    np.testing.assert_allclose(predicted, evaluated, rtol=0, atol=1e-6)
    assert {p.label for p in predictions} <= {"normal", "pneumonia"}


def test_a_bad_input_is_recorded_and_the_others_are_predicted(xray_run, tmp_path):
    config, tests = xray_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    volume = tmp_path / "scan.nii.gz"
    volume.write_bytes(b"")
    report = predict_to_folder(config.run_dir, [str(tests[0]), str(bad), str(volume), str(tests[1])],
                               tmp_path / "out", device="cpu")
    rows = {row["source"]: row for row in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert rows[str(tests[0])]["status"] == rows[str(tests[1])]["status"] == "ok"
    assert rows[str(bad)]["status"] == "failed" and "broken.png" in rows[str(bad)]["reason"]
    assert "takes 2D chest X-ray images" in rows[str(volume)]["reason"]
    assert report["predicted"] == 2 and report["failed"] == 2
    assert {f["source"] for f in json.loads((tmp_path / "out" / "report.json").read_text())["failures"]} == {str(bad), str(volume)}
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) == 4


def test_continue_skips_done_inputs_and_nothing_is_overwritten(xray_run, tmp_path):
    config, tests = xray_run
    out = tmp_path / "out"
    first = predict_to_folder(config.run_dir, [str(t) for t in tests[:2]], out, heatmap=False, device="cpu")
    assert first["predicted"] == 2
    with pytest.raises(DataError, match="--continue"):
        predict_to_folder(config.run_dir, [str(t) for t in tests[:3]], out, heatmap=False, device="cpu")
    again = predict_to_folder(config.run_dir, [str(t) for t in tests[:3]], out, heatmap=False, device="cpu", resume=True)
    assert again["skipped_done"] == 2 and again["predicted"] == 1
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [row["source"] for row in rows] == [str(t) for t in tests[:3]]


def test_heat_maps_are_in_the_image_geometry(xray_run, tmp_path):
    config, tests = xray_run
    assert main(["predict", "-m", config.run_dir, "-i", str(tests[0].parent), "-o", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == len(SPLITS) and all(row["status"] == "ok" for row in rows)
    heat = np.asarray(Image.open(tmp_path / "out" / "heatmaps" / f"{rows[0]['id']}_heatmap.png"))
    assert heat.shape == (40, 36) and heat.max() == 255  # the source image's H x W, scaled to its maximum
    assert (tmp_path / "out" / "heatmaps" / f"{rows[0]['id']}_overlay.png").is_file()
    assert not any(tests[0].stem in path.name for path in (tmp_path / "out").rglob("*"))  # ids, not file names


def test_onnx_export_equals_pytorch(xray_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    config, tests = xray_run
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "-m", config.run_dir, "-o", str(onnx_path), "-i", str(tests[0])]) == 0
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["class_names"] == ["normal", "pneumonia"] and meta["input"]["shape"] == ["batch", 1, 16, 16]
    assert meta["check"]["max_abs_difference"] <= 1e-4
    predictor = chestssl.load_model(config.run_dir, device="cpu")
    prepared = predictor.prepare_all(predictor.inputs(tests))
    pixels = np.stack([p.pixels for p in prepared])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": (pixels[:, None] / 255.0).astype(np.float32)})[0]
    np.testing.assert_allclose(got, predictor.probabilities(pixels), atol=1e-5)


def test_a_model_file_of_another_architecture_or_preprocessing_is_refused(xray_run, tmp_path):
    config, _ = xray_run
    tensors, meta = read(f"{config.run_dir}/model.safetensors")
    for name, change, message in (
        ("widths", {"encoder": {**meta["encoder"], "widths": [4, 4, 8, 16]}}, "shape|size"),
        ("preprocessing", {"preprocessing": {**meta["preprocessing"], "modality": "mr"}}, "not one predict can reproduce"),
    ):
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        atomic_save(tensors, {**meta, **change}, path)  # the header's metadata is what counts
        with pytest.raises(CheckpointError, match=message):
            chestssl.load_model(path, device="cpu")
