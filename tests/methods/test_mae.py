import pytest
import torch

from chestssl.data.batch import Batch
from chestssl.methods.mae import MAE, MAEConfig
from chestssl.methods.masking import random_mask
from chestssl.models.patches import patchify
from chestssl.models.vit import ViT, ViTConfig


def tiny_mae(spatial_dims: int, norm_pix_loss: bool = True) -> MAE:
    encoder = ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), spatial_dims=spatial_dims, image_size=16)
    return MAE(encoder, MAEConfig(decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_decreases_on_a_fixed_batch(spatial_dims):
    torch.manual_seed(0)
    mae = tiny_mae(spatial_dims)
    x = torch.randn(4, 1, *([16] * spatial_dims))
    mask = random_mask(4, mae.encoder.grid, 0.75, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = mae(Batch(x), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_reconstruction_keeps_visible_patches():
    mae = tiny_mae(2, norm_pix_loss=False)
    x = torch.randn(2, 1, 16, 16)
    mask = random_mask(2, mae.encoder.grid, 0.75, torch.Generator().manual_seed(0))
    rebuilt = patchify(mae.reconstruct(x, mask), 4)
    original = patchify(x, 4)
    assert torch.equal(rebuilt[~mask], original[~mask])
    assert not torch.allclose(rebuilt[mask], original[mask])


def test_lung_weighted_mae_needs_and_uses_the_lung_mask():
    torch.manual_seed(0)
    encoder = ViT(ViTConfig(patch_size=8, hidden_size=32, depth=1, num_heads=2), spatial_dims=3, image_size=16)
    mae = MAE(encoder, MAEConfig(32, 1, 2, norm_pix_loss=False, loss="l1", lung_weight=0.01))
    x = torch.randn(2, 1, 16, 16, 16)
    mask = random_mask(2, encoder.grid, 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lung_mask"):
        mae(Batch(x), mask)
    no_lung = mae(Batch(x, lung_mask=torch.zeros(2, 1, 16, 16, 16)), mask)
    all_lung = mae(Batch(x, lung_mask=torch.ones(2, 1, 16, 16, 16)), mask)
    assert torch.allclose(no_lung, 0.01 * all_lung, rtol=1e-4)  # the same patches, weighted 0.01 when not lung


def test_the_normalised_panel_shows_only_the_prediction():
    """The reconstruction borrows each hidden patch's true mean and std; the normalised panel must not: changing
    what a hidden patch holds (which the encoder never sees) changes the first, not the second."""
    torch.manual_seed(0)
    mae = MAE(ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), image_size=16), MAEConfig(32, 1, 2))
    mae.eval()
    x = torch.randn(1, 1, 16, 16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :12] = True  # the first 12 patches hidden (rows 0-2 of the 4 x 4 grid)
    changed = x.clone()
    changed[..., :4, :] = changed[..., :4, :] * 3 + 5  # the top row of patches, all hidden
    assert not torch.allclose(mae.reconstruct(x, mask), mae.reconstruct(changed, mask))
    assert torch.allclose(mae.reconstruct(x, mask, denormalise=False), mae.reconstruct(changed, mask, denormalise=False))
