import pytest
import torch

from chestssl.methods.masking import num_visible_tokens, random_mask


@pytest.mark.parametrize("tokens,ratio,hidden", [(49, 0.75, 37), (64, 0.75, 48), (512, 0.75, 384), (10, 0.0, 0)])
def test_every_row_hides_the_same_count(tokens, ratio, hidden):
    mask = random_mask(8, tokens, ratio, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (8, tokens)
    assert mask.sum(dim=1).tolist() == [hidden] * 8
    assert num_visible_tokens(tokens, ratio) == tokens - hidden


def test_seeded_masks_repeat_and_differ_between_rows():
    a = random_mask(4, 49, 0.75, torch.Generator().manual_seed(3))
    b = random_mask(4, 49, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_ratio_out_of_range():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(1, 10, 1.0)
