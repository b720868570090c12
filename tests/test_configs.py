"""Every shipped config loads: its keys exist and its values pass validation (nothing is run)."""

from pathlib import Path

import pytest

from chestssl.config import load_config
from chestssl.train.pretrain import PretrainConfig
from chestssl.train.protocol import BenchmarkConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    kind = PretrainConfig if path.name.startswith("pretrain") else BenchmarkConfig
    assert load_config(kind, path) is not None
