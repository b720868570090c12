"""The encoder registry: every entry round-trips through its file, and a bad record is refused before building."""

import pytest
import torch

from chestssl.errors import CheckpointError
from chestssl.models.encoders import ENCODERS, architecture, build_encoder, parse_architecture, record_of
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig
from chestssl.train.checkpoint import atomic_save, load_encoder, read, save_encoder

SMALL = {"vit": ViTConfig(patch_size=4, hidden_size=16, depth=1, num_heads=2),
         "resnet": ResNetConfig(widths=(4, 8, 8, 16))}


def test_every_encoder_has_a_small_test_config():
    assert set(SMALL) == set(ENCODERS)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encoder_file_round_trip(kind, spatial_dims, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(architecture(kind, SMALL[kind], spatial_dims, 16)).eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, encoder, {"modality": "test"})
    loaded, meta = load_encoder(path)
    assert meta["architecture"] == record_of(encoder) and meta["architecture"]["kind"] == kind
    x = torch.randn(2, 1, *([16] * spatial_dims))
    assert torch.equal(loaded.eval()(x), encoder(x))


def test_bad_records_are_refused_before_building():
    record = architecture("vit", SMALL["vit"], 2, 16)
    with pytest.raises(ValueError, match="unknown encoder kind 'vot'"):
        parse_architecture({**record, "kind": "vot"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        parse_architecture({**record, "colour": "red"})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['depth'\]"):
        parse_architecture({k: v for k, v in record.items() if k != "depth"})
    with pytest.raises(ValueError, match="implausibly large"):
        parse_architecture({**record, "hidden_size": 1_000_000, "num_heads": 1})  # refused without allocating


def test_a_record_that_disagrees_with_the_tensors_is_refused(tmp_path):
    encoder = build_encoder(architecture("vit", SMALL["vit"], 2, 16))
    path = tmp_path / "e.safetensors"
    save_encoder(path, encoder, {})
    tensors, meta = read(path)
    meta["architecture"]["hidden_size"] = 32
    atomic_save(tensors, meta, path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_encoder(path)
    meta["architecture"]["colour"] = "red"
    atomic_save(tensors, meta, path)
    with pytest.raises(CheckpointError, match="unknown key"):
        load_encoder(path)
