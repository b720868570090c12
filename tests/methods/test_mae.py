import pytest
import torch

from chestssl.methods.mae import MAE
from chestssl.methods.masking import random_mask
from chestssl.models.patches import patchify
from chestssl.models.vit import ViT, ViTConfig


def tiny_mae(spatial_dims: int, norm_pix_loss: bool = True) -> MAE:
    encoder = ViT(ViTConfig(spatial_dims=spatial_dims, image_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2))
    return MAE(encoder, decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_decreases_on_a_fixed_batch(spatial_dims):
    torch.manual_seed(0)
    mae = tiny_mae(spatial_dims)
    x = torch.randn(4, 1, *([16] * spatial_dims))
    mask = random_mask(4, mae.encoder.num_tokens, 0.75, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = mae(x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_reconstruction_keeps_visible_patches():
    mae = tiny_mae(2, norm_pix_loss=False)
    x = torch.randn(2, 1, 16, 16)
    mask = random_mask(2, mae.encoder.num_tokens, 0.75, torch.Generator().manual_seed(0))
    rebuilt = patchify(mae.reconstruct(x, mask), 4)
    original = patchify(x, 4)
    assert torch.equal(rebuilt[~mask], original[~mask])
    assert not torch.allclose(rebuilt[mask], original[mask])


def test_lung_weighted_mae_needs_and_uses_the_lung_mask():
    torch.manual_seed(0)
    encoder = ViT(ViTConfig(spatial_dims=3, image_size=16, patch_size=8, hidden_size=32, depth=1, num_heads=2))
    mae = MAE(encoder, 32, 1, 2, norm_pix_loss=False, lung_weight=0.01)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = random_mask(2, encoder.num_tokens, 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lung_mask"):
        mae(x, mask)
    no_lung = mae(x, mask, lung_mask=torch.zeros(2, 1, 16, 16, 16))
    all_lung = mae(x, mask, lung_mask=torch.ones(2, 1, 16, 16, 16))
    assert torch.allclose(no_lung, 0.01 * all_lung, rtol=1e-4)  # the same patches, weighted 0.01 when not lung
