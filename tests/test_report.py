"""The benchmark report's paired comparison and pretraining-cost table, on hand-made results."""

import json

import pytest

from chestssl.errors import DataError
from chestssl.report.tables import (append_result, confidence_interval, paired_differences, read_results, summarise,
                                    write_report)


def _row(init, fraction, seed, auc, acc):
    return {"init": init, "label_fraction": fraction, "seed": seed, "n_train": 47, "n_val": 5, "selection": "fixed",
            "epochs": 1, "best_epoch": 0, "val_auc": 1.0, "test_auc": auc, "test_acc": acc,
            "test_balanced_accuracy": acc, "test_f1_weighted": acc, "seconds": 1.0, "run_dir": "x"}


def test_paired_differences_pair_the_same_seed_and_count_wins(tmp_path):
    rows = [_row("resnet18-scratch", 0.01, 0, 0.80, 0.70), _row("resnet18-scratch", 0.01, 1, 0.90, 0.80),
            _row("resnet18-spark", 0.01, 0, 0.85, 0.70), _row("resnet18-spark", 0.01, 1, 0.88, 0.90),
            _row("resnet18-spark", 0.01, 2, 0.99, 0.99)]  # seed 2 has no scratch twin: left out
    for row in rows:
        append_result(tmp_path / "results.csv", row)
    results = read_results(tmp_path / "results.csv")
    (paired,) = paired_differences(results, summarise(results))
    assert paired["init"] == "resnet18-spark" and paired["seeds"] == 2
    assert paired["test_auc"][0] == pytest.approx(0.015) and paired["test_auc"][1] == pytest.approx(0.0495, abs=1e-4)
    assert paired["test_auc_better"] == 1 and paired["test_acc_better"] == 1  # a tie is not a win
    (tmp_path / "pretrain_spark").mkdir()
    (tmp_path / "pretrain_spark" / "config.yaml").write_text("method: spark\nencoder: resnet\nepochs: 20\n")
    records = [{"epoch": 0, "step": 24, "epoch_seconds": 150.0, "peak_rss_mib": 2048.0},
               {"epoch": 1, "step": 48, "epoch_seconds": 140.0, "peak_rss_mib": 3072.0}]
    (tmp_path / "pretrain_spark" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(tmp_path).read_text()
    # AUC, ACC and balanced accuracy (equal to ACC in these rows), each paired
    assert "| 1% | resnet18-spark | 2 | +0.015 ± 0.049 | 1 of 2 | +0.050 ± 0.071 | 1 of 2 | +0.050 ± 0.071 | 1 of 2 |\n" in report
    assert "| Bal. acc minus resnet18-scratch | better in |" in report
    assert "| pretrain_spark | spark | resnet | 2 of 20 | 24 | 145.0 | 3.00 GiB | not recorded |" in report


def test_label_efficiency_gives_what_each_init_loses_and_its_pretraining_cost(tmp_path):
    rows = [_row("resnet18-scratch", 1.0, 0, 0.98, 0.94), _row("resnet18-scratch", 0.01, 0, 0.90, 0.80),
            _row("resnet18-spark", 1.0, 0, 0.98, 0.92), _row("resnet18-spark", 0.01, 0, 0.93, 0.86),
            _row("resnet18-spark", 0.01, 1, 0.95, 0.88),
            _row("resnet18-mocov2", 0.01, 0, 0.91, 0.85)]  # never run at 100%: no row
    for row in rows:
        append_result(tmp_path / "results.csv", row)
    (tmp_path / "pretrain_spark").mkdir()
    (tmp_path / "pretrain_spark" / "config.yaml").write_text("method: spark\nencoder: resnet\nepochs: 20\n")
    record = {"epoch": 0, "step": 24, "epoch_seconds": 150.0, "peak_rss_mib": 2048.0}
    (tmp_path / "pretrain_spark" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    report = write_report(tmp_path).read_text()
    section = report.split("## From the most labels to the fewest")[1]
    assert "| resnet18-scratch | 0.980 | 0.900 | +0.080 | 0.940 | 0.800 | +0.140 | none |" in section
    # spark at 1% is the mean of its two seeds: AUC 0.94, ACC 0.87
    assert "| resnet18-spark | 0.980 | 0.940 | +0.040 | 0.920 | 0.870 | +0.050 | spark (pretrain_spark) | 150.0 | 1 of 20 | 2.00 GiB |" in section
    assert "resnet18-mocov2" not in section.split("## Pretraining cost")[0]


def test_label_efficiency_counts_a_rise_in_hd95_as_lost():
    from chestssl.report.tables import label_efficiency

    def entry(count, dice, hd95):
        return {"init": "vit-scratch", "label_fraction": count, "by_count": True, "test_dice": (dice, 0.0),
                "test_hd95": (hd95, 0.0)}
    metrics = [("test_dice", "Dice"), ("test_hd95", "HD95")]
    (row,) = label_efficiency([entry(5, 0.80, 9.0), entry(0, 0.95, 3.0)], [], metrics)  # 0: all images
    assert row["test_dice"] == pytest.approx(0.15) and row["test_hd95"] == pytest.approx(6.0)
    assert row["cost"] is None


def test_a_pretrained_vit_is_also_paired_with_the_vit_from_scratch(tmp_path):
    rows = [_row("resnet18-scratch", 0.1, 0, 0.90, 0.80), _row("vit-scratch", 0.1, 0, 0.85, 0.75),
            _row("vit-mae", 0.1, 0, 0.88, 0.74)]
    for row in rows:
        append_result(tmp_path / "results.csv", row)
    report = write_report(tmp_path).read_text()
    against_vit = report.split("## Against vit-scratch, seed by seed")[1]
    assert "| 10% | vit-mae | 1 | +0.030 | 1 of 1 | -0.010 | 0 of 1 |" in against_vit
    assert "| 10% | vit-mae | 1 | -0.020 | 0 of 1 | -0.060 | 0 of 1 |" in report.split("## Against vit-scratch")[0]
    assert "vit-scratch, seed by seed" not in write_report(_only_resnets(tmp_path)).read_text()


def _only_resnets(tmp_path):
    folder = tmp_path / "resnets"
    folder.mkdir()
    for row in [_row("resnet18-scratch", 0.1, 0, 0.90, 0.80), _row("resnet18-spark", 0.1, 0, 0.91, 0.80)]:
        append_result(folder / "results.csv", row)
    return folder


def test_the_report_pairs_with_any_init_the_user_names_and_refuses_one_it_lacks(tmp_path):
    rows = [_row("resnet18-scratch", 0.01, 0, 0.80, 0.70), _row("resnet18-spark", 0.01, 0, 0.92, 0.85),
            _row("resnet18-mocov2", 0.01, 0, 0.86, 0.80)]
    for row in rows:
        append_result(tmp_path / "results.csv", row)
    against_moco = write_report(tmp_path, ("resnet18-mocov2",)).read_text().split("## Against resnet18-mocov2")[1]
    assert "| 1% | resnet18-spark | 1 | +0.060 | 1 of 1 | +0.050 | 1 of 1 |" in against_moco
    assert "| 1% | resnet18-scratch | 1 | -0.060 | 0 of 1 | -0.100 | 0 of 1 |" in against_moco
    with pytest.raises(DataError, match="resnet18-byol: not in"):
        write_report(tmp_path, ("resnet18-byol",))


def test_the_auc_interval_stays_inside_zero_and_one():
    low, high = confidence_interval([0.848, 0.561, 0.664])  # t(2) = 4.30: the raw interval is [0.330, 1.052]
    assert low == pytest.approx(0.330, abs=1e-3) and high == 1.0
    low, high = confidence_interval([0.80, 0.82])
    assert low == pytest.approx(0.81 - 12.706 * 0.01, abs=1e-3) and high == pytest.approx(0.81 + 12.706 * 0.01, abs=1e-3)
    assert all(v != v for v in confidence_interval([0.9]))  # one seed: no interval
