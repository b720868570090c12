import torch

from chestssl.methods.losses import masked_patch_loss, normalise_patches


def naive_masked_loss(prediction, target, mask, kind):
    total, count = 0.0, 0
    for b in range(prediction.shape[0]):
        for t in range(prediction.shape[1]):
            if mask[b, t]:
                diff = prediction[b, t] - target[b, t]
                total += float((diff**2).mean() if kind == "mse" else diff.abs().mean())
                count += 1
    return total / count


def test_masked_loss_matches_a_loop_over_patches():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 10, 6, generator=generator), torch.randn(3, 10, 6, generator=generator)
    mask = torch.rand(3, 10, generator=generator) > 0.5
    for kind in ("mse", "l1"):
        assert abs(float(masked_patch_loss(prediction, target, mask, kind)) - naive_masked_loss(prediction, target, mask, kind)) < 1e-5


def test_visible_patches_do_not_count():
    target = torch.zeros(1, 4, 3)
    prediction = torch.tensor([[[9.0] * 3, [1.0] * 3, [9.0] * 3, [1.0] * 3]])
    mask = torch.tensor([[False, True, False, True]])
    assert float(masked_patch_loss(prediction, target, mask)) == 1.0


def test_normalised_target_has_zero_mean_unit_variance_per_patch():
    out = normalise_patches(torch.randn(2, 5, 16) * 7 + 3)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(out.var(-1), torch.ones(2, 5), atol=1e-3)


def naive_lung_weighted_l1(prediction, target, mask, lung_mask, patch_size, lung_weight, threshold=0.25):
    """Dack et al. from the paper's words, voxel by patch: cut the mask into the model's patch grid by hand."""
    batch, _, depth, height, width = lung_mask.shape
    lung_losses, other_losses = [], []
    for b in range(batch):
        token = 0
        for z in range(0, depth, patch_size):
            for y in range(0, height, patch_size):
                for x in range(0, width, patch_size):
                    block = lung_mask[b, 0, z : z + patch_size, y : y + patch_size, x : x + patch_size]
                    if mask[b, token]:
                        error = float((prediction[b, token] - target[b, token]).abs().mean())
                        (lung_losses if float(block.float().mean()) > threshold else other_losses).append(error)
                    token += 1
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    return mean(lung_losses) + lung_weight * mean(other_losses)


import pytest  # noqa: E402

from chestssl.methods.losses import lung_patches, lung_weighted_l1  # noqa: E402


@pytest.mark.parametrize("patch_size", [8, 16])
def test_lung_weighted_loss_matches_a_loop_on_the_model_patch_grid(patch_size):
    generator = torch.Generator().manual_seed(patch_size)
    size, channels = 32, 1
    tokens, values = (size // patch_size) ** 3, patch_size**3 * channels
    lung_mask = torch.zeros(2, 1, size, size, size, dtype=torch.bool)
    lung_mask[:, :, 4:20, 2:27, 9:30] = True  # a box that cuts through patches of both sizes
    prediction, target = torch.randn(2, tokens, values, generator=generator), torch.randn(2, tokens, values, generator=generator)
    mask = torch.rand(2, tokens, generator=generator) > 0.4
    is_lung = lung_patches(lung_mask, patch_size)
    for weight in (0.01, 0.5):
        expected = naive_lung_weighted_l1(prediction, target, mask, lung_mask, patch_size, weight)
        assert abs(float(lung_weighted_l1(prediction, target, mask, is_lung, weight)) - expected) < 1e-5


def test_normalised_lung_loss_at_weight_one_is_plain_masked_l1():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 64, 512, generator=generator), torch.randn(2, 64, 512, generator=generator)
    mask = torch.rand(2, 64, generator=generator) > 0.25
    is_lung = torch.rand(2, 64, generator=generator) > 0.5
    plain = masked_patch_loss(prediction, target, mask, "l1")
    assert torch.allclose(lung_weighted_l1(prediction, target, mask, is_lung, 1.0, normalise=True), plain, atol=1e-6)
    everything_lung = torch.ones_like(is_lung)
    assert torch.allclose(lung_weighted_l1(prediction, target, mask, everything_lung, 0.01), plain, atol=1e-6)
