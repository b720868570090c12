"""Every shipped config loads: its keys exist and its values pass validation (nothing is trained), and every label
budget of a benchmark on 2D data can be drawn from that data."""

from pathlib import Path

import pytest

from chestssl.config import load_config
from chestssl.train.pretrain import PretrainConfig
from chestssl.train.finetune import check_label_subsets
from chestssl.train.protocol import BenchmarkConfig, grid_runs

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    kind = PretrainConfig if path.name.startswith("pretrain") else BenchmarkConfig
    assert load_config(kind, path) is not None


LABELLED_2D = [p for p in CONFIGS if not p.name.startswith(("pretrain", "lidc"))]  # lidc*: a prepare-lidc cache


@pytest.mark.parametrize("path", LABELLED_2D, ids=[p.name for p in LABELLED_2D])
def test_every_budget_of_a_shipped_benchmark_can_be_drawn(shared_data, path):
    """Each cell's labelled and validation subsets, drawn from the real data: a fraction that leaves a class without a
    patient fails here, not hours into a benchmark."""
    config = load_config(BenchmarkConfig, path, [f"data_dir={shared_data}"])
    check_label_subsets(grid_runs(config))
