"""3D end to end on real LIDC nodules: cache -> MAE with the lung-weighted loss -> fine-tuning, and refusals."""

import json

import pytest

from chestssl.data.ct.lidc import build_lidc_nodules
from chestssl.errors import CheckpointError
from chestssl.train.finetune import FinetuneConfig, finetune
from chestssl.train.pretrain import PretrainConfig, pretrain

from chestssl.methods.mae import MAEConfig
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig

TINY = {"vit": ViTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=8)}


@pytest.fixture(scope="module")
def nodule_cache(shared_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lidc16")
    build_lidc_nodules(shared_data, cache, size=16, spacing_mm=2.0, limit=80)
    return cache


def test_lung_weighted_3d_pretraining_then_finetuning(nodule_cache, tmp_path):
    encoder = pretrain(PretrainConfig(
        run_dir=str(tmp_path / "pretrain"), spatial_dims=3, cache_dirs=(str(nodule_cache),), **TINY,
        mae=MAEConfig(32, 1, 2, norm_pix_loss=False, loss="l1", lung_weight=0.01), epochs=2, batch_size=8,
        warmup_epochs=0, grid_every=1, device="cpu",
    ))
    meta = json.loads(encoder.with_suffix(".json").read_text())
    assert meta["method_config"]["lung_weight"] == 0.01 and meta["architecture"]["spatial_dims"] == 3
    assert meta["preprocessing"]["size"] == 16 and meta["preprocessing"]["modality"] == "ct"
    assert (tmp_path / "pretrain" / "reconstruction_epoch002.png").exists()

    common = dict(dataset="ct-cache", cache_dir=str(nodule_cache), label_fraction=0.5, selection="full", epochs=1, min_steps=2,
                  batch_size=8, device="cpu", **TINY)
    result = finetune(FinetuneConfig(run_dir=str(tmp_path / "mae"), pretrained=str(encoder), **common))
    assert result["init"].startswith("mae:") and 0 <= result["test_auc"] <= 1
    resnet = finetune(FinetuneConfig(run_dir=str(tmp_path / "resnet"), encoder="resnet",
                                     resnet=ResNetConfig(widths=(8, 16, 16, 32)), **common))
    assert resnet["n_train"] == result["n_train"] and resnet["n_val"] == result["n_val"]


def test_encoder_from_other_preprocessing_is_refused(nodule_cache, shared_data, tmp_path):
    encoder = pretrain(PretrainConfig(
        run_dir=str(tmp_path / "pretrain"), spatial_dims=3, cache_dirs=(str(nodule_cache),), **TINY,
        mae=MAEConfig(32, 1, 2), epochs=1, batch_size=8, device="cpu",
    ))
    other = tmp_path / "lidc32"
    build_lidc_nodules(shared_data, other, size=32, spacing_mm=1.0, limit=20)
    with pytest.raises(CheckpointError, match="size: encoder 16 vs data 32"):
        finetune(FinetuneConfig(run_dir=str(tmp_path / "ft"), dataset="ct-cache", cache_dir=str(other),
                                pretrained=str(encoder), device="cpu", **TINY))


def test_pretraining_leaves_out_the_test_volumes_of_a_cache_without_splits(tmp_path):
    """A prepare-ct cache without a split column was once pretrained on whole while fine-tuning drew its test split
    afterwards; the split is now recorded with the cache, and pretraining excludes its test volumes."""
    import numpy as np

    from chestssl.data.ct.cache import read_manifest, save_volume, write_manifest
    from chestssl.data.datasets import load_cache_splits
    from chestssl.train.pretrain import unlabelled_volumes

    cache, rng = tmp_path / "cache", np.random.default_rng(0)
    rows = []
    for index in range(30):
        save_volume(cache / f"v{index}.npz", rng.random((8, 8, 8), dtype=np.float32), np.ones((8, 8, 8), bool))
        rows.append({"id": f"v{index}", "status": "ok", "file": f"v{index}.npz", "label": str(index % 2),
                     "patient_id": f"p{index // 2}"})
    write_manifest(cache, rows)  # no split column, as an older prepare-ct wrote it
    (cache / "preprocessing.json").write_text(json.dumps({"modality": "ct", "spatial_dims": 3, "size": 8}))
    files, _ = unlabelled_volumes(PretrainConfig(spatial_dims=3, cache_dirs=(str(cache),)))
    recorded = {row["file"]: row["split"] for row in read_manifest(cache)}
    assert set(recorded.values()) == {"train", "val", "test"}  # written beside the cache, once
    test_files = {cache / f for f, split in recorded.items() if split == "test"}
    assert test_files and not test_files & set(files) and len(files) == 30 - len(test_files)
    labelled = load_cache_splits(cache)
    assert set(labelled.test.inputs) == test_files  # fine-tuning tests on exactly the volumes pretraining left out
