"""Named batches and the one batcher: images held in memory or CT volumes read from a cache, 2D and 3D alike.

Every epoch's order and augmentation come from ``(seed, epoch)``, so a run resumed at an epoch boundary draws
exactly what the uninterrupted run drew; each ``torchrun`` process gets its share of every global batch.
Legend: ``N`` samples, ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``F`` features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chestssl.data.ct.cache import load_volume
from chestssl.data.views import ViewConfig, random_view
from chestssl.errors import DataError

PREFETCH_BATCHES = 2  # per loader worker: memory stays bounded however large the cache


@dataclass(frozen=True)
class Normalisation:
    """Stored pixels -> model input: ``(x * scale - mean) / std`` with scale 1/255 for uint8 X-rays and 1 for
    cached CT volumes (already in [0, 1]); recorded with every encoder."""

    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"normalisation std must be positive, got {self.std}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        return (images.float() * scale - self.mean) / self.std


def xray_preprocessing(image_size: int, normalisation: Normalisation) -> dict:
    """How 2D X-ray inputs are made; recorded with an encoder and checked when fine-tuning it."""
    return {"modality": "xray", "spatial_dims": 2, "image_size": image_size, "channels": 1, "pixels": "uint8 grayscale",
            "normalisation": {"mean": normalisation.mean, "std": normalisation.std}}


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for one epoch of one random stream (order, augmentation, ...), independent of the others."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass
class Batch:
    """One process's part of a global batch, with named fields.

    Attributes:
        images: (B, C, *S) float, normalised; the first view when the batcher makes views. Precomputed
            features (B, F) for a linear probe.
        labels: (B,) class indices or (B, K) multi-hot, or None for unlabelled data; for a dense task the
            label maps (B, *S) of class indices, moved with the first view.
        lung_mask: bool (B, 1, *S) aligned with ``images``, for CT volumes; None otherwise.
        index: (B,) int64 positions of the samples in the batcher's inputs.
        patient_ids: the samples' patient keys, where known.
        views: every augmented view when a method asks for several (``views[0]`` is ``images``); multi-crop
            views may be smaller.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    lung_mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    patient_ids: tuple[str, ...] | None = None
    views: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return self.images.shape[0]


class _CachedVolumes(Dataset):
    """``(name, image float (1, D, H, W), lung bool (1, D, H, W))`` of file ``index``, read when asked."""

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


class Batches:
    """Batches of :class:`Batch` over ``inputs``: uint8 images (N, C, *S) or features (N, F) in memory, or the
    ``.npz`` files of a CT volume cache, read lazily by ``num_workers`` loader workers.

    Args:
        inputs: the samples.
        labels: (N,) or (N, K) array, or None for unlabelled data.
        batch_size: global batch size, split evenly across processes; a set smaller than one batch trains on
            all of it each step.
        normalisation: how stored pixels become model inputs; None passes features through.
        views: one :class:`ViewConfig` per augmented view to make (empty: no augmentation, evaluation).
        shuffle: draw a new order each epoch.
        drop_last: drop the last incomplete global batch (training).
        rank, world_size: this process's shard.
        device: where the batches go.
        num_workers: loader workers reading cached volumes (0 reads in this process).
        patient_ids: (N,) patient keys carried into each batch, where known.
        dense_labels: ``labels`` are label maps (N, *S) aligned with the images (segmentation): the first
            view's flips, crops and rotations move them too (nearest neighbour, background outside).
    """

    def __init__(
        self,
        inputs: np.ndarray | Sequence[str | Path],
        labels: np.ndarray | None,
        batch_size: int,
        normalisation: Normalisation | None,
        views: Sequence[ViewConfig] = (),
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        patient_ids: np.ndarray | None = None,
        dense_labels: bool = False,
    ) -> None:
        if batch_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must be positive and divide among {world_size} processes, "
                             f"rank {rank} must be in [0, {world_size})")
        self.in_memory = isinstance(inputs, np.ndarray)
        if self.in_memory:
            self.images = torch.from_numpy(np.ascontiguousarray(inputs))
        else:
            self.files = [Path(f) for f in inputs]  # only names: nothing is read before its batch
        count = len(inputs)
        if count == 0:
            raise ValueError("Batches: no inputs")
        if labels is not None and len(labels) != count:
            raise ValueError(f"Batches: {len(labels)} labels for {count} inputs")
        if views and normalisation is None:
            raise ValueError("Batches: views augment images; features (normalisation None) take none")
        if dense_labels and (labels is None or not self.in_memory or np.ndim(labels) != np.ndim(inputs) - 1):
            raise ValueError("Batches: dense labels are label maps (N, *S) beside in-memory images (N, C, *S)")
        self.count = count
        self.dense_labels = dense_labels
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels))
        self.patient_ids = None if patient_ids is None else [str(p) for p in patient_ids]
        self.batch_size = max(world_size, min(batch_size, count - count % world_size))
        self.normalisation = normalisation
        self.views = tuple(views)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return self.count // self.batch_size if self.drop_last else -(-self.count // self.batch_size)

    def _shards(self, seed: int, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.count, generator=epoch_generator(seed, epoch, 0)) if self.shuffle else torch.arange(self.count)
        return [order[start : start + self.batch_size][self.rank :: self.world_size].tolist()
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

    def _read(self, shards: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Stored pixels and lung masks of each shard, in order; an empty shard gives empty tensors."""
        if self.in_memory:
            for indices in shards:
                yield self.images[torch.as_tensor(indices, dtype=torch.long)], None
            return
        loader = DataLoader(
            _CachedVolumes(self.files), batch_sampler=[s for s in shards if s], num_workers=self.num_workers,
            collate_fn=_stack, pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH_BATCHES if self.num_workers else None,
        )
        loaded, shape = iter(loader), None
        for indices in shards:
            if indices:
                x, lung = next(loaded)
                shape = x.shape[1:]
            else:  # the last batch held fewer volumes than processes: this one gets none
                shape = shape or _stack([_CachedVolumes(self.files)[0]])[0].shape[1:]
                x, lung = torch.empty((0, *shape)), torch.empty((0, *shape), dtype=torch.bool)
            yield x, lung

    def epoch(self, seed: int, epoch: int) -> Iterator[Batch]:
        """Yield this process's part of each global batch of epoch ``epoch``."""
        shards = self._shards(seed, epoch)
        view_generator = epoch_generator(seed, epoch, 1 + self.rank)
        for indices, (stored, lung) in zip(shards, self._read(shards)):
            index = torch.as_tensor(indices, dtype=torch.long)
            x = stored.to(self.device, non_blocking=True)
            lung = None if lung is None else lung.to(self.device, non_blocking=True)
            x = x.float() if self.normalisation is None else self.normalisation.apply(x)
            y = None if self.labels is None else self.labels[index].to(self.device, non_blocking=True)
            views, lung_first = [], lung
            for number, view in enumerate(self.views):
                if number == 0 and self.dense_labels:  # the label maps move with the first view
                    image, moved = random_view(x, view, view_generator, y.unsqueeze(1))
                    y = moved.squeeze(1)
                else:
                    image, moved = random_view(x, view, view_generator, lung)
                views.append(image)
                if number == 0 and not self.dense_labels:
                    lung_first = moved
            patients = None if self.patient_ids is None else tuple(self.patient_ids[i] for i in indices)
            yield Batch(images=views[0] if views else x, labels=y, lung_mask=lung_first, index=index,
                        patient_ids=patients, views=tuple(views))
