import pytest

from chestssl.models.vit import ViT, ViTConfig
from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.train.optim import cosine_schedule, param_groups


def test_cosine_schedule_numbers():
    assert cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(10, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_for_vectors_and_layer_decay_scales():
    model = ViT(ViTConfig(hidden_size=32, depth=2, num_heads=2))
    groups = param_groups(model, 0.05, layer_decay=0.5, depth=model.num_layers, layer_of=model.layer_id)
    for group in groups:
        for parameter in group["params"]:
            assert (group["weight_decay"] == 0.0) == (parameter.ndim < 2 or parameter is model.cls_token)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(model.patch_embed.weight)] == pytest.approx(0.5**3)
    assert scales[id(model.blocks[0].qkv.weight)] == pytest.approx(0.5**2)
    assert scales[id(model.blocks[1].qkv.weight)] == pytest.approx(0.5)
    assert scales[id(model.norm.weight)] == pytest.approx(1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_resnet_layer_groups_are_its_stem_and_stages():
    model = ResNet(ResNetConfig(widths=(4, 8, 8, 8)))
    assert model.num_layers == 4
    assert model.layer_id("stem.0.weight") == 0 and model.layer_id("stages.2.0.conv1.weight") == 3
