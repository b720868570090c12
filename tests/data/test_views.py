"""The grayscale augmentations of a view (gamma, blur, noise), 2D and 3D: each does what it says, each is off by
default, and the views that existed before them are unchanged, draw for draw."""

import math

import pytest
import torch
import torch.nn.functional as F

from chestssl.data.views import ViewConfig, adjust_gamma, contrastive_view, gaussian_blur, random_view

STILL = dict(crop_scale=(1.0, 1.0), rotate_degrees=0, flip_probability=0.0, intensity=0)  # geometry and jitter off
# Checksums of views made by the implementation before the grayscale augmentations existed (same seeds, inputs).
BEFORE = {2: (31.563241958618164, 0.1955188810825348), 3: (-238.08599853515625, 0.4150773286819458)}


def batch(spatial_dims, count=6, side=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, *([side] * spatial_dims), generator=generator) - 0.5) / 0.25


def legacy_draws(generator, count, spatial_dims):
    """Exactly the numbers a view drew before the grayscale augmentations: crop area, ratio, offset, angle,
    flips, gain, bias."""
    for shape in ((count,), (count,), (count, spatial_dims), (count,), (count, 3), (count,), (count,)):
        torch.rand(*shape, generator=generator)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_default_view_is_what_it_was(spatial_dims):
    x = batch(spatial_dims)
    generator = torch.Generator().manual_seed(3)
    first, _ = random_view(x, ViewConfig(), generator)
    second, _ = random_view(x, ViewConfig(flip_probability=0.5, size=8), generator)
    total, pixel = BEFORE[spatial_dims]
    assert math.isclose(float(first.sum() + second.sum()), total, rel_tol=1e-5, abs_tol=1e-3)
    assert math.isclose(float(first.flatten()[37]), pixel, rel_tol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("extra", [{}, {"gamma": (0.5, 2.0)}, {"blur_probability": 1.0}, {"noise_std": 0.3}])
def test_a_view_takes_the_same_numbers_from_the_generator_with_or_without_the_new_augmentations(spatial_dims, extra):
    x = batch(spatial_dims)
    used, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_view(x, ViewConfig(**extra), used)
    legacy_draws(expected, len(x), spatial_dims)
    assert torch.equal(used.get_state(), expected.get_state())


def test_switching_on_blur_in_one_view_changes_nothing_in_the_next():
    x = batch(2)
    outputs = []
    for first in (ViewConfig(), ViewConfig(blur_probability=1.0, gamma=(0.7, 1.4), noise_std=0.2)):
        generator = torch.Generator().manual_seed(11)
        random_view(x, first, generator)
        outputs.append(random_view(x, ViewConfig(), generator)[0])
    assert torch.equal(*outputs)


def test_the_new_augmentations_are_off_by_default():
    config = ViewConfig()
    assert (config.gamma, config.blur_probability, config.noise_std) == ((1.0, 1.0), 0.0, 0.0)
    assert not config.grayscale and ViewConfig(noise_std=0.1).grayscale
    x = batch(3)
    assert torch.equal(random_view(x, ViewConfig(**STILL), torch.Generator().manual_seed(0))[0], x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gamma_bends_each_image_on_its_own_range(spatial_dims):
    x = batch(spatial_dims)
    view, _ = random_view(x, ViewConfig(**STILL, gamma=(2.0, 2.0)), torch.Generator().manual_seed(0))
    for image, original in zip(view, x):
        low, high = original.min(), original.max()
        expected = low + (high - low) * ((original - low) / (high - low)) ** 2
        assert torch.allclose(image, expected, atol=1e-5)
        assert torch.isclose(image.min(), low) and torch.isclose(image.max(), high)  # extremes kept
    assert not torch.allclose(view, x, atol=1e-2)
    varied, _ = random_view(x, ViewConfig(**STILL, gamma=(0.5, 2.0)), torch.Generator().manual_seed(0))
    darker = [(v.mean() < o.mean()).item() for v, o in zip(varied, x)]
    assert any(darker) and not all(darker)  # gammas below and above 1 drawn per image


def test_gamma_leaves_a_constant_image_alone():
    x = torch.full((2, 1, 4, 4), 0.3)
    assert torch.equal(adjust_gamma(x, torch.tensor([2.0, 0.5])), x)


def reference_blur(image, sigma, radius):
    """A plain (not separable) Gaussian convolution of one (C, *S) image with reflected edges."""
    spatial_dims = image.ndim - 1
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = line
    for _ in range(spatial_dims - 1):
        kernel = kernel.unsqueeze(-1) * line
    kernel = (kernel / kernel.sum()).float()[None, None]
    padded = F.pad(image[None], [radius] * (2 * spatial_dims), mode="reflect")
    convolve = F.conv2d if spatial_dims == 2 else F.conv3d
    return convolve(padded, kernel)[0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_is_a_gaussian_convolution_per_image(spatial_dims):
    x = batch(spatial_dims, count=3, side=10)
    sigma = torch.tensor([0.5, 1.0, 1.5])
    blurred = gaussian_blur(x, sigma, radius=4)
    for image, original, s in zip(blurred, x, sigma.tolist()):
        assert torch.allclose(image, reference_blur(original, s, 4), atol=1e-5)
    assert blurred[2].std() < blurred[1].std() < blurred[0].std() < x.std()  # wider blur, smoother image


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_probability_picks_images(spatial_dims):
    x = batch(spatial_dims, count=16)
    config = ViewConfig(**STILL, blur_probability=0.5, blur_sigma=(1.0, 1.0))
    view, _ = random_view(x, config, torch.Generator().manual_seed(0))
    changed = [not torch.equal(v, o) for v, o in zip(view, x)]
    assert 0 < sum(changed) < len(x)
    for v, o, was_blurred in zip(view, x, changed):
        if was_blurred:
            assert torch.allclose(v, reference_blur(o, 1.0, 3), atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_noise_adds_zero_mean_noise_of_a_drawn_std(spatial_dims):
    x = batch(spatial_dims, count=8, side=16)
    view, _ = random_view(x, ViewConfig(**STILL, noise_std=0.5), torch.Generator().manual_seed(0))
    residual = (view - x).flatten(1)
    stds = residual.std(dim=1)
    assert (stds > 0).all() and (stds < 0.5 * 1.1).all() and stds.max() > 2 * stds.min()
    assert residual.mean().abs() < 0.05


def test_the_grayscale_views_come_from_the_generator():
    x = batch(2)
    config = ViewConfig(gamma=(0.7, 1.4), blur_probability=0.5, noise_std=0.2)
    again = [random_view(x, config, torch.Generator().manual_seed(seed))[0] for seed in (1, 1, 2)]
    assert torch.equal(again[0], again[1]) and not torch.allclose(again[0], again[2])


def test_the_new_settings_are_validated():
    for bad in ({"gamma": (0.0, 1.0)}, {"gamma": (2.0, 1.0)}, {"blur_probability": 1.5}, {"blur_sigma": (0.0, 1.0)},
                {"noise_std": -0.1}):
        with pytest.raises(ValueError):
            ViewConfig(**bad)


def test_the_contrastive_view_switches_the_grayscale_augmentations_on_and_keeps_the_rest():
    base = ViewConfig(rotate_degrees=5, flip_probability=0.5, flip_axes=(-1, -3), size=12)
    view = contrastive_view(base)
    assert view.grayscale and view.crop_scale[0] < base.crop_scale[0]
    assert (view.rotate_degrees, view.flip_probability, view.flip_axes, view.size) == (5, 0.5, (-1, -3), 12)
