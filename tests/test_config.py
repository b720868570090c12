import pytest
import yaml

from chestssl.config import load_config, save_config
from chestssl.errors import ConfigError
from chestssl.train.finetune import FinetuneConfig
from chestssl.train.protocol import BenchmarkConfig


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nlabel_fraction: 0.1\n")
    config = load_config(FinetuneConfig, path, ["epochs=7", "views.crop_scale=[0.6, 1.0]", "pretrained=null",
                                                 "drop_path=0", "vit.depth=3"])
    assert config.epochs == 7 and config.label_fraction == 0.1 and config.vit.depth == 3
    assert config.views.crop_scale == (0.6, 1.0) and config.pretrained is None and config.drop_path == 0.0


def test_a_section_given_in_part_keeps_the_fields_own_defaults():
    config = load_config(FinetuneConfig, None, ["views.intensity=0.2"])
    assert config.views.intensity == 0.2 and config.views.crop_scale == FinetuneConfig().views.crop_scale == (0.7, 1.0)


def test_one_source_of_vit_defaults():
    from chestssl.models.vit import ViTConfig
    from chestssl.train.pretrain import PretrainConfig

    assert PretrainConfig().vit == FinetuneConfig().vit == ViTConfig()


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epohcs'\]"):
        load_config(FinetuneConfig, None, ["epohcs=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(FinetuneConfig, None, ["epochs=many"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_config(FinetuneConfig, None, ["mode=partial"])
    with pytest.raises(ConfigError, match="pretrain: unknown key"):
        load_config(BenchmarkConfig, None, ["pretrain.epoch=3"])


def test_nested_sections_and_saved_config_round_trip(tmp_path):
    config = load_config(BenchmarkConfig, None, ["pretrain.epochs=3", "finetune.lr=0.01", "seeds=[1, 2]",
                                                 "init_overrides={vit-scratch: [lr=0.002]}"])
    assert config.pretrain.epochs == 3 and config.finetune.lr == 0.01 and config.seeds == (1, 2)
    assert config.init_overrides == {"vit-scratch": ("lr=0.002",)}
    save_config(config, tmp_path / "config.yaml")
    assert load_config(BenchmarkConfig, tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["pretrain"]["epochs"] == 3
