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
