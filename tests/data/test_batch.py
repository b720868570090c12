"""The one batcher on in-memory images and on a hand-made volume cache: named batches, sharding, seeding,
views that follow their config in 2D and 3D, lung masks moved with the image, lazy reading."""

from pathlib import Path

import numpy as np
import pytest
import torch

import chestssl.data.batch as batch_module
from chestssl.data.batch import Batch, Batches, Normalisation
from chestssl.data.ct.cache import load_volume, save_volume
from chestssl.data.views import ViewConfig, random_view
from chestssl.errors import DataError

COUNT, SIDE = 10, 8
FLIPS_ONLY = ViewConfig(crop_scale=(1.0, 1.0), rotate_degrees=0, flip_probability=0.5, flip_axes=(-1, -2, -3), intensity=0)


def make_cache(folder: Path, count: int = COUNT, side: int = SIDE) -> list[Path]:
    """Volume k: its lung (an off-centre block, so any flip moves it) at 0.75, the rest at 0.25 + k / 100."""
    lung = np.zeros((side,) * 3, bool)
    lung[1:4, 2:7, 0:3] = True
    files = []
    for k in range(count):
        files.append(folder / f"v{k:02d}.npz")
        save_volume(files[-1], np.where(lung, 0.75, 0.25 + k / 100), lung)
    return files


def index_of(x: torch.Tensor) -> list[int]:
    """Recover each volume's k from an un-augmented batch (B, 1, D, H, W) normalised with mean 0.5, std 0.25."""
    image = x * 0.25 + 0.5
    return [round((sample.min().item() - 0.25) * 100) for sample in image]


def batches(batcher: Batches, seed: int = 0, epoch: int = 0) -> list[Batch]:
    return list(batcher.epoch(seed, epoch))


def test_volume_batches_are_named_records(tmp_path):
    files = make_cache(tmp_path)
    loader = Batches(files, np.arange(COUNT), 4, Normalisation(), patient_ids=np.array([f"p{k}" for k in range(COUNT)]))
    out = batches(loader)
    assert len(loader) == len(out) == 2  # 10 volumes, drop_last
    for batch in out:
        assert batch.images.shape == batch.lung_mask.shape == (4, 1, SIDE, SIDE, SIDE)
        assert batch.images.dtype == torch.float32 and batch.lung_mask.dtype == torch.bool
        assert index_of(batch.images) == batch.labels.tolist() == batch.index.tolist()
        assert batch.patient_ids == tuple(f"p{k}" for k in batch.index.tolist())
        assert torch.allclose(batch.images[batch.lung_mask], torch.tensor((0.75 - 0.5) / 0.25))
        assert batch.views == ()
    assert len(Batches(files, None, 4, Normalisation(), drop_last=False)) == 3


def test_in_memory_images_and_features():
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 1, 4, 4)
    batch = next(iter(Batches(images, np.arange(6), 3, Normalisation(0.5, 0.25), shuffle=False).epoch(0, 0)))
    assert torch.allclose(batch.images, (torch.from_numpy(images[:3]).float() / 255 - 0.5) / 0.25)
    assert batch.lung_mask is None and batch.labels.tolist() == [0, 1, 2]
    features = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    batch = next(iter(Batches(features, None, 6, None, shuffle=False).epoch(0, 0)))
    assert torch.equal(batch.images, torch.from_numpy(features))
    with pytest.raises(ValueError, match="features"):
        Batches(features, None, 6, None, views=(ViewConfig(),))


@pytest.mark.parametrize("drop_last, count", [(True, COUNT), (False, COUNT), (False, 5)])
def test_two_ranks_cover_each_global_batch_exactly_once(tmp_path, drop_last, count):
    files = make_cache(tmp_path, count)
    whole = batches(Batches(files, np.arange(count), 4, Normalisation(), drop_last=drop_last), seed=3, epoch=1)
    ranks = [batches(Batches(files, np.arange(count), 4, Normalisation(), drop_last=drop_last, rank=r, world_size=2), 3, 1)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for full, first, second in zip(whole, *ranks):
        assert sorted(first.labels.tolist() + second.labels.tolist()) == sorted(full.labels.tolist())
        assert index_of(first.images) == first.labels.tolist() and index_of(second.images) == second.labels.tolist()
        assert first.images.shape[1:] == (1, SIDE, SIDE, SIDE)  # an empty share (the last of 5 volumes) keeps its shape


def test_same_seed_same_batches_with_any_number_of_workers(tmp_path):
    files = make_cache(tmp_path)
    first = batches(Batches(files, np.arange(COUNT), 4, Normalisation(), (FLIPS_ONLY,)), seed=7, epoch=2)
    again = batches(Batches(files, np.arange(COUNT), 4, Normalisation(), (FLIPS_ONLY,), num_workers=2), seed=7, epoch=2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.lung_mask, b.lung_mask)
    other = batches(Batches(files, np.arange(COUNT), 4, Normalisation(), (FLIPS_ONLY,)), seed=7, epoch=3)
    assert [b.labels.tolist() for b in other] != [b.labels.tolist() for b in first]


def test_the_lung_mask_moves_with_the_image(tmp_path):
    files = make_cache(tmp_path)
    original = torch.from_numpy(np.load(files[0])["lung"].astype(bool))
    moved = 0
    for view in (FLIPS_ONLY, ViewConfig(crop_scale=(0.6, 1.0), rotate_degrees=20, flip_probability=0.5, intensity=0)):
        for batch in batches(Batches(files, None, 5, Normalisation(), (view,)), seed=1):
            for image, mask in zip(batch.images[:, 0], batch.lung_mask[:, 0]):
                if view is FLIPS_ONLY:
                    assert image[mask].min() > image[~mask].max()  # exact: the bright block is where the mask is
                else:  # resampled: the mask covers the bright voxels, up to interpolation at the edge
                    assert image[mask].mean() > image[~mask].mean() + 0.5
                moved += not torch.equal(mask, original)
    assert moved >= 10


def test_3d_augmentation_follows_its_config():
    """Volumes were once flipped on every axis whatever the config said; now the view config decides."""
    x = torch.rand(6, 1, 8, 8, 8)
    generator = torch.Generator().manual_seed(0)
    still = ViewConfig(crop_scale=(1.0, 1.0), rotate_degrees=0, flip_probability=0.0, intensity=0)
    assert torch.equal(random_view(x, still, generator)[0], x)
    always = ViewConfig(crop_scale=(1.0, 1.0), rotate_degrees=0, flip_probability=1.0, flip_axes=(-1,), intensity=0)
    assert torch.equal(random_view(x, always, generator)[0], x.flip(-1))
    cropped, _ = random_view(x, ViewConfig(crop_scale=(0.3, 0.5), rotate_degrees=0, intensity=0), generator)
    assert cropped.shape == x.shape and not torch.allclose(cropped, x)
    smaller, _ = random_view(x, ViewConfig(size=4), generator)
    assert smaller.shape == (6, 1, 4, 4, 4)  # multi-crop asks for smaller views
    with pytest.raises(ValueError, match="flip axis -3"):
        random_view(x[:, :, 0], ViewConfig(flip_axes=(-3,)), generator)


def test_several_views_per_sample():
    images = np.random.default_rng(0).integers(0, 255, size=(8, 1, 16, 16), dtype=np.uint8)
    batch = next(iter(Batches(images, None, 8, Normalisation(), (ViewConfig(), ViewConfig(size=8))).epoch(0, 0)))
    assert [v.shape for v in batch.views] == [(8, 1, 16, 16), (8, 1, 8, 8)]
    assert batch.images is batch.views[0]


def test_files_are_read_lazily_one_batch_at_a_time(tmp_path, monkeypatch):
    files = make_cache(tmp_path)
    reads = []
    real_load = batch_module.load_volume
    monkeypatch.setattr(batch_module, "load_volume", lambda path: reads.append(path) or real_load(path))
    loader = Batches(files, None, 2, Normalisation(), shuffle=False)
    files[3].unlink()  # after construction: only the batch that holds it fails
    epoch = loader.epoch(0, 0)
    assert reads == []
    next(epoch)
    assert reads == files[:2]
    with pytest.raises(DataError, match="v03.npz"):
        next(epoch)


def test_differing_shapes_named(tmp_path):
    files = make_cache(tmp_path, 2) + make_cache(tmp_path / "big", 1, side=SIDE + 2)
    with pytest.raises(DataError, match="differ in shape.*v00.npz"):
        batches(Batches(files[1:], None, 2, Normalisation(), shuffle=False))


def test_a_plain_cache_file_reads_back_like_a_compressed_one(tmp_path):
    rng = np.random.default_rng(0)
    image, lung = rng.random((16, 16, 16), dtype=np.float32), rng.random((16, 16, 16)) > 0.5
    save_volume(tmp_path / "compressed.npz", image, lung)
    save_volume(tmp_path / "plain.npz", image, lung, compress=False)
    for a, b in zip(load_volume(tmp_path / "compressed.npz"), load_volume(tmp_path / "plain.npz")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(load_volume(tmp_path / "plain.npz")[0], image, atol=1e-3)  # float16 storage
    assert (tmp_path / "plain.npz").stat().st_size > (tmp_path / "compressed.npz").stat().st_size
