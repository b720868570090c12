"""End to end through the command line: pretraining, the label-fraction grid and the report, on real data."""

import csv
import json

import pytest

from chestssl.cli import main

TINY_VIT = ["vit.hidden_size=32", "vit.depth=1", "vit.num_heads=2"]


def test_tiny_benchmark_end_to_end_and_resume(shared_data, tmp_path, capsys):
    run_dir = tmp_path / "bench"
    arguments = [
        "benchmark", "--data-dir", str(shared_data), "--run-dir", str(run_dir),
        "fractions=[0.02, 0.1]", "seeds=[0, 1]", "inits=[resnet18-scratch, vit-scratch, vit-mae]",
        "pretrain.sources=[pneumoniamnist]", "pretrain.epochs=1", "pretrain.batch_size=512",
        "finetune.epochs=1", "finetune.min_steps=2", "finetune.batch_size=64", "finetune.resnet.widths=[8,16,16,16]",
        *[f"pretrain.{o}" for o in TINY_VIT], *[f"finetune.{o}" for o in TINY_VIT],
    ]
    assert main(arguments) == 0
    assert "report:" in capsys.readouterr().out
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == 12
    assert {(r["init"], float(r["label_fraction"]), int(r["seed"])) for r in rows} == {
        (i, f, s) for i in ("resnet18-scratch", "vit-scratch", "vit-mae") for f in (0.02, 0.1) for s in (0, 1)
    }
    for row in rows:
        assert 0.0 <= float(row["test_auc"]) <= 1.0 and 0.0 <= float(row["test_acc"]) <= 1.0
        assert "same fraction" in row["selection"]
    two_percent = [r for r in rows if float(r["label_fraction"]) == 0.02]
    assert {int(r["n_train"]) for r in two_percent} == {94}  # 2% of 4708, stratified
    assert {int(r["n_val"]) for r in two_percent} == {11}  # 2% of the 524 validation labels: 3 normal + 8 pneumonia
    report = (run_dir / "report.md").read_text()
    assert "| 2% | vit-mae | 94 | 2 |" in report and "±" in report
    assert (run_dir / "report.html").read_text().startswith("<!doctype html>")
    cost = next(line for line in report.splitlines() if line.startswith("| pretrain |"))
    assert cost.startswith("| pretrain | mae | vit | 1 of 1 | 10 |") and cost.endswith("GiB | not recorded |")
    assert "<h2>Pretraining cost</h2>" in (run_dir / "report.html").read_text()
    assert (run_dir / "metric_vs_fraction.png").stat().st_size > 1000
    assert list((run_dir / "pretrain").glob("reconstruction_epoch*.png"))
    first = run_dir / "runs" / "vit-mae_f0.02_s0"
    assert (first / "config.yaml").exists() and (first / "metrics.jsonl").exists()
    assert json.loads((first / "results.json").read_text())["init"].startswith("mae:")
    assert json.loads((run_dir / "pretrain" / "encoder.json").read_text())["preprocessing"]["image_size"] == 28

    assert main(arguments) == 0  # a finished grid is not run again
    assert len(list(csv.DictReader((run_dir / "results.csv").open()))) == 12
    saved = (run_dir / "config.yaml").read_text()
    assert main(arguments + ["finetune.lr=0.5"]) == 2  # a finished cell is not reused under another config
    assert "finetune.lr=0.5" not in saved and (run_dir / "config.yaml").read_text() == saved  # nothing rewritten
    assert row_count(run_dir) == 12
    assert {r["code_version"] for r in csv.DictReader((run_dir / "results.csv").open())} != {""}


def row_count(run_dir) -> int:
    return len(list(csv.DictReader((run_dir / "results.csv").open())))


def test_changed_settings_are_named(shared_data, tmp_path, caplog):
    run = ["finetune", "--data-dir", str(shared_data), "--run-dir", str(tmp_path / "ft"), "label_fraction=0.02",
           "epochs=1", "min_steps=1", "batch_size=64", "selection=fixed", *TINY_VIT]
    assert main(run) == 0
    first = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert main(run) == 0  # the same config: reused
    assert main(run + ["lr=0.01"]) == 2
    assert "lr: 0.001 -> 0.01" in caplog.text
    assert main(run + ["lr=0.01", "overwrite=true"]) == 0  # on request, run again
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["test_auc"] != first["test_auc"]
    model = tmp_path / "ft" / "model.safetensors"
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["task"] == "classification" and meta["class_names"] == ["normal", "pneumonia"]
    assert meta["encoder"]["kind"] == "vit" and meta["threshold"] == 0.5 and meta["preprocessing"]["image_size"] == 28


def test_unknown_key_exits_with_a_message(caplog):
    assert main(["finetune", "epochz=3"]) == 2
    assert "unknown key(s) ['epochz']" in caplog.text


@pytest.mark.parametrize("command", ["pretrain", "finetune", "benchmark"])
def test_help_lists_overrides(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "key=value" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pretrain", "finetune", "benchmark", "prepare-ct"])
def test_help_lists_every_setting_with_its_meaning(command, capsys):
    from chestssl.cli import _config_class
    from chestssl.config import describe_settings

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for key, kind, default, meaning in describe_settings(_config_class(command)):
        assert f"  {key} " in out and f"default {default}]" in out
        assert meaning, f"{command} setting {key} has no one-line meaning (a comment after its field)"


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "chestssl", "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and "pretrain" in completed.stdout
