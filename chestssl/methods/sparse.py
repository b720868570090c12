"""Masked ("sparse") computation through chestssl's own ResNet, for SparK (Tian et al. 2023, "Designing BERT for
convolutional networks: sparse and hierarchical masked modeling").

Nothing here changes, wraps or patches the ResNet: :func:`sparse_forward_stages` walks the ResNet's own modules
(stem conv/bn/relu/max-pool, each BasicBlock's conv1/bn1/conv2/bn2/downsample) with the mask passed in as an
argument, so the weights that train are exactly the plain ResNet's and load into it strictly. The rules:

- the input is masked first, so hidden content never enters the network (not even through the first
  convolution's border taps);
- every convolution output goes straight into a batch norm that keeps only the visible positions (the zeros it
  writes at hidden positions are the re-masking), max-pool outputs are re-masked, and ReLU and the residual sum
  keep zeros at zero, so every stage output is exactly zero at hidden positions;
- in training, batch-norm statistics come from the visible positions only: they are gathered, normalised by
  ``F.batch_norm`` with the module's own running statistics, affine parameters, momentum and
  ``num_batches_tracked``, and scattered back; in evaluation batch norm is a per-position affine map, applied
  densely and re-masked.

Which positions of a feature map are visible: a map at stride ``s`` has ``ceil(S / s)`` positions per axis
(chestssl's stride-2 layers round up), and position ``j`` covers input pixels from ``s * j``. It takes the
visibility of the mask cell holding that first pixel, ``floor(s * j / cell)``. For maps finer than the cell this
is SparK's nearest upsampling of the mask; for maps coarser than the cell (28-px images masked in 4-px cells
reach a stride-8 deepest stage of 4 x 4) it picks every ``s / cell``-th cell, the one under the stride-2
convolution's centre tap, so the deepest stage stays as sparse as the mask (about ``1 - mask_ratio`` visible)
instead of turning dense, and a visible deep position only ever reads visible content.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``G`` mask-grid sizes (S / cell),
``L`` mask cells (prod G), ``N`` visible positions in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil, prod

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from chestssl.models.patches import grid_size
from chestssl.models.resnet import BasicBlock, ResNet


def visibility_at(visible_cells: torch.Tensor, cell: int, stride: int, size: Sequence[int]) -> torch.Tensor:
    """Which positions of a feature map at ``stride`` are visible.

    Args:
        visible_cells: bool (B, *G), True where the mask cell is visible.
        cell: side of a mask cell in input pixels.
        stride: the map's stride in input pixels.
        size: the map's spatial size, ``ceil(S / stride)`` per axis.

    Returns:
        bool (B, 1, *size): position ``j`` takes the cell holding its first pixel, ``floor(stride * j / cell)``.
    """
    visible = visible_cells
    for axis, length in enumerate(size):
        cells = torch.arange(length, device=visible.device) * stride // cell
        visible = visible.index_select(axis + 1, cells)
    return visible.unsqueeze(1)


def visible_positions(visible: torch.Tensor) -> torch.Tensor:
    """Where the visible positions of a bool (B, 1, *S) map are, for :func:`masked_batch_norm`.

    Found once per map and shared by all of its batch norms: finding them is a large part of a gather's cost.

    Returns:
        (B, 1, K) int64 indices into each sample's flattened space when every sample has the same number K of
        visible positions (the usual case: each mask hides as many cells in every image, and a map at a stride
        up to the cell repeats each cell equally often); otherwise (N,) int64 indices into the flattened
        (B * S), row-major.
    """
    per_sample = visible.flatten(1)  # (B, S)
    counts = per_sample.sum(dim=1)
    if bool((counts == counts[0]).all()):
        return per_sample.nonzero()[:, 1].view(per_sample.shape[0], 1, -1)  # nonzero lists sample by sample
    return per_sample.flatten().nonzero().squeeze(1)


def masked_batch_norm(norm: _BatchNorm, x: torch.Tensor, visible: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """Batch norm of the visible positions of ``x``, zero at the hidden ones.

    In training the batch statistics (and the running-statistics update, with the module's momentum or its
    cumulative average) come from the visible positions alone, exactly as the module would compute them on a
    batch holding only those positions; in evaluation the module's running statistics are used.

    Args:
        norm: a BatchNorm2d/3d of the ResNet; its parameters and buffers are used and updated in place.
        x: (B, C, *S) values; hidden positions may hold anything.
        visible: bool (B, 1, *S).
        positions: ``visible_positions(visible)``, if already known.
    """
    if not norm.training and norm.running_mean is not None:  # running statistics: a per-position affine map
        return norm(x) * visible
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    tracked = not norm.training or norm.track_running_stats
    positions = visible_positions(visible) if positions is None else positions
    running_mean, running_var = (norm.running_mean, norm.running_var) if tracked else (None, None)
    channels = x.shape[1]
    # Gathered channel-major, never channels-last (N, C): batch norm of (N, C) is about 3x slower on the CPU,
    # and torch 2.13's CPU backward of a strided 1x1 convolution corrupts memory on channels-last inputs of 8
    # channels, so no such tensor is handed on either.
    if positions.ndim == 3:  # K visible positions in every sample: gathered within each sample, (B, C, K)
        flat = x.flatten(2)  # (B, C, prod S)
        index = positions.expand(-1, channels, -1)
        normed = F.batch_norm(flat.gather(2, index), running_mean, running_var, norm.weight, norm.bias, True,
                              factor, norm.eps)
        return normed.new_zeros(flat.shape).scatter_(2, index, normed).view(x.shape)
    picked = x.transpose(0, 1).reshape(channels, -1).index_select(1, positions)  # (C, N)
    normed = F.batch_norm(picked.unsqueeze(0), running_mean, running_var, norm.weight, norm.bias, True, factor,
                          norm.eps)
    out = normed.new_zeros(channels, visible.numel()).index_copy_(1, positions, normed[0])  # (C, B * S)
    return out.view(channels, x.shape[0], *x.shape[2:]).transpose(0, 1).contiguous()


def sparse_basic_block(block: BasicBlock, x: torch.Tensor, visible: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """A BasicBlock on masked input: (B, C_in, *S_in) zero where hidden -> (B, C, *S) zero where hidden.

    Args:
        visible: bool (B, 1, *S) at the block's output grid.
        positions: ``visible_positions(visible)``, if already known.
    """
    if block.downsample is None:
        shortcut = x
    else:
        projection, norm = block.downsample
        shortcut = masked_batch_norm(norm, projection(x), visible, positions)  # its bias is re-masked here
    out = F.relu(masked_batch_norm(block.bn1, block.conv1(x), visible, positions), inplace=True)
    out = masked_batch_norm(block.bn2, block.conv2(out), visible, positions)
    return F.relu(out + shortcut, inplace=True)


def sparse_forward_stages(resnet: ResNet, x: torch.Tensor, mask: torch.Tensor,
                          cell: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ResNet's ``forward_stages`` on the visible cells of ``x`` only.

    Equal to ``resnet.forward_stages(x)`` (outputs, gradients and batch-norm updates) when nothing is hidden.

    Args:
        resnet: a chestssl ResNet, used as it is.
        x: (B, C, *S) images, each side divisible by ``cell``.
        mask: bool (B, L), True where the cell is hidden (row-major over the grid S / cell).
        cell: side of a mask cell in input pixels.

    Returns:
        The stage maps, (B, stage_channels[i], *ceil(S / stage_strides[i])), zero at hidden positions, and each
        stage's visibility, bool (B, 1, *ceil(S / stage_strides[i])).
    """
    spatial = x.shape[2:]
    grid = grid_size(spatial, cell)
    if tuple(mask.shape) != (x.shape[0], prod(grid)):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {x.shape[0]} images on a {grid} grid")
    visible_cells = ~mask.reshape(x.shape[0], *grid)  # (B, *G)

    def visible_at(stride: int) -> torch.Tensor:
        return visibility_at(visible_cells, cell, stride, [ceil(side / stride) for side in spatial])

    x = x * visible_at(1)  # hidden content never enters the network
    conv, norm = resnet.stem[0], resnet.stem[1]
    stride = conv.stride[0]
    x = F.relu(masked_batch_norm(norm, conv(x), visible_at(stride)), inplace=True)
    if len(resnet.stem) > 3:  # the ImageNet stem's max-pool: zeros at hidden positions never win over ReLU outputs
        pool: nn.Module = resnet.stem[3]
        stride *= pool.stride
        x = pool(x) * visible_at(stride)
    assert stride == resnet.stage_strides[0], (stride, resnet.stage_strides)
    outputs, visibilities = [], []
    for stage, stage_stride in zip(resnet.stages, resnet.stage_strides):
        visible = visible_at(stage_stride)
        positions = visible_positions(visible) if resnet.training else None  # evaluation gathers nothing
        for block in stage:
            x = sparse_basic_block(block, x, visible, positions)
        outputs.append(x)
        visibilities.append(visible)
    return outputs, visibilities
