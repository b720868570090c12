import pytest
import torch

from chestssl.methods.masking import random_mask
from chestssl.models.vit import ViT, ViTConfig


def tiny(spatial_dims: int, image_size: int = 16) -> ViT:
    return ViT(ViTConfig(patch_size=4, hidden_size=32, depth=2, num_heads=2), spatial_dims=spatial_dims, image_size=image_size)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vit_features_shape(spatial_dims):
    model = tiny(spatial_dims)
    x = torch.randn(3, 1, *([16] * spatial_dims))
    assert model(x).shape == (3, 32)
    assert model.forward_features(x).shape == (3, 1 + model.num_tokens, 32)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encoder_sees_only_visible_tokens(spatial_dims):
    model = tiny(spatial_dims)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    mask = random_mask(2, model.grid, 0.75, torch.Generator().manual_seed(0))
    out = model.forward_features(torch.randn(2, 1, *([16] * spatial_dims)), visible=~mask)
    visible = model.num_tokens // 4
    assert seen == [torch.Size([2, 1 + visible, 32])]
    assert out.shape == (2, 1 + visible, 32)


def test_visible_forward_matches_full_forward_on_kept_tokens_when_nothing_is_hidden():
    model = tiny(2).eval()
    x = torch.randn(2, 1, 16, 16)
    everything = torch.ones(2, model.num_tokens, dtype=torch.bool)
    assert torch.allclose(model.forward_features(x, visible=everything), model.forward_features(x), atol=1e-6)


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="spatial_dims"):
        ViT(ViTConfig(), spatial_dims=4)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViT(ViTConfig(patch_size=4), image_size=30)
    with pytest.raises(ValueError, match="not divisible by vit.num_heads"):
        ViTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        tiny(2)(torch.zeros(1, 1, 32, 32))



@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hidden_states_tap_the_chosen_blocks(spatial_dims):
    model = tiny(spatial_dims).eval()
    x = torch.randn(2, 1, *([16] * spatial_dims))
    first, last = model.hidden_states(x, blocks=(1,))
    assert first.shape == last.shape == (2, 1 + model.num_tokens, 32)
    assert torch.allclose(last, model.forward_features(x))
    with pytest.raises(ValueError, match="outside 1..2"):
        model.hidden_states(x, blocks=(3,))
