"""Robustness under drift: the external NIH set's labels, the resolution-only copy, and a table per run."""

import csv

import numpy as np
import pytest
import yaml

from chestssl.data.datasets import load_dataset
from chestssl.errors import DataError
from chestssl.models.resnet import ResNetConfig
from chestssl.train.drift import drift_table, evaluate_on, nih_pneumonia, through_low_resolution, write_drift_markdown
from chestssl.train.finetune import FinetuneConfig, finetune


def test_nih_pneumonia_is_no_finding_against_the_three_findings(shared_data):
    images, labels = nih_pneumonia(shared_data, 28)
    nih = load_dataset("nih-cxr14", shared_data, image_size=28)
    wanted = nih.labels[:, [6, 8, 3]].max(axis=1) == 1  # Pneumonia, Consolidation, Infiltration
    assert labels.sum() == wanted.sum() and (labels == 0).sum() == (nih.labels.sum(axis=1) == 0).sum()
    assert images.shape == (len(labels), 1, 28, 28) and 0 < labels.mean() < 1


def test_through_low_resolution_loses_detail_but_keeps_the_size():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    low = through_low_resolution(images, 8)
    assert low.shape == images.shape and low.dtype == np.uint8
    assert low.astype(float).std() < images.astype(float).std() / 2  # the noise is averaged away


def test_drift_table_scores_every_run_on_every_set_and_refuses_nih_in_pretraining(tmp_path, shared_data):
    run_dir = tmp_path / "bench" / "runs" / "a"
    config = FinetuneConfig(run_dir=str(run_dir), data_dir=str(shared_data), dataset="pneumoniamnist", encoder="resnet",
                            resnet=ResNetConfig(widths=(8, 16, 16, 16)), label_fraction=0.05, epochs=1, batch_size=64,
                            selection="fixed", checkpoint_every=0)
    finetune(config)
    test = load_dataset("pneumoniamnist", shared_data).where_split("test")
    sets = {"in-distribution": (test.images, test.labels), "resolution": (through_low_resolution(test.images, 14), test.labels),
            "external": nih_pneumonia(shared_data, 28)}
    values = evaluate_on(run_dir, sets)
    assert set(values) == set(sets) and all(0 <= v["auc"] <= 1 for v in values.values())
    bench = tmp_path / "bench"
    with (bench / "results.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, ["init", "label_fraction", "seed", "run_dir"])
        writer.writeheader()
        writer.writerow({"init": "vit-mae", "label_fraction": 0.05, "seed": 0, "run_dir": str(run_dir)})
    (bench / "config.yaml").write_text(yaml.safe_dump({"pretrain": {"sources": ["pneumoniamnist", "nih-cxr14"]}}))
    with pytest.raises(DataError, match="external test set"):
        drift_table(bench, shared_data)


def test_drift_markdown_pairs_the_auc_lost_with_the_scratch_twin_seed_by_seed(tmp_path):
    # seed s: the pretrained ViT loses 0.10 + s/100 AUC to the external set, its scratch twin 0.20 (pairs -0.10, -0.09)
    rows = []
    for seed in (0, 1):
        for init, inside, outside in (("vit-scratch", 0.90, 0.70), ("vit-mae", 0.92, 0.82 - seed / 100)):
            for name, auc in (("in-distribution", inside), ("resolution", inside - 0.01), ("external", outside)):
                rows.append({"init": init, "label_fraction": "0.1", "seed": str(seed), "set": name,
                             "test_auc": auc, "test_balanced_accuracy": auc - 0.1})
    text = write_drift_markdown(tmp_path / "drift.md", rows).read_text()
    assert "| 10% | vit-mae | 2 | 0.920 ± 0.000 | 0.910 ± 0.000 | 0.815 ± 0.007 | 0.105 ± 0.007 |" in text
    assert "## Against vit-scratch, seed by seed" in text and "resnet18-scratch" not in text
    # external AUC +0.115 ± 0.007 better in both seeds; AUC lost -0.095 ± 0.007, lower in both (lower is better)
    assert "| 10% | vit-mae | 2 | +0.115 ± 0.007 | 2 of 2 | -0.095 ± 0.007 | 2 of 2 |" in text
