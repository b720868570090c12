"""In-memory batching with per-epoch seeded order, sharded across ``torchrun`` processes.

Every epoch's order and augmentation come from ``(seed, epoch)``, so a run resumed at an epoch boundary draws
exactly what the uninterrupted run drew. Legend: ``N`` samples, ``B`` batch, ``C`` channels, ``S`` spatial.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from chestssl.data.augment import AugmentConfig, random_affine


@dataclass(frozen=True)
class Normalisation:
    """uint8 pixels -> float: ``(x / 255 - mean) / std``; recorded with every encoder."""

    mean: float = 0.5
    std: float = 0.25

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


def xray_preprocessing(image_size: int, normalisation: Normalisation) -> dict:
    """How 2D X-ray inputs are made; recorded with an encoder and checked when fine-tuning it."""
    return {"modality": "xray", "spatial_dims": 2, "image_size": image_size, "channels": 1, "pixels": "uint8 grayscale",
            "normalisation": {"mean": normalisation.mean, "std": normalisation.std}}


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for one epoch of one random stream (order, augmentation, ...), independent of the others."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class Batches:
    """Batches of ``(images, labels)`` from uint8 arrays held in memory.

    Args:
        images: uint8 (N, C, *S).
        labels: (N,) or (N, K) array, or None for unlabelled data.
        batch_size: global batch size, split evenly across processes.
        normalisation: how uint8 pixels are scaled; None passes float inputs (e.g. features) through.
        augment: augmentation for training, or None.
        shuffle: draw a new order each epoch.
        drop_last: drop the last incomplete global batch (training).
        rank, world_size: this process's shard.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        batch_size: int,
        normalisation: Normalisation | None,
        augment: AugmentConfig | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels))
        # a labelled subset smaller than one batch trains on all of it each step
        self.batch_size = max(world_size, min(batch_size, len(images) - len(images) % world_size))
        self.normalisation = normalisation
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        count = len(self.images)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def epoch(self, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield this process's part of each global batch: ``(x (B/world, C, *S) float, y or None)``."""
        count = len(self.images)
        order = torch.randperm(count, generator=epoch_generator(seed, epoch, 0)) if self.shuffle else torch.arange(count)
        augment_generator = epoch_generator(seed, epoch, 1 + self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start : start + self.batch_size][self.rank :: self.world_size]
            x = self.images[indices].to(self.device, non_blocking=True)
            x = x.float() if self.normalisation is None else self.normalisation.apply(x)
            if self.augment is not None:
                x = random_affine(x, self.augment, augment_generator)
            y = None if self.labels is None else self.labels[indices].to(self.device, non_blocking=True)
            yield x, y
