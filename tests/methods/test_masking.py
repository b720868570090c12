import pytest
import torch

from chestssl.methods.masking import num_visible_tokens, random_mask


@pytest.mark.parametrize("grid,ratio,hidden", [((7, 7), 0.75, 37), ((4, 4, 4), 0.75, 48), ((8, 8, 8), 0.75, 384),
                                               ((2, 5), 0.0, 0), ((3, 5, 2), 0.5, 15)])
def test_every_row_hides_the_same_count(grid, ratio, hidden):
    tokens = int(torch.tensor(grid).prod())
    mask = random_mask(8, grid, ratio, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (8, tokens)
    assert mask.sum(dim=1).tolist() == [hidden] * 8
    assert num_visible_tokens(tokens, ratio) == tokens - hidden


def test_seeded_masks_repeat_and_differ_between_rows():
    a = random_mask(4, (7, 7), 0.75, torch.Generator().manual_seed(3))
    b = random_mask(4, (7, 7), 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_ratio_out_of_range():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(1, (10,), 1.0)
    with pytest.raises(ValueError, match="grid"):
        random_mask(1, 10, 0.5)  # a bare count is not a grid
