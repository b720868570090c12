"""Batches of preprocessed CT volumes, read from the cache on the fly, seeded per (seed, epoch), sharded by rank.

The 3D counterpart of :class:`chestssl.data.batches.Batches`: the same order, sharding and seeding, but
the volumes stay on disk (``<cache>/<id>.npz`` written by :func:`chestssl.data.ct.prepare.prepare_ct`)
and a ``DataLoader`` reads only this process's part of each batch, at most ``num_workers x
PREFETCH_BATCHES`` batches ahead, so memory does not grow with the dataset.

Legend: ``N`` volumes, ``B`` this process's part of a global batch, ``D, H, W`` the cube's (z, y, x) axes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chestssl.data.batches import epoch_generator
from chestssl.data.ct.cache import MANIFEST, load_volume, read_manifest
from chestssl.errors import DataError

PREFETCH_BATCHES = 2  # per loader worker
FLIP_PROBABILITY = 0.5  # per sample and per axis in flip_axes


def manifest_files(cache_dir: str | Path) -> tuple[list[Path], list[dict[str, str]]]:
    """The ``.npz`` files and manifest rows of the volumes prepared without error, in manifest order.

    Raises:
        DataError: the cache has no manifest (``prepare-ct`` has not run there).
    """
    cache = Path(cache_dir)
    if not (cache / MANIFEST).is_file():
        raise DataError(f"{cache}: no {MANIFEST}; run prepare-ct with cache_dir={cache} first")
    rows = [row for row in read_manifest(cache) if row["status"] == "ok"]
    return [cache / row["file"] for row in rows], rows


class _CachedVolumes(Dataset):
    """``(image float32 (1, D, H, W), lung bool (1, D, H, W))`` of file ``index``, read when asked."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        image, lung = load_volume(self.files[index])
        return str(self.files[index]), torch.from_numpy(image)[None], torch.from_numpy(lung)[None]


def _stack(samples: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate volumes into ``(x (B, 1, D, H, W), lung (B, 1, D, H, W))``; differing shapes name the files."""
    first_name, first, _ = samples[0]
    for name, image, _ in samples[1:]:
        if image.shape != first.shape:
            raise DataError(f"cached volumes differ in shape: {first_name} is {tuple(first.shape[1:])}, {name} is "
                            f"{tuple(image.shape[1:])}; were they prepared with different sizes?")
    return torch.stack([s[1] for s in samples]), torch.stack([s[2] for s in samples])


class VolumeBatches:
    """Batches of ``(x, y, lung)`` from cached CT volumes, read lazily.

    Args:
        files: ``.npz`` files of the volume cache (see :func:`manifest_files`).
        labels: (N,) or (N, K) array, or None for unlabelled data.
        batch_size: global batch size, split evenly across processes.
        augment: random flips (the lung mask flipped with the image) and an intensity jitter.
        shuffle: draw a new order each epoch.
        drop_last: drop the last incomplete global batch (training).
        rank, world_size: this process's shard.
        num_workers: ``DataLoader`` worker processes reading the files (0 reads in this process).
        device: where the batches go.
        mean, std: ``x = (image - mean) / std`` for images in [0, 1]; recorded with every encoder.
        flip_axes: cube axes (0 = z, 1 = y, 2 = x) each flipped with probability 0.5 when augmenting.
        intensity: relative size of the brightness/contrast jitter when augmenting.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: np.ndarray | None,
        batch_size: int,
        augment: bool = False,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        mean: float = 0.5,
        std: float = 0.25,
        flip_axes: tuple[int, ...] = (0, 1, 2),
        intensity: float = 0.1,
    ) -> None:
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must divide among {world_size} processes, rank {rank} "
                             f"must be in [0, {world_size})")
        if not files:
            raise ValueError("VolumeBatches: no files; did prepare-ct prepare any volume?")
        if labels is not None and len(labels) != len(files):
            raise ValueError(f"VolumeBatches: {len(labels)} labels for {len(files)} files")
        if not set(flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes must be among 0, 1, 2 (z, y, x), got {flip_axes}")
        self.files = [Path(f) for f in files]  # only names: nothing is read before its batch
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels))
        count = len(self.files)
        # a labelled subset smaller than one batch trains on all of it each step
        self.batch_size = max(world_size, min(batch_size, count - count % world_size))
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.mean, self.std = mean, std
        self.flip_axes, self.intensity = tuple(flip_axes), intensity

    def __len__(self) -> int:
        count = len(self.files)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def epoch(self, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Yield this process's part of each global batch.

        Yields:
            x (B, 1, D, H, W) float32 normalised, y (B,) or (B, K) or None, lung (B, 1, D, H, W) bool.
        """
        count = len(self.files)
        generator = epoch_generator(seed, epoch, 0)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        shards = [order[start : start + self.batch_size][self.rank :: self.world_size].tolist()
                  for start in range(0, len(self) * self.batch_size, self.batch_size)]
        loader = DataLoader(
            _CachedVolumes(self.files), batch_sampler=[s for s in shards if s], num_workers=self.num_workers,
            collate_fn=_stack, pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH_BATCHES if self.num_workers else None,
        )
        augment_generator = epoch_generator(seed, epoch, 1 + self.rank)
        loaded = iter(loader)
        shape = None
        for indices in shards:
            if indices:
                x, lung = next(loaded)
                shape = x.shape[1:]
            else:  # the last batch held fewer volumes than processes: this one gets none
                shape = shape or _stack([_CachedVolumes(self.files)[0]])[0].shape[1:]
                x, lung = torch.empty((0, *shape)), torch.empty((0, *shape), dtype=torch.bool)
            x = x.to(self.device, non_blocking=True)
            lung = lung.to(self.device, non_blocking=True)
            if self.augment:
                x, lung = self._augment(x, lung, augment_generator)
            y = None if self.labels is None else self.labels[indices].to(self.device, non_blocking=True)
            yield (x - self.mean) / self.std, y, lung

    def _augment(
        self, x: torch.Tensor, lung: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flips of image and mask together, then ``x * gain + bias``; random numbers drawn on the CPU."""
        batch = x.shape[0]
        flips = torch.rand(batch, len(self.flip_axes), generator=generator) < FLIP_PROBABILITY  # (B, axes)
        gain = 1 + self.intensity * (2 * torch.rand(batch, generator=generator) - 1)
        bias = self.intensity * (2 * torch.rand(batch, generator=generator) - 1)
        for k, axis in enumerate(self.flip_axes):
            flip = flips[:, k].to(x.device).view(batch, 1, 1, 1, 1)
            x = torch.where(flip, x.flip(2 + axis), x)  # dim 2 + axis: (B, 1, D, H, W)
            lung = torch.where(flip, lung.flip(2 + axis), lung)
        shape = (batch, 1, 1, 1, 1)
        return x * gain.to(x.device).view(shape) + bias.to(x.device).view(shape), lung
