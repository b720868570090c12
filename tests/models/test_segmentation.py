"""Segmentation models: shapes for both encoders in 2D and 3D, strict loading of a pretrained encoder, gradients,
refused patch sizes, and how chestssl calls MONAI's Dice and HD95 on hand-made masks."""

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.models.segmentation import build_segmentation, tapped_blocks, upsampling_steps
from chestssl.models.vit import ViT, ViTConfig

NUM_CLASSES = 3


def small_vit(spatial_dims: int, patch_size: int, image_size: int, depth: int = 2) -> ViT:
    return ViT(ViTConfig(patch_size=patch_size, hidden_size=32, depth=depth, num_heads=2), spatial_dims, image_size)


def small_resnet(spatial_dims: int, image_size: int, small_input: bool) -> ResNet:
    return ResNet(ResNetConfig(widths=(4, 8, 8, 16), small_input=small_input), spatial_dims, image_size)


# (encoder builder, input side) per case; 3D cases kept tiny for the 2-core machines
CASES = {
    "vit-p4-2d": (lambda: small_vit(2, 4, 28), 2, 28),
    "vit-p8-2d": (lambda: small_vit(2, 8, 32), 2, 32),
    "vit-p4-3d": (lambda: small_vit(3, 4, 16), 3, 16),
    "vit-p8-3d": (lambda: small_vit(3, 8, 16), 3, 16),
    "resnet-small-28px-2d": (lambda: small_resnet(2, 28, True), 2, 28),
    "resnet-imagenet-2d": (lambda: small_resnet(2, 32, False), 2, 32),
    "resnet-imagenet-odd-2d": (lambda: small_resnet(2, 37, False), 2, 37),
    "resnet-small-3d": (lambda: small_resnet(3, 12, True), 3, 12),
    "resnet-imagenet-3d": (lambda: small_resnet(3, 32, False), 3, 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_have_the_input_resolution(case):
    make, spatial_dims, side = CASES[case]
    torch.manual_seed(0)
    model = build_segmentation(make(), NUM_CLASSES)
    x = torch.randn(2, 1, *([side] * spatial_dims))
    logits = model.logits(x)
    assert logits.shape == (2, NUM_CLASSES, *([side] * spatial_dims))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("depth, steps, expected", [(12, 4, (3, 6, 9)), (6, 3, (2, 4)), (12, 2, (6,)),
                                                    (1, 3, (1, 1)), (4, 1, ())])
def test_tapped_blocks_are_evenly_spaced(depth, steps, expected):
    assert tapped_blocks(depth, steps) == expected


@pytest.mark.parametrize("patch_size, steps", [(2, 1), (4, 2), (8, 3), (16, 4)])
def test_upsampling_steps_undo_the_patch(patch_size, steps):
    assert upsampling_steps(patch_size) == steps


@pytest.mark.parametrize("patch_size", [1, 3, 6, 7])
def test_a_patch_that_is_not_a_power_of_two_is_refused(patch_size):
    encoder = ViT(ViTConfig(patch_size=patch_size, hidden_size=16, depth=1, num_heads=2), 2, patch_size * 4)
    with pytest.raises(ValueError, match=f"power of two.*got {patch_size}"):
        build_segmentation(encoder, NUM_CLASSES)


def test_decoders_describe_themselves():
    vit = build_segmentation(small_vit(2, 8, 32, depth=6), NUM_CLASSES).describe()
    assert vit == {"kind": "unetr", "feature_size": 16, "blocks": [2, 4], "upsampling_steps": 3,
                   "num_classes": NUM_CLASSES, "norm_name": "instance"}
    resnet = build_segmentation(small_resnet(2, 32, False), NUM_CLASSES).describe()
    assert resnet["kind"] == "unet" and resnet["stage_strides"] == [4, 8, 16, 32]
    assert resnet["extra_upsampling_steps"] == 2 and resnet["stage_channels"] == [4, 8, 8, 16]
    assert build_segmentation(small_resnet(2, 28, True), 2).describe()["extra_upsampling_steps"] == 0


@pytest.mark.parametrize("case", ["vit-p4-2d", "resnet-imagenet-2d"])
def test_a_pretrained_encoder_loads_strictly_and_only_the_decoder_is_new(case):
    make, _, _ = CASES[case]
    torch.manual_seed(0)
    pretrained = make()
    encoder_state = {key: value.clone() for key, value in pretrained.state_dict().items()}
    torch.manual_seed(1)  # a different draw, so a load that did nothing would show
    fresh = make()
    model = build_segmentation(fresh, NUM_CLASSES)
    assert model.encoder is fresh
    model.encoder.load_state_dict(encoder_state, strict=True)
    state = model.state_dict()
    encoder_keys = {key for key in state if key.startswith("encoder.")}
    assert encoder_keys == {f"encoder.{key}" for key in encoder_state}
    for key, value in encoder_state.items():
        assert torch.equal(state[f"encoder.{key}"], value), key
    others = set(state) - encoder_keys
    assert others and all(key.startswith("decoder.") for key in others)


@pytest.mark.parametrize("case", ["vit-p8-2d", "resnet-small-28px-2d", "resnet-imagenet-2d"])
def test_gradients_reach_encoder_and_decoder(case):
    make, spatial_dims, side = CASES[case]
    torch.manual_seed(0)
    model = build_segmentation(make(), NUM_CLASSES)
    x = torch.randn(2, 1, *([side] * spatial_dims))
    target = torch.randint(0, NUM_CLASSES, (2, *([side] * spatial_dims)))
    F.cross_entropy(model.logits(x), target).backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    first = model.encoder.patch_embed if model.encoder.kind == "vit" else model.encoder.stem[0]
    assert first.weight.grad.abs().sum() > 0  # the gradient reaches the encoder's very first layer


def one_hot(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """(B, *S) label map -> (B, K, *S) one-hot, the form chestssl hands to MONAI's metrics."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def test_monai_dice_equals_the_area_formula_on_two_overlapping_squares():
    prediction, truth = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    prediction[0, 2:10, 2:10] = 1  # 8 x 8 = 64 pixels
    truth[0, 4:12, 5:13] = 1  # 8 x 8 = 64 pixels; overlap rows 4..9, cols 5..9 = 6 x 5 = 30 pixels
    expected = 2 * 30 / (64 + 64)
    metric = DiceMetric(include_background=False, reduction="none")
    metric(y_pred=one_hot(prediction), y=one_hot(truth))
    dice = metric.aggregate()
    assert dice.shape == (1, 1)  # background excluded: one foreground class
    assert dice.item() == pytest.approx(expected)


def test_monai_hd95_equals_the_distance_on_hand_made_masks():
    # every boundary pixel of one mask is the same distance from the other, so each percentile is that distance
    prediction, truth = torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)
    prediction[0, 3, 3], truth[0, 6, 7] = 1, 1  # single pixels (3, 3) and (6, 7): a 3-4-5 triangle
    prediction[1, 2, 2:12], truth[1, 7, 2:12] = 1, 1  # parallel one-pixel lines five rows apart
    metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    metric(y_pred=one_hot(prediction), y=one_hot(truth))
    distances = metric.aggregate()
    assert distances.shape == (2, 1)
    assert distances[:, 0].tolist() == pytest.approx([5.0, 5.0])
