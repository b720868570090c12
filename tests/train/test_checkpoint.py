import dataclasses
import json

import numpy as np

import pytest
import torch

from chestssl.errors import CheckpointError, ConfigError
from chestssl.models.vit import ViT, ViTConfig
from chestssl.methods import METHODS
from chestssl.methods.spark import SparKConfig
from chestssl.methods.swav import SwAVConfig
from chestssl.train.checkpoint import (
    check_preprocessing,
    check_resumable,
    load_training_state,
    load_weights,
    read_encoder,
    save_encoder,
    save_training_state,
)
from chestssl.data.batch import Normalisation, xray_preprocessing
from chestssl.data.datasets import Labelled, Split
from chestssl.train.finetune import FinetuneConfig, build_run_encoder
from chestssl.train.loop import resume_identity
from chestssl.train.pretrain import PretrainConfig
from chestssl.train.reuse import check_reusable

SMALL = ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2)


def small(config: ViTConfig = SMALL) -> ViT:
    return ViT(config, image_size=16)
PREPROCESSING = xray_preprocessing(16, Normalisation())


def xray_data(image_size: int, std: float = 0.25) -> Labelled:
    empty = Split(np.zeros((0, 1, image_size, image_size), np.uint8), np.zeros(0, np.int64), None)
    return Labelled(empty, empty, empty, "binary", ("a", "b"), 2, xray_preprocessing(image_size, Normalisation(0.5, std)))


def test_training_state_round_trip(tmp_path):
    model = small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    optimizer.step()
    save_training_state(tmp_path / "c.safetensors", model, optimizer, {"epoch": 3}, {"arch": "a"})
    restored = small()
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    progress = load_training_state(tmp_path / "c.safetensors", restored, restored_optimizer, {"arch": "a"})
    assert progress == {"epoch": 3}
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    state = restored_optimizer.state_dict()["state"][0]
    assert torch.equal(state["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="other settings.*arch"):
        load_training_state(tmp_path / "c.safetensors", restored, restored_optimizer, {"arch": "b"})


def test_a_pretraining_identity_leaves_out_the_sections_it_never_reads():
    spark = PretrainConfig(method="spark", encoder="resnet", spark=SparKConfig(mask_cell=8))
    assert set(spark.unused_sections()) == set(METHODS) - {"spark"} | {"vit"}
    other_swav = dataclasses.replace(spark, swav=SwAVConfig(local_crop_size=16))  # another method's setting
    assert resume_identity(spark, spark.unused_sections()) == resume_identity(other_swav, other_swav.unused_sections())
    changed = dataclasses.replace(spark, spark=SparKConfig(mask_cell=4))  # the run's own method's setting
    assert resume_identity(spark, spark.unused_sections()) != resume_identity(changed, changed.unused_sections())


def test_a_finetuning_identity_leaves_out_the_encoder_sizes_it_never_reads(tmp_path):
    resnet = FinetuneConfig(encoder="resnet")
    other_vit = dataclasses.replace(resnet, vit=ViTConfig(patch_size=8))
    assert resume_identity(resnet, resnet.unused_sections()) == resume_identity(other_vit, other_vit.unused_sections())
    deeper = dataclasses.replace(resnet, resnet=dataclasses.replace(resnet.resnet, depth=34))
    assert resume_identity(resnet, resnet.unused_sections()) != resume_identity(deeper, deeper.unused_sections())
    from_file = FinetuneConfig(pretrained="encoder.safetensors")  # the file gives the architecture
    assert set(from_file.unused_sections()) == {"vit", "resnet"}
    # a result stored with every section (as before) is still reused, and a change in the section read is not
    identity = resume_identity(resnet, resnet.unused_sections())
    (tmp_path / "results.json").write_text(json.dumps({"test_auc": 0.9, "identity": resume_identity(other_vit)}))
    assert check_reusable(tmp_path, identity, overwrite=False) == {"test_auc": 0.9}
    with pytest.raises(ConfigError, match="resnet.depth: 18 -> 34"):
        check_reusable(tmp_path, resume_identity(deeper, deeper.unused_sections()), overwrite=False)


def test_a_checkpoint_that_holds_every_section_resumes_when_the_sections_read_match(tmp_path):
    """Checkpoints written before unused sections left the identity hold them all: they still resume, while a
    difference in a section the run reads, or in a plain setting, is refused as before."""
    model = small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path / "c.safetensors"
    full = {"config": {"method": "spark", "epochs": 2, "spark": {"mask_cell": 8}, "swav": {"local_crop_size": 16}}}
    save_training_state(path, model, optimizer, {"epoch": 1}, full)
    narrowed = {"config": {"method": "spark", "epochs": 2, "spark": {"mask_cell": 8}}}
    check_resumable(path, narrowed)
    assert load_training_state(path, small(), torch.optim.AdamW(small().parameters()), narrowed) == {"epoch": 1}
    with pytest.raises(CheckpointError, match="other settings.*mask_cell"):
        check_resumable(path, {"config": {"method": "spark", "epochs": 2, "spark": {"mask_cell": 4}}})
    with pytest.raises(CheckpointError, match="other settings.*epochs"):
        check_resumable(path, {"config": {"method": "spark", "spark": {"mask_cell": 8}}})


def test_checkpoint_files_are_safetensors_not_pickle(tmp_path):
    save_encoder(tmp_path / "e.safetensors", small(), PREPROCESSING)
    header_length = int.from_bytes((tmp_path / "e.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "e.safetensors").read_bytes()[8 : 8 + header_length])
    assert "__metadata__" in header and "pos_embed" not in header  # fixed buffers are not weights
    assert json.loads((tmp_path / "e.json").read_text())["preprocessing"]["image_size"] == 16


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "e.safetensors"
    save_encoder(path, small(), PREPROCESSING)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_encoder(path)
    (tmp_path / "x.pt").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match=r"x\.pt"):
        read_encoder(tmp_path / "x.pt")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    save_encoder(path, small(), PREPROCESSING)
    tensors, _ = read_encoder(path)
    other = small(ViTConfig(patch_size=4, hidden_size=48, depth=1, num_heads=2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(other, tensors, str(path))
    deeper = small(ViTConfig(patch_size=4, hidden_size=32, depth=2, num_heads=2))
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(deeper, tensors, str(path))


def test_finetuning_refuses_an_encoder_with_other_preprocessing(tmp_path):
    path = tmp_path / "e.safetensors"
    save_encoder(path, small(), PREPROCESSING)
    encoder, source = build_run_encoder(FinetuneConfig(image_size=16, pretrained=str(path)), xray_data(16))
    assert encoder.config.depth == 1 and source.endswith("e.safetensors")
    with pytest.raises(CheckpointError, match="image_size: encoder 16 vs data 28"):
        build_run_encoder(FinetuneConfig(image_size=28, pretrained=str(path)), xray_data(28))
    with pytest.raises(CheckpointError, match="normalisation"):
        build_run_encoder(FinetuneConfig(image_size=16, pretrained=str(path)), xray_data(16, std=0.5))
    with pytest.raises(CheckpointError, match="normalisation"):
        check_preprocessing(path, PREPROCESSING, xray_preprocessing(16, Normalisation(0.5, 0.5)))


def test_the_twin_is_built_from_the_pretrained_architecture(tmp_path):
    path = tmp_path / "e.safetensors"
    save_encoder(path, small(ViTConfig(patch_size=8, hidden_size=24, depth=3, num_heads=3)), PREPROCESSING)
    twin, source = build_run_encoder(FinetuneConfig(image_size=16, architecture_of=str(path)), xray_data(16))
    pretrained, _ = build_run_encoder(FinetuneConfig(image_size=16, pretrained=str(path)), xray_data(16))
    assert source == "scratch" and twin.config == pretrained.config  # declared once, in the encoder file
    assert not torch.equal(twin.blocks[0].qkv.weight, pretrained.blocks[0].qkv.weight)


def test_stale_temporary_files_of_a_killed_write_are_removed(tmp_path):
    from chestssl.train.checkpoint import remove_stale_temporaries

    (tmp_path / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"")
    (tmp_path / ".checkpoint.safetensors.def456.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"kept")
    assert len(remove_stale_temporaries(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
