import copy

import pytest
import torch

from chestssl.data.batch import Batch
from chestssl.methods.masking import random_mask
from chestssl.methods.spark import SparK, SparKConfig, default_mask_cell
from chestssl.methods.sparse import masked_batch_norm, sparse_forward_stages, visibility_at, visible_positions
from chestssl.models.patches import patchify, unpatchify
from chestssl.models.resnet import ResNet, ResNetConfig

WIDTHS = (8, 8, 16, 16)


def tiny_resnet(spatial_dims: int, size: int, small_input: bool = True) -> ResNet:
    torch.manual_seed(0)
    return ResNet(ResNetConfig(widths=WIDTHS, small_input=small_input), spatial_dims, image_size=size)


def tiny_spark(spatial_dims: int, size: int = 16, **settings) -> SparK:
    return SparK(tiny_resnet(spatial_dims, size), SparKConfig(decoder_width=16, **settings))


def hidden_positions(visible: torch.Tensor, channels: int) -> torch.Tensor:
    return (~visible).expand(-1, channels, *visible.shape[2:])


# small_input=False needs 32 px at least (total stride 32)
CASES = [(2, 16, True), (3, 16, True), (2, 32, False), (3, 32, False)]


@pytest.mark.parametrize("spatial_dims, size, small_input", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_sparse_forward_equals_dense_when_nothing_is_hidden(spatial_dims, size, small_input, training):
    dense = tiny_resnet(spatial_dims, size, small_input)
    if not training:  # non-trivial running statistics first
        with torch.no_grad():
            dense(torch.randn(4, 1, *([size] * spatial_dims)) * 2 + 1)
    sparse = copy.deepcopy(dense)
    dense.train(training)
    sparse.train(training)
    x = torch.randn(3, 1, *([size] * spatial_dims))
    cell = 8
    mask = torch.zeros(3, (size // cell) ** spatial_dims, dtype=torch.bool)
    expected = dense.forward_stages(x)
    got, visibilities = sparse_forward_stages(sparse, x, mask, cell)
    for a, b, visible in zip(expected, got, visibilities):
        assert a.shape == b.shape and bool(visible.all())
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # the same sums in another order
    sum(o.square().mean() for o in expected).backward()
    sum(o.square().mean() for o in got).backward()
    scale = max(float(p.grad.abs().max()) for p in dense.parameters())
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        # a bias before a batch norm has a gradient of rounding noise only: tolerances relative to the largest
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4 * scale, rtol=1e-3, msg=name)
    for (name, a), b in zip(dense.named_buffers(), sparse.buffers()):  # running stats and num_batches_tracked
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    if training:
        assert int(sparse.stem[1].num_batches_tracked) == 1


@pytest.mark.parametrize("spatial_dims, size, small_input", CASES + [(2, 28, True)])
@pytest.mark.parametrize("training", [True, False])
def test_stage_outputs_are_zero_exactly_at_hidden_positions(spatial_dims, size, small_input, training):
    resnet = tiny_resnet(spatial_dims, size, small_input).train(training)
    cell = 4 if size == 28 else 8  # 28 px: 7 x 7 cells, a stride-8 deepest stage of 4 x 4
    mask = random_mask(2, (size // cell,) * spatial_dims, 0.6, torch.Generator().manual_seed(0))
    stages, visibilities = sparse_forward_stages(resnet, torch.randn(2, 1, *([size] * spatial_dims)), mask, cell)
    assert 0 < visibilities[0].float().mean() < 1
    for stage, visible, stride in zip(stages, visibilities, resnet.stage_strides):
        assert visible.shape[2:] == stage.shape[2:] == tuple(-(-size // stride) for _ in range(spatial_dims))
        assert bool((stage[hidden_positions(visible, stage.shape[1])] == 0).all())
        if visible.any():
            assert stage[visible.expand_as(stage)].abs().sum() > 0


def test_visibility_follows_the_cell_under_each_position():
    visible_cells = torch.tensor([[[True, False, True], [False, False, True], [True, True, False]]])  # (1, 3, 3)
    # a finer map repeats each cell (SparK's nearest upsampling), cropped to the map's rounded-up size
    fine = visibility_at(visible_cells, 4, 2, (5, 5))[0, 0]
    assert torch.equal(fine, visible_cells[0].repeat_interleave(2, 0).repeat_interleave(2, 1)[:5, :5])
    # a map coarser than the cells takes every second cell, the one holding its first pixel
    coarse = visibility_at(visible_cells, 4, 8, (2, 2))[0, 0]
    assert torch.equal(coarse, visible_cells[0, ::2, ::2])


@pytest.mark.parametrize("same_count", [True, False])
def test_batch_norm_statistics_come_from_visible_positions_only(same_count):
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    if same_count:  # 14 visible positions in each sample: the per-sample gather
        visible = random_mask(2, (6, 6), 0.6, torch.Generator().manual_seed(1)).logical_not().view(2, 1, 6, 6)
    else:  # the gather over the whole batch
        visible = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.4
    assert (visible_positions(visible).ndim == 3) == same_count
    x = torch.where(visible, x, torch.full_like(x, 1e6))  # huge values where hidden
    out = masked_batch_norm(norm, x, visible)
    values = x.movedim(1, -1)[visible[:, 0]]  # (N, C), visible only
    mean, var = values.mean(0), values.var(0, unbiased=False)
    expected = (values - mean) / (var + norm.eps).sqrt() * norm.weight + norm.bias
    torch.testing.assert_close(out.movedim(1, -1)[visible[:, 0]], expected)
    assert bool((out.movedim(1, -1)[~visible[:, 0]] == 0).all())
    torch.testing.assert_close(norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * values.var(0, unbiased=True))
    assert int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_both_gathers_agree_in_values_gradients_and_statistics(spatial_dims):
    visible = random_mask(3, (4,) * spatial_dims, 0.6, torch.Generator().manual_seed(2))
    visible = visible.logical_not().view(3, 1, *([4] * spatial_dims))
    x = torch.randn(3, 5, *([4] * spatial_dims))
    results = []
    for positions in (visible_positions(visible), visible.flatten().nonzero().squeeze(1)):  # per sample, batch
        torch.manual_seed(0)
        norm = (torch.nn.BatchNorm2d if spatial_dims == 2 else torch.nn.BatchNorm3d)(5)
        leaf = x.clone().requires_grad_()
        out = masked_batch_norm(norm, leaf, visible, positions)
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        results.append((out, leaf.grad, norm.running_mean, norm.running_var))
    assert visible_positions(visible).ndim == 3  # the first really is the per-sample gather
    for first, second in zip(*results):
        torch.testing.assert_close(first, second)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hidden_input_never_reaches_the_statistics(spatial_dims):
    """Huge input values at hidden cells change nothing: neither stage outputs nor any running statistic."""
    cell = 8
    mask = random_mask(2, (2,) * spatial_dims, 0.6, torch.Generator().manual_seed(0))
    hidden = unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, cell**spatial_dims), cell, (16,) * spatial_dims, 1)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    zeros, huge = tiny_resnet(spatial_dims, 16), tiny_resnet(spatial_dims, 16)
    a, _ = sparse_forward_stages(zeros, x * (1 - hidden), mask, cell)
    b, _ = sparse_forward_stages(huge, torch.where(hidden.bool(), torch.full_like(x, 1e6), x), mask, cell)
    for first, second in zip(a, b):
        torch.testing.assert_close(first, second)
    for first, second in zip(zeros.buffers(), huge.buffers()):
        torch.testing.assert_close(first, second)
    # the stem's batch norm saw the visible outputs of the stem convolution only
    conv = torch.nn.functional.conv2d if spatial_dims == 2 else torch.nn.functional.conv3d
    stem = conv(x * (1 - hidden), zeros.stem[0].weight.detach(), padding=1)
    visible = hidden[:, 0] == 0
    torch.testing.assert_close(zeros.stem[1].running_mean, 0.1 * stem.movedim(1, -1)[visible].mean(0))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_covers_only_hidden_cells(spatial_dims):
    spark = tiny_spark(spatial_dims, mask_cell=4)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    mask = spark.make_mask(x, torch.Generator().manual_seed(0))
    prediction = torch.randn_like(x)
    loss = spark.forward_loss(x, prediction, mask)
    cells = patchify(prediction, 4)
    changed_visible = unpatchify(torch.where(mask.unsqueeze(-1), cells, cells + 5.0), 4, x.shape[2:], 1)
    changed_hidden = unpatchify(torch.where(mask.unsqueeze(-1), cells + 5.0, cells), 4, x.shape[2:], 1)
    assert torch.equal(spark.forward_loss(x, changed_visible, mask), loss)
    assert spark.forward_loss(x, changed_hidden, mask) > loss + 1.0
    # against a naive reference: normalised cells, MSE per cell, mean over hidden cells
    target = patchify(x, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_cell = (cells - target).square().mean(-1)
    torch.testing.assert_close(loss, per_cell[mask].mean())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_and_preview_shapes(spatial_dims):
    spark = tiny_spark(spatial_dims)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    loss, logged = spark(Batch(x))
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 < float(logged["deepest_visible"]) < 1
    loss.backward()
    assert all(p.grad is not None for p in spark.parameters())
    spark.eval()
    panels = spark.preview(Batch(x), torch.Generator().manual_seed(0))
    assert set(panels) == {"original", "masked", "reconstruction", "prediction (cells normalised)"}
    assert all(panel.shape == x.shape for panel in panels.values())
    mask = spark.make_mask(x, torch.Generator().manual_seed(0))  # the preview's mask
    kept = patchify(panels["reconstruction"], spark.mask_cell)[~mask]
    assert torch.equal(kept, patchify(x, spark.mask_cell)[~mask])


def test_masks_are_reproducible_and_hide_the_ratio():
    spark = tiny_spark(2, size=28)
    x = torch.zeros(3, 1, 28, 28)
    first = spark.make_mask(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, spark.make_mask(x, torch.Generator().manual_seed(5)))
    assert first.shape == (3, 49) and first.sum(1).tolist() == [49 - 19] * 3  # 7 x 7 cells of 4 px, 19 visible


def test_mask_cell_defaults_to_the_largest_fitting_stage_stride():
    assert default_mask_cell((1, 2, 4, 8), 64) == 8
    assert default_mask_cell((1, 2, 4, 8), 28) == 4
    assert default_mask_cell((4, 8, 16, 32), 224) == 32
    assert tiny_spark(2, size=28).mask_cell == 4
    with pytest.raises(ValueError, match="mask_cell 3 does not divide the image size 16"):
        tiny_spark(2, mask_cell=3)
    with pytest.raises(ValueError, match="spark.mask_ratio"):
        SparKConfig(mask_ratio=1.0)


def test_encoder_weights_are_the_plain_resnets():
    spark = tiny_spark(3)
    plain = ResNet(ResNetConfig(widths=WIDTHS), 3, image_size=16)
    plain.load_state_dict(spark.encoder.state_dict(), strict=True)
    encoder_keys = {key[len("encoder."):] for key in spark.state_dict() if key.startswith("encoder.")}
    assert encoder_keys == set(plain.state_dict())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_falls_on_a_fixed_batch_and_mask(spatial_dims):
    spark = tiny_spark(spatial_dims, mask_cell=4)
    x = torch.randn(4, 1, *([16] * spatial_dims))
    mask = spark.make_mask(x, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(spark.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss, _ = spark(Batch(x), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
