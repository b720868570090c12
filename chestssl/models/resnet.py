"""ResNet (He et al. 2016, BasicBlock ResNet-18/34) for 2D images and 3D volumes, with its stage outputs.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W). The forward can return every stage's
feature map with its channel count and stride, which SparK's decoder and U-Net decoders need.

MedMNIST v2 trains ResNet-18 on 28-pixel images with a 3x3 stride-1 first convolution and no max-pool, so the
early feature maps keep the image's resolution (``small_input=True``); ``small_input=False`` is the ImageNet
7x7 stride-2 stem with a max-pool (total stride 32). Layers and initialisation follow MONAI's ``ResNet`` with
``shortcut_type="B"`` (a 1x1 convolution + batch norm where a block changes width or stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    """Sizes of a :class:`ResNet`; the input's shape comes from the data."""

    depth: int = 18  # 18 or 34 (BasicBlock)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # channels of the four stages
    small_input: bool = True  # 3x3 stride-1 stem without max-pool (28-64 px inputs); false: the ImageNet 7x7/2 stem

    def __post_init__(self) -> None:
        if self.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"resnet.depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {self.depth}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"resnet.widths must be four positive channel counts, got {list(self.widths)}")


def _layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn plus the (projected) input, then relu."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        conv, norm, _ = _layers(spatial_dims)
        self.conv1 = conv(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            # a biased 1x1 projection, as MONAI's ResNet (bias_downsample=True)
            self.downsample = nn.Sequential(conv(in_channels, channels, 1, stride=stride, bias=True), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet(nn.Module):
    """ResNet encoder: ``forward(x)`` -> (B, F) globally pooled features; ``forward_stages(x)`` -> stage maps.

    Args:
        config: depth, widths and stem.
        spatial_dims: 2 or 3.
        image_size: side of the square (cubic) input; recorded with the encoder, any size at least the total
            stride works.
        in_channels: input channels C.
        drop_path: accepted for a common encoder signature; the ResNet has no stochastic depth.
    """

    kind = "resnet"
    head_norm = "none"  # the pooled features go to the classifier as they are
    Config = ResNetConfig

    def __init__(self, config: ResNetConfig, spatial_dims: int = 2, image_size: int = 28, in_channels: int = 1,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        self.config = config
        self.spatial_dims, self.image_size, self.in_channels = spatial_dims, image_size, in_channels
        conv, norm, pool = _layers(spatial_dims)
        stem_width = config.widths[0]
        if config.small_input:
            self.stem = nn.Sequential(conv(in_channels, stem_width, 3, padding=1, bias=False), norm(stem_width),
                                      nn.ReLU(inplace=True))
            stem_stride = 1
        else:
            self.stem = nn.Sequential(conv(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                                      norm(stem_width), nn.ReLU(inplace=True), pool(3, stride=2, padding=1))
            stem_stride = 4
        stages, channels, strides, stride = [], stem_width, [], stem_stride
        for index, (width, blocks) in enumerate(zip(config.widths, BLOCKS_PER_STAGE[config.depth])):
            step = 1 if index == 0 else 2
            stride *= step
            stages.append(nn.Sequential(*(BasicBlock(spatial_dims, channels if b == 0 else width, width,
                                                     step if b == 0 else 1) for b in range(blocks))))
            channels = width
            strides.append(stride)
        self.stages = nn.ModuleList(stages)
        self.stage_channels: tuple[int, ...] = tuple(config.widths)
        self.stage_strides: tuple[int, ...] = tuple(strides)
        if image_size < self.stage_strides[-1]:
            raise ValueError(f"image_size {image_size} is smaller than the ResNet's total stride "
                             f"{self.stage_strides[-1]}; use resnet.small_input=true or larger inputs")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions (fan out), unit batch-norm scale and zero shift (as MONAI's ResNet)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, *S) -> one map per stage, (B, stage_channels[i], *S / stage_strides[i])."""
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, F): global average pool of the last stage."""
        return self.forward_stages(x)[-1].flatten(2).mean(dim=-1)

    @property
    def feature_size(self) -> int:
        return self.config.widths[-1]

    @property
    def num_layers(self) -> int:
        """Layer groups for layer-wise learning-rate decay: the stem is 0, stage i is i + 1."""
        return len(self.stages)

    def layer_id(self, name: str) -> int:
        """The layer group of parameter ``name`` (relative to this encoder)."""
        if name.startswith("stages."):
            return int(name.split(".")[1]) + 1
        return 0
