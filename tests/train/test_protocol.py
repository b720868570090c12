"""The benchmark grid: which encoder each initialisation gets, and the two pretrainings that differ in the loss."""

import dataclasses
from pathlib import Path

import pytest

from chestssl.config import load_config
from chestssl.errors import ConfigError, DataError
from chestssl.train import protocol
from chestssl.train.protocol import BenchmarkConfig, run_config

REPO = Path(__file__).resolve().parents[2]


def test_each_init_gets_its_encoder_and_its_overrides():
    config = load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml")
    encoders = {"pretrained": "plain.safetensors", "pretrained_lung": "lung.safetensors"}
    assert run_config(config, "vit-mae", 1.0, 0, encoders).pretrained == "plain.safetensors"
    assert run_config(config, "vit-mae-lung", 1.0, 0, encoders).pretrained == "lung.safetensors"
    twin = run_config(config, "vit-scratch", 1.0, 0, encoders)
    assert twin.pretrained is None and twin.architecture_of == "plain.safetensors"  # the pretrained ViT's twin
    assert run_config(config, "vit-scratch", 1.0, 0, {}).architecture_of is None  # no encoder: the vit section
    scratch = run_config(config, "resnet18-scratch", 0.01, 2, encoders)
    assert scratch.pretrained is None and scratch.encoder == "resnet" and scratch.resnet.depth == 18
    assert scratch.weight_decay == 1e-4 and not scratch.resnet.small_input
    assert scratch.selection == "fixed" and scratch.seed == 2 and scratch.run_dir.endswith("resnet18-scratch_f0.01_s2")


def test_a_lung_weighted_vit_mae_encoder_is_refused():
    with pytest.raises(ConfigError, match="lung_weight"):
        load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml", ["pretrain.mae.lung_weight=0.5"])


def recording_runs(monkeypatch):
    """Pretraining and fine-tuning replaced by recorders of their configs; returns the two lists."""
    pretrained, finetuned = [], []

    def fake_pretrain(config):
        pretrained.append(config)
        return Path(config.run_dir) / "encoder.safetensors"

    def fake_finetune(config):
        finetuned.append(config)
        return {"encoder": config.encoder, "label_fraction": config.label_fraction, "seed": config.seed, "n_train": 1,
                "selection": config.selection, **dict.fromkeys(["test_auc", "test_acc", "test_balanced_accuracy",
                                                                "test_f1_weighted"], 0.5)}

    monkeypatch.setattr(protocol, "pretrain", fake_pretrain)
    monkeypatch.setattr(protocol, "finetune", fake_finetune)
    monkeypatch.setattr(protocol, "check_label_subsets", lambda configs: None)  # loads data: tested on its own
    return pretrained, finetuned


def test_two_pretrainings_differ_only_in_the_loss(tmp_path, monkeypatch):
    pretrained, finetuned = recording_runs(monkeypatch)
    config = load_config(BenchmarkConfig, REPO / "configs/lidc32.yaml",
                         [f"run_dir={tmp_path}", "seeds=[0]", "fractions=[1.0]"])
    protocol.benchmark(config)
    plain, lung = pretrained
    assert plain.mae.lung_weight is None and lung.mae.lung_weight == 0.01
    assert dataclasses.replace(lung, mae=plain.mae, run_dir=plain.run_dir) == plain
    assert {c.pretrained for c in finetuned} == {None, str(Path(plain.run_dir) / "encoder.safetensors"),
                                                 str(Path(lung.run_dir) / "encoder.safetensors")}
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + len(config.inits)


def recorded_benchmark(monkeypatch, tmp_path, config_file, overrides):
    """The config of ``config_file`` with ``overrides``, one seed at 100%, run with recorders: (config, the
    pretraining configs, the fine-tuning configs)."""
    pretrained, finetuned = recording_runs(monkeypatch)
    config = load_config(BenchmarkConfig, REPO / "configs" / config_file,
                         [f"run_dir={tmp_path}", "seeds=[0]", "fractions=[1.0]", *overrides])
    protocol.benchmark(config)
    return config, pretrained, finetuned


def test_method_overrides_reach_the_vit_mae_pretraining_too(tmp_path, monkeypatch):
    _, pretrained, _ = recorded_benchmark(monkeypatch, tmp_path, "lidc32_seg.yaml", [
        "inits=[vit-mae, vit-groupmask]", "method_overrides={mae: [epochs=7], groupmask: [epochs=3]}"])
    by_method = {c.method: c for c in pretrained}
    assert by_method["mae"].epochs == 7 and by_method["groupmask"].epochs == 3
    assert dataclasses.replace(by_method["mae"], epochs=3, method="groupmask", run_dir=by_method["groupmask"].run_dir) \
        == by_method["groupmask"]  # nothing else differs
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(BenchmarkConfig, None, ["method_pretrained={mae: x.safetensors}"])


def test_more_seeds_where_runs_are_cheap():
    config = load_config(BenchmarkConfig, None, ["fractions=[0.01, 1.0]", "seeds=[0, 1]", "inits=[vit-scratch]",
                                                 "fraction_seeds={0.01: [0, 1, 2, 3]}"])
    cells = protocol.grid_cells(config)
    assert [(f, s) for _, f, s in cells] == [(0.01, 0), (1.0, 0), (0.01, 1), (1.0, 1), (0.01, 2), (0.01, 3)]
    with pytest.raises(ConfigError, match="fraction_seeds"):
        load_config(BenchmarkConfig, None, ["fraction_seeds={0.5: [0]}"])


def test_each_cnn_method_gets_its_own_pretraining_and_the_scratch_resnet_is_its_twin(tmp_path, monkeypatch):
    config, pretrained, finetuned = recorded_benchmark(monkeypatch, tmp_path, "pneumoniamnist28_cnn.yaml", [
        "fraction_seeds={}", "inits=[resnet18-scratch, resnet18-spark, resnet18-simclr-ft, resnet18-byol-linear]"])
    by_method = {c.method: c for c in pretrained}
    assert sorted(by_method) == ["byol", "simclr", "spark"] and {c.encoder for c in pretrained} == {"resnet"}
    assert len({c.resnet for c in pretrained} | {config.finetune.resnet}) == 1  # one architecture for all
    runs = {Path(c.run_dir).name.split("_f")[0]: c for c in finetuned}
    assert runs["resnet18-spark"].pretrained == str(Path(by_method["spark"].run_dir) / "encoder.safetensors")
    assert runs["resnet18-simclr-ft"].freeze_epochs > 0 and runs["resnet18-byol-linear"].mode == "linear"
    with pytest.raises(ConfigError, match="twins"):
        load_config(BenchmarkConfig, REPO / "configs/pneumoniamnist28_cnn.yaml", ["pretrain.resnet.small_input=false"])


def test_a_budget_the_data_cannot_give_stops_the_benchmark_before_pretraining(shared_data, tmp_path, monkeypatch):
    pretrained, finetuned = [], []  # recorders that must never be reached; the label check is the real one
    monkeypatch.setattr(protocol, "pretrain", lambda config: pretrained.append(config))
    monkeypatch.setattr(protocol, "finetune", lambda config: finetuned.append(config))
    settings = [f"run_dir={tmp_path}", f"data_dir={shared_data}", "seeds=[0]", "inits=[resnet18-scratch,resnet18-spark]"]
    # sarscov2-ct draws labels by whole runs: 1% of its 29 COVID runs rounds to none
    config = load_config(BenchmarkConfig, REPO / "configs/sarscov2_cnn.yaml", [*settings, "fractions=[0.01]"])
    with pytest.raises(DataError, match="class 'covid' of the training split"):
        protocol.benchmark(config)
    # 2% draws one run per class, but a validation subset of 2% would hold no non-COVID run
    config = load_config(BenchmarkConfig, REPO / "configs/sarscov2_cnn.yaml",
                         [*settings, "fractions=[0.02]", "fraction_overrides={0.02: [selection=fraction]}"])
    with pytest.raises(DataError, match="validation split"):
        protocol.benchmark(config)
    assert pretrained == [] and finetuned == []
