"""The benchmark grid: which encoder each initialisation gets, and the two pretrainings that differ in the loss."""

import dataclasses
from pathlib import Path

import pytest

from chestssl.config import load_config
from chestssl.errors import ConfigError
from chestssl.train import protocol
from chestssl.train.protocol import BenchmarkConfig, run_config

REPO = Path(__file__).resolve().parents[2]


def test_each_init_gets_its_encoder_and_its_overrides():
    config = load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml")
    encoders = {"encoder": "plain.safetensors", "encoder_lung": "lung.safetensors"}
    assert run_config(config, "vit-mae", 1.0, 0, encoders).encoder == "plain.safetensors"
    assert run_config(config, "vit-mae-lung", 1.0, 0, encoders).encoder == "lung.safetensors"
    scratch = run_config(config, "resnet18-scratch", 0.01, 2, encoders)
    assert scratch.encoder is None and scratch.model == "resnet18" and scratch.weight_decay == 1e-4
    assert scratch.selection == "fixed" and scratch.seed == 2 and scratch.run_dir.endswith("resnet18-scratch_f0.01_s2")


def test_a_lung_weighted_vit_mae_encoder_is_refused():
    with pytest.raises(ConfigError, match="lung_weight"):
        load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml", ["pretrain.lung_weight=0.5"])


def test_two_pretrainings_differ_only_in_the_loss(tmp_path, monkeypatch):
    pretrained, finetuned = [], []

    def fake_pretrain(config):
        pretrained.append(config)
        return Path(config.run_dir) / "encoder.safetensors"

    def fake_finetune(config):
        finetuned.append(config)
        return {"label_fraction": config.label_fraction, "seed": config.seed, "n_train": 1,
                "selection": config.selection, **dict.fromkeys(["test_auc", "test_acc", "test_balanced_accuracy",
                                                                "test_f1_weighted"], 0.5)}

    monkeypatch.setattr(protocol, "pretrain", fake_pretrain)
    monkeypatch.setattr(protocol, "finetune", fake_finetune)
    config = load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml",
                         [f"run_dir={tmp_path}", "seeds=[0]", "fractions=[1.0]"])
    protocol.benchmark(config)
    plain, lung = pretrained
    assert plain.lung_weight is None and lung.lung_weight == 0.01
    assert dataclasses.replace(lung, lung_weight=None, run_dir=plain.run_dir) == plain
    assert {c.encoder for c in finetuned} == {None, str(Path(plain.run_dir) / "encoder.safetensors"),
                                              str(Path(lung.run_dir) / "encoder.safetensors")}
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + len(config.inits)
