"""The segmentation task: metrics against hand-made masks, label maps moving with the views, a whole run
rebuilt from its model file, and the benchmark's grid of label counts."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.errors import ConfigError, DataError
from chestssl.models.resnet import ResNetConfig
from chestssl.report.tables import append_result, write_report
from chestssl.train.evaluate import segmentation_metrics
from chestssl.train.finetune import FinetuneConfig, finetune
from chestssl.train.protocol import BenchmarkConfig, grid_cells, run_config
from chestssl.train.tasks import Segmentation, load_model

CLASSES = ("background", "right lung", "left lung", "cardiomediastinum")


def test_dice_and_hd95_per_class_and_for_the_lung_union():
    truth = np.zeros((1, 20, 20), dtype=np.int64)
    truth[0, 2:12, 2:8], truth[0, 2:12, 12:18] = 1, 2  # two 10 x 6 lungs
    truth[0, 14:18, 8:12] = 3
    guess = truth.copy()
    guess[0, 2:12, 12:18] = 1  # the left lung called right: right Dice 2*60/(60+120), left 0, lung union 1
    values = segmentation_metrics(truth, guess, CLASSES, Segmentation("segmentation", CLASSES).groups)
    assert values["dice_right_lung"] == pytest.approx(2 / 3)
    assert values["dice_left_lung"] == 0.0 and values["dice_cardiomediastinum"] == 1.0
    assert values["dice_lung"] == 1.0 and values["hd95_lung"] == 0.0
    assert values["dice"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert values["hd95_missed"] == 1  # the left lung predicted empty: no distance, counted
    assert np.isnan(values["hd95_left_lung"])


def test_label_maps_move_exactly_with_the_image():
    torch.manual_seed(0)
    maps = torch.zeros(6, 24, 24, dtype=torch.int64)
    maps[:, 3:15, 4:10], maps[:, 8:20, 14:21] = 1, 2
    images = (maps * 100).to(torch.uint8).unsqueeze(1).numpy()  # the image shows its own label map
    flips = ViewConfig(crop_scale=(1.0, 1.0), rotate_degrees=0, flip_probability=0.5, flip_axes=(-1, -2), intensity=0)
    batch = next(Batches(images, maps.numpy(), 6, Normalisation(0, 1 / 255), (flips,), dense_labels=True).epoch(0, 0))
    assert torch.equal(batch.labels, (batch.images[:, 0] / 100).round().long())
    assert not torch.equal(batch.labels, maps[batch.index])  # something was flipped
    crops = ViewConfig(crop_scale=(0.5, 0.9), rotate_degrees=15, flip_probability=0.5, intensity=0)
    lung = (maps > 0).long()  # one class, so a bilinear value near 0 or 1 is never a blend of two others
    images = (lung * 200).to(torch.uint8).unsqueeze(1).numpy()
    batch = next(Batches(images, lung.numpy(), 6, Normalisation(0, 1 / 255), (crops,), dense_labels=True).epoch(0, 1))
    assert batch.labels.dtype == torch.int64 and set(batch.labels.unique().tolist()) == {0, 1}
    level = batch.images[:, 0] / 200
    pure = (level - level.round()).abs() < 0.05  # not on an edge, where bilinear blends the two
    assert pure.float().mean() > 0.8
    assert torch.equal(batch.labels[pure], level.round().long()[pure])  # nearest neighbour agrees everywhere else


def test_dense_labels_need_maps_beside_images():
    with pytest.raises(ValueError, match="label maps"):
        Batches(np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64), 2, Normalisation(), dense_labels=True)


def _tiny(run_dir: Path, data: Path, **extra) -> FinetuneConfig:
    settings = dict(run_dir=str(run_dir), data_dir=str(data), dataset="cxr-lungseg", task="segmentation",
                    image_size=32, encoder="resnet", label_count=5, epochs=1, min_steps=6, batch_size=5,
                    selection="fixed", lr=3e-3, warmup_epochs=0, checkpoint_every=0)
    settings.update(extra)
    from chestssl.config import from_dict
    return from_dict(FinetuneConfig, {**settings, "resnet": {"widths": [8, 16, 16, 16], "small_input": True}})


def test_a_segmentation_run_writes_metrics_overlays_and_a_model_that_rebuilds(tmp_path, shared_data):
    result = finetune(_tiny(tmp_path / "run", shared_data))
    assert result["task"] == "segmentation" and result["n_train"] == 5 and result["label_count"] == 5
    assert 0.0 <= result["test_dice"] <= 1.0 and "test_dice_lung" in result and "test_auc" not in result
    assert (tmp_path / "run" / "test_overlays.png").stat().st_size > 10_000
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["task"] == "segmentation" and meta["head"]["kind"] == "unet" and meta["class_names"] == ["background", "lung"]
    loaded = load_model(tmp_path / "run")  # from the file alone, weights strict
    x = torch.randn(2, 1, 32, 32)
    probabilities = loaded.task.scores_of(loaded.module, x)
    assert probabilities.shape == (2, 2, 32, 32) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_segmentation_refuses_a_linear_probe_and_classification_data(tmp_path, shared_data):
    with pytest.raises(ValueError, match="no linear probe"):
        _tiny(tmp_path / "a", shared_data, mode="linear", pretrained="x.safetensors")
    with pytest.raises(ConfigError, match="label maps"):
        finetune(_tiny(tmp_path / "b", shared_data, dataset="pneumoniamnist", label_count=0, image_size=28))


def test_the_benchmark_grid_counts_labelled_images(tmp_path):
    config = BenchmarkConfig(run_dir=str(tmp_path), label_counts=(5, 0), seeds=(0, 1), inits=("resnet18-scratch",),
                             finetune=FinetuneConfig(task="segmentation", dataset="cxr-lungseg"))
    assert grid_cells(config) == [("resnet18-scratch", 5, 0), ("resnet18-scratch", 0, 0),
                                  ("resnet18-scratch", 5, 1), ("resnet18-scratch", 0, 1)]
    five = run_config(config, "resnet18-scratch", 5, 1, {})
    assert five.label_count == 5 and five.label_fraction == 1.0 and five.run_dir.endswith("resnet18-scratch_n5_s1")
    assert run_config(config, "resnet18-scratch", 0, 0, {}).run_dir.endswith("_nall_s0")


def test_a_segmentation_benchmark_refuses_pretraining_on_its_test_images():
    from chestssl.train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="test images"):
        BenchmarkConfig(label_counts=(5,), pretrain=PretrainConfig(sources=("kermany", "cxr-lungseg-all")),
                        finetune=FinetuneConfig(task="segmentation", dataset="cxr-lungseg"))
    BenchmarkConfig(label_counts=(5,), pretrain=PretrainConfig(sources=("kermany", "cxr-lungseg")),
                    finetune=FinetuneConfig(task="segmentation", dataset="cxr-lungseg"))


def test_segmentation_results_make_a_report_and_refuse_other_columns(tmp_path):
    for seed, dice in ((0, 0.8), (1, 0.9)):
        append_result(tmp_path / "results.csv", {
            "task": "segmentation", "init": "resnet18-scratch", "label_fraction": 1.0, "label_count": 5, "seed": seed, "n_train": 5,
            "n_val": 0, "selection": "fixed", "epochs": 3, "best_epoch": 2, "test_dice": dice, "test_hd95": 4.0,
            "test_hd95_missed": 0, "test_dice_lung": dice, "test_hd95_lung": 4.0, "seconds": 1.0})
    report = write_report(tmp_path).read_text()
    assert "| 5 images | resnet18-scratch | 5 | 2 | 0.850 ± 0.071 | 4.000 ± 0.000 |" in report
    assert "HD95 (px)" in report and "voxels" not in report
    (tmp_path / "config.yaml").write_text("finetune: {dataset: ct-cache, task: segmentation}\n")  # a 3D grid's
    report = write_report(tmp_path).read_text()
    assert "HD95 (voxels)" in report and "(px)" not in report
    with pytest.raises(DataError, match="another grid"):
        append_result(tmp_path / "results.csv", {"task": "classification", "init": "vit-scratch"})
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2


def test_predict_writes_each_xray_its_mask_at_its_own_size_and_export_matches(tmp_path, shared_data):
    from PIL import Image

    from chestssl.predict.export import export_onnx
    from chestssl.predict.run import predict_to_folder

    finetune(_tiny(tmp_path / "run", shared_data))
    images = sorted((shared_data / "cxr-lungseg" / "montgomery-shenzhen" / "images_512").glob("*.png"))[:3]
    report = predict_to_folder(tmp_path / "run", [str(p) for p in images], tmp_path / "out")
    assert report["predicted"] == 3 and report["failed"] == 0 and report["heatmap"] is False
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [k for k in rows[0] if k.startswith("area_")] == ["area_background", "area_lung"]
    assert all(abs(float(r["area_background"]) + float(r["area_lung"]) - 1) < 1e-5 for r in rows)
    masks = sorted((tmp_path / "out" / "masks").glob("*_mask.png"))
    assert len(masks) == 3 and len(list((tmp_path / "out" / "masks").glob("*_overlay.png"))) == 3
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 1}
    assert not any(p.stem in m.name for p in images for m in masks)  # named by id, not by the file name
    pytest.importorskip("onnxruntime")
    record = export_onnx(tmp_path / "run", tmp_path / "seg.onnx", [str(images[0])])
    assert record["output"]["shape"] == ["batch", 2, 32, 32] and record["check"]["max_abs_difference"] < 1e-4


def test_nodule_segmentation_in_3d_from_a_prepare_lidc_cache(tmp_path, shared_data):
    from chestssl.data.ct.cache import load_nodule_mask, read_manifest, save_volume
    from chestssl.data.ct.lidc import build_lidc_nodules
    from chestssl.data.datasets import load_cache_segmentation

    cache = tmp_path / "lidc"
    build_lidc_nodules(shared_data, cache, size=16, spacing_mm=2.0, limit=40, labels="max-vote")
    data = load_cache_segmentation(cache)
    assert data.spatial_dims == 3 and data.class_names == ("background", "nodule")
    total = len(data.train) + len(data.val) + len(data.test)
    assert total == sum(r["status"] == "ok" for r in read_manifest(cache))  # every nodule, labelled or not
    assert data.train.inputs.shape[1:] == (1, 16, 16, 16) and data.train.labels.shape[1:] == (16, 16, 16)
    assert not set(data.train.patient_ids) & set(data.test.patient_ids)
    share = data.train.labels.reshape(len(data.train), -1).mean(axis=1)
    assert (share > 0).all() and (share < 0.9).all()  # a nodule in every cube, never the whole cube
    result = finetune(FinetuneConfig(
        run_dir=str(tmp_path / "run"), dataset="ct-cache", cache_dir=str(cache), task="segmentation", encoder="resnet",
        resnet=ResNetConfig(widths=(8, 8, 8, 8), small_input=True), label_fraction=0.5, epochs=1, min_steps=3,
        batch_size=4, selection="fixed", checkpoint_every=0, views=ViewConfig(flip_axes=(-1, -2, -3))))
    assert result["n_train"] == round(0.5 * len(data.train)) and 0 <= result["test_dice_nodule"] <= 1
    assert load_model(tmp_path / "run").task.class_names == ("background", "nodule")
    old = tmp_path / "old"  # a cube written before the masks were cached: refused with the reason
    save_volume(old / "a.npz", np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))
    with pytest.raises(DataError, match="no nodule mask"):
        load_nodule_mask(old / "a.npz")
