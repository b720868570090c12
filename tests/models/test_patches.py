import pytest
import torch

from chestssl.models.patches import patchify, unpatchify


@pytest.mark.parametrize("spatial_size", [(28, 28), (32, 32, 32), (8, 12)])
@pytest.mark.parametrize("channels", [1, 3])
def test_unpatchify_inverts_patchify(spatial_size, channels):
    x = torch.randn(2, channels, *spatial_size)
    patch = 4
    tokens = patchify(x, patch)
    count = 1
    for s in spatial_size:
        count *= s // patch
    assert tokens.shape == (2, count, patch ** len(spatial_size) * channels)
    assert torch.equal(unpatchify(tokens, patch, spatial_size, channels), x)


def test_patch_holds_its_own_pixels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens = patchify(x, 2)
    assert tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # top-left patch, row-major
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # the patch to its right


def test_indivisible_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        patchify(torch.zeros(1, 1, 30, 28), 4)
