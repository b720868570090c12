import pytest
import torch
from monai.networks.nets import ResNet as MonaiResNet

from chestssl.models.resnet import ResNet, ResNetConfig


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("small_input, strides", [(True, (1, 2, 4, 8)), (False, (4, 8, 16, 32))])
def test_stage_outputs_have_their_channels_and_strides(spatial_dims, small_input, strides):
    size = 32
    model = ResNet(ResNetConfig(widths=(8, 16, 16, 32), small_input=small_input), spatial_dims, image_size=size)
    stages = model.forward_stages(torch.randn(2, 1, *([size] * spatial_dims)))
    assert model.stage_strides == strides and model.stage_channels == (8, 16, 16, 32)
    for output, channels, stride in zip(stages, model.stage_channels, model.stage_strides):
        assert output.shape == (2, channels, *([size // stride] * spatial_dims))
    assert model(torch.randn(2, 1, *([size] * spatial_dims))).shape == (2, 32)


@pytest.mark.parametrize("depth, layers", [(18, [2, 2, 2, 2]), (34, [3, 4, 6, 3])])
def test_same_network_as_monai_resnet(depth, layers):
    """The layers follow MONAI's ResNet with shortcut B: the same parameter count, 2D and 3D."""
    for spatial_dims in (2, 3):
        ours = ResNet(ResNetConfig(depth=depth, small_input=False), spatial_dims, image_size=64)
        theirs = MonaiResNet("basic", layers, [64, 128, 256, 512], spatial_dims=spatial_dims, n_input_channels=1,
                             feed_forward=False, shortcut_type="B")
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="resnet.depth"):
        ResNetConfig(depth=50)
    with pytest.raises(ValueError, match="total stride 32"):
        ResNet(ResNetConfig(small_input=False), 2, image_size=28)
