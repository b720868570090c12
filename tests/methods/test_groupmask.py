import dataclasses

import pytest
import torch

from chestssl.data.batch import Batch
from chestssl.methods.groupmask import (GroupMask, GroupMaskConfig, corrupt, group_mask, group_mask_with_boxes,
                                        masked_pixel_l1)
from chestssl.models.vit import ViT, ViTConfig


def tiny(spatial_dims: int, **settings) -> GroupMask:
    encoder = ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), spatial_dims=spatial_dims, image_size=16)
    return GroupMask(encoder, GroupMaskConfig(head_hidden_size=32, **settings))


def box_mask(shape, boxes):
    mask = torch.zeros(shape, dtype=torch.bool)
    for start, size in boxes:
        mask[tuple(slice(a, a + s) for a, s in zip(start, size))] = True
    return mask


@pytest.mark.parametrize("spatial_dims,side", [(2, 40), (3, 20)])
@pytest.mark.parametrize("ratio", [0.75, 0.4])
def test_fraction_in_range_and_blocks_respect_the_side_limit(spatial_dims, side, ratio):
    shape = (side,) * spatial_dims
    fraction_limit = 0.3
    low = min(0.5, ratio)
    mask, boxes = group_mask_with_boxes(6, shape, fraction_limit, (low, ratio), torch.Generator().manual_seed(0))
    assert mask.shape == (6, 1) + shape and mask.dtype == torch.bool
    max_side = int(fraction_limit * side)
    max_block = max_side**spatial_dims / side**spatial_dims
    fractions = mask.flatten(1).float().mean(dim=1)
    # the guaranteed bound: at least low, at most high plus one (largest) block's overshoot
    assert (fractions >= low).all() and (fractions < ratio + max_block).all(), fractions
    for image, image_boxes in enumerate(boxes):
        assert len(image_boxes) > 1
        for start, size in image_boxes:
            assert all(1 <= s <= max_side for s in size), size
            assert all(a >= 0 and a + s <= side for a, s in zip(start, size))
        assert torch.equal(box_mask(shape, image_boxes), mask[image, 0])  # the mask is exactly the union of boxes


def test_fractions_spread_over_the_range():
    mask = group_mask(32, (32, 32), 0.3, (0.5, 0.75), torch.Generator().manual_seed(1))
    fractions = mask.flatten(1).float().mean(dim=1)
    assert fractions.min() < 0.6 and fractions.max() > 0.68


def test_reproducible_with_a_generator():
    first = group_mask(3, (16, 16), 0.3, (0.5, 0.75), torch.Generator().manual_seed(5))
    again = group_mask(3, (16, 16), 0.3, (0.5, 0.75), torch.Generator().manual_seed(5))
    other = group_mask(3, (16, 16), 0.3, (0.5, 0.75), torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_aligned_boxes_lie_on_the_patch_grid(spatial_dims):
    shape = (32,) * spatial_dims
    mask, boxes = group_mask_with_boxes(4, shape, 0.3, (0.5, 0.75), torch.Generator().manual_seed(2), align_to=4)
    for image_boxes in boxes:
        for start, size in image_boxes:
            assert all(a % 4 == 0 and s % 4 == 0 and 4 <= s <= 8 for a, s in zip(start, size)), (start, size)
    # every patch is wholly corrupted or wholly clean
    cells = mask.reshape(4, *[v for _ in range(spatial_dims) for v in (8, 4)])
    patch_axes = tuple(2 + 2 * i for i in range(spatial_dims))
    assert torch.equal(cells.all(dim=patch_axes), cells.any(dim=patch_axes))


def test_unaligned_boxes_leave_the_grid():
    _, boxes = group_mask_with_boxes(4, (32, 32), 0.3, (0.5, 0.75), torch.Generator().manual_seed(2))
    assert any(a % 4 for image_boxes in boxes for start, _ in image_boxes for a in start)


@pytest.mark.parametrize("bad", [{"ratio_range": (0.0, 0.5)}, {"ratio_range": (0.6, 0.5)},
                                 {"ratio_range": (0.5, 1.0)}, {"max_side_fraction": 0.0},
                                 {"max_side_fraction": 1.5}, {"align_to": 3}])
def test_generator_rejects_bad_values(bad):
    arguments = {"ratio_range": (0.5, 0.75), "max_side_fraction": 0.3, "align_to": None} | bad
    with pytest.raises(ValueError):
        group_mask(2, (16, 16), arguments["max_side_fraction"], arguments["ratio_range"], align_to=arguments["align_to"])


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": 0.0}, {"max_side_fraction": 0.0}, {"fill": "blur"},
                                 {"alien_probability": 1.5}, {"alien_fraction": 0.0}, {"head_hidden_size": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="groupmask."):
        GroupMaskConfig(**bad)


def test_alien_copies_from_another_image_of_the_batch():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()  # image b is all b
    mask = group_mask(4, (16, 16), 0.3, (0.3, 0.3), torch.Generator().manual_seed(0))
    out = corrupt(x, mask, "alien")
    for b in range(4):
        inside = out[b][mask[b]]
        assert torch.equal(inside, x[(b - 1) % 4][mask[b]])  # the partner's pixels
        assert (inside != b).all()  # never the image itself
        assert torch.equal(out[b][~mask[b]], x[b][~mask[b]])
    with pytest.raises(ValueError):
        corrupt(x[:1], mask[:1], "alien")


def test_zero_and_noise_fill():
    x = torch.full((2, 1, 16, 16), 3.0)
    mask = group_mask(2, (16, 16), 0.3, (0.5, 0.75), torch.Generator().manual_seed(0))
    zeros = corrupt(x, mask, "zeros")
    assert (zeros[mask.expand_as(x)] == 0).all() and (zeros[~mask.expand_as(x)] == 3).all()
    noise = corrupt(x, mask, "noise", torch.Generator().manual_seed(0))
    inside = noise[mask.expand_as(x)]
    assert (noise[~mask.expand_as(x)] == 3).all()
    assert abs(inside.mean()) < 0.2 and abs(inside.std() - 1) < 0.2 and inside.unique().numel() > 100


def test_loss_counts_exactly_the_corrupted_pixels():
    torch.manual_seed(0)
    target = torch.randn(2, 1, 16, 16)
    mask = group_mask(2, (16, 16), 0.3, (0.5, 0.75), torch.Generator().manual_seed(0))
    prediction = torch.randn(2, 1, 16, 16)
    loss = masked_pixel_l1(prediction, target, mask)
    assert torch.allclose(loss, (prediction - target).abs()[mask].mean())
    outside = torch.where(mask, prediction, prediction + 10)
    assert torch.equal(masked_pixel_l1(outside, target, mask), loss)
    inside = torch.where(mask, prediction + 10, prediction)
    assert masked_pixel_l1(inside, target, mask) > loss + 5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encoder_sees_every_token(spatial_dims):
    method = tiny(spatial_dims)
    seen = []
    method.encoder.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    loss = method(Batch(torch.randn(3, 1, *([16] * spatial_dims))), torch.Generator().manual_seed(0))
    assert seen == [torch.Size([3, 1 + method.encoder.num_tokens, 32])]
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_method_alien_probability_switches_the_corruption():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()
    always = tiny(2, alien_probability=1.0, fill="zeros")
    corrupted, mask = always.make_corruption(x, torch.Generator().manual_seed(0))
    for b in range(4):
        assert (corrupted[b][mask[b]] == (b - 1) % 4).all()
        assert 0.3 <= mask[b].float().mean() < 0.3 + 16 / 256
    never = tiny(2, alien_probability=0.0, fill="zeros")
    corrupted, mask = never.make_corruption(x, torch.Generator().manual_seed(0))
    assert (corrupted[mask.expand_as(x)] == 0).all() and (mask.flatten(1).float().mean(1) >= 0.5).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_preview_panels(spatial_dims):
    method = tiny(spatial_dims)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    panels = method.preview(Batch(x), torch.Generator().manual_seed(0))
    assert list(panels) == ["original", "corrupted", "reconstruction"]
    assert all(panel.shape == x.shape for panel in panels.values())
    assert torch.equal(panels["original"], x) and not torch.equal(panels["corrupted"], x)


def test_encoder_is_the_plain_vit():
    method = tiny(2)
    fresh = ViT(method.encoder.config, spatial_dims=2, image_size=16)
    fresh.load_state_dict(method.encoder.state_dict(), strict=True)
    assert isinstance(method.encoder, ViT)
    assert dataclasses.asdict(GroupMaskConfig()) == {"ratio": 0.75, "max_side_fraction": 0.3, "fill": "noise",
                                                     "alien_probability": 0.5, "alien_fraction": 0.3,
                                                     "align_to_patches": False, "head_hidden_size": 256}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_falls_on_images_whose_hidden_pixels_follow_from_the_visible_ones(spatial_dims):
    torch.manual_seed(0)
    method = tiny(spatial_dims, fill="zeros")
    # each image one brightness: the corrupted pixels are predictable from the clean ones
    x = torch.randn(4, 1, *([1] * spatial_dims)).expand(4, 1, *([16] * spatial_dims)).clone()
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss = method(Batch(x), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


def test_pretraining_config_has_the_section():
    from chestssl.methods import METHODS
    from chestssl.train.pretrain import PretrainConfig

    assert METHODS["groupmask"] is GroupMask
    assert PretrainConfig(method="groupmask").method_settings() == GroupMaskConfig()
