"""ResNet-18 for 2D images and 3D volumes with a stem for small inputs (the MedMNIST baseline).

MedMNIST v2 trains ResNet-18 on 28-pixel images with a 3x3 stride-1 first convolution and no max-pool, so the
early feature maps keep the image's resolution; MONAI's ResNet exposes exactly those choices.
"""

from __future__ import annotations

from torch import nn
from monai.networks.nets import ResNet


def resnet18(spatial_dims: int = 2, in_channels: int = 1, small_input: bool = True) -> nn.Module:
    """ResNet-18 feature extractor: (B, C, *S) -> (B, 512) pooled features (no classification layer).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        small_input: 3x3 stride-1 stem without max-pool (for 28-64 pixel inputs); else the ImageNet 7x7/2 stem.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    network = ResNet(
        block="basic",
        layers=[2, 2, 2, 2],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=3 if small_input else 7,
        conv1_t_stride=1 if small_input else 2,
        no_max_pool=small_input,
        feed_forward=False,
    )
    network.feature_size = 512
    return network
