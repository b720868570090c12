"""VolumeBatches on a small hand-made volume cache: shapes, sharding, seeding, flips, lazy reading."""

from pathlib import Path

import numpy as np
import pytest
import torch

import chestssl.data.volumes as volumes_module
from chestssl.data.ct.cache import load_volume, save_volume, write_manifest
from chestssl.data.volumes import VolumeBatches, manifest_files
from chestssl.errors import DataError

COUNT, SIDE = 10, 8


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


def batches(batches_: VolumeBatches, seed: int = 0, epoch: int = 0) -> list[tuple]:
    return list(batches_.epoch(seed, epoch))


def test_shapes_labels_and_normalisation(tmp_path):
    files = make_cache(tmp_path)
    loader = VolumeBatches(files, np.arange(COUNT), batch_size=4)
    out = batches(loader)
    assert len(loader) == len(out) == 2  # 10 volumes, drop_last
    for x, y, lung in out:
        assert x.shape == lung.shape == (4, 1, SIDE, SIDE, SIDE)
        assert x.dtype == torch.float32 and lung.dtype == torch.bool
        assert index_of(x) == y.tolist()  # each volume arrives with its own label
        assert torch.allclose(x[lung], torch.tensor((0.75 - 0.5) / 0.25))
    assert len(VolumeBatches(files, None, batch_size=4, drop_last=False)) == 3


@pytest.mark.parametrize("drop_last, count", [(True, COUNT), (False, COUNT), (False, 5)])
def test_two_ranks_cover_each_global_batch_exactly_once(tmp_path, drop_last, count):
    files = make_cache(tmp_path, count)
    whole = batches(VolumeBatches(files, np.arange(count), 4, drop_last=drop_last), seed=3, epoch=1)
    ranks = [batches(VolumeBatches(files, np.arange(count), 4, drop_last=drop_last, rank=r, world_size=2), 3, 1)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for (_, y, _), (x0, y0, _), (x1, y1, _) in zip(whole, *ranks):
        assert sorted(y0.tolist() + y1.tolist()) == sorted(y.tolist())
        assert index_of(x0) == y0.tolist() and index_of(x1) == y1.tolist()
        assert x0.shape[1:] == (1, SIDE, SIDE, SIDE)  # an empty share (the last of 5 volumes) keeps its shape


def test_same_seed_same_batches_with_any_number_of_workers(tmp_path):
    files = make_cache(tmp_path)
    first = batches(VolumeBatches(files, np.arange(COUNT), 4, augment=True), seed=7, epoch=2)
    again = batches(VolumeBatches(files, np.arange(COUNT), 4, augment=True, num_workers=2), seed=7, epoch=2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    other = batches(VolumeBatches(files, np.arange(COUNT), 4, augment=True), seed=7, epoch=3)
    assert [b[1].tolist() for b in other] != [b[1].tolist() for b in first]


def test_the_lung_mask_flips_with_the_image(tmp_path):
    files = make_cache(tmp_path)
    original = torch.from_numpy(np.load(files[0])["lung"].astype(bool))
    moved = 0
    for x, _, lung in batches(VolumeBatches(files, None, 5, augment=True), seed=1):
        for image, mask in zip(x[:, 0], lung[:, 0]):
            assert image[mask].min() > image[~mask].max()  # the bright block is exactly where the mask is
            moved += not torch.equal(mask, original)
    assert moved >= 5  # flips happened (each of 3 axes with probability 1/2 per volume)


def test_files_are_read_lazily_one_batch_at_a_time(tmp_path, monkeypatch):
    files = make_cache(tmp_path)
    reads = []
    real_load = volumes_module.load_volume
    monkeypatch.setattr(volumes_module, "load_volume", lambda path: reads.append(path) or real_load(path))
    loader = VolumeBatches(files, None, batch_size=2, shuffle=False)
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
        batches(VolumeBatches(files[1:], None, 2, shuffle=False))


def test_manifest_files_lists_the_ok_volumes(tmp_path):
    with pytest.raises(DataError, match="no manifest.csv"):
        manifest_files(tmp_path)
    make_cache(tmp_path, 2)
    write_manifest(tmp_path, [{"id": "v00", "status": "ok", "file": "v00.npz", "label": "1"},
                              {"id": "bad", "status": "failed", "reason": "NaN"},
                              {"id": "v01", "status": "ok", "file": "v01.npz", "label": "0"}])
    files, rows = manifest_files(tmp_path)
    assert files == [tmp_path / "v00.npz", tmp_path / "v01.npz"] and [r["label"] for r in rows] == ["1", "0"]


def test_a_plain_cache_file_reads_back_like_a_compressed_one(tmp_path):
    rng = np.random.default_rng(0)
    image, lung = rng.random((16, 16, 16), dtype=np.float32), rng.random((16, 16, 16)) > 0.5
    save_volume(tmp_path / "compressed.npz", image, lung)
    save_volume(tmp_path / "plain.npz", image, lung, compress=False)
    for a, b in zip(load_volume(tmp_path / "compressed.npz"), load_volume(tmp_path / "plain.npz")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(load_volume(tmp_path / "plain.npz")[0], image, atol=1e-3)  # float16 storage
    assert (tmp_path / "plain.npz").stat().st_size > (tmp_path / "compressed.npz").stat().st_size
