"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"; Chen et al.
2020, "Improved Baselines with Momentum Contrastive Learning"), 2D and 3D.

Legend: ``B`` this process's batch, ``N`` the global batch, ``C`` channels, ``S`` spatial, ``F`` encoder
features, ``E`` projection width, ``K`` queued keys, ``G`` batch-norm groups.

The query encoder (``.encoder``, the one handed on) and its projection learn; the key encoder and projection
are their momentum (EMA) copies, updated in ``after_step``. The queue of the last K keys, the sample each came
from and the write position are registered buffers, so a checkpoint holds them and a resumed run continues
exactly. Under ``torchrun`` the keys of every process are enqueued (every process keeps the same queue).

Batch norm: MoCo's shuffle-BN (each key computed on another GPU, among other samples than its query) is not
done across processes. By default the key encoder runs in training mode on its own batch statistics (its key
batch: the same samples as the query batch, other views). With ``bn_splits`` G > 1 each process encodes its
queries in G groups and its keys, shuffled, in G other groups, each group with its own statistics (the
single-device form of shuffle-BN, as in MoCo's one-GPU demonstration), so a query and its key are normalised
among different samples and batch statistics do not give the key away. A ViT has batch norm only in its projection.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from chestssl.data.batch import Batch
from chestssl.data.views import VIEW_PRESETS, ViewConfig
from chestssl.errors import ConfigError
from chestssl.methods.contrastive_losses import info_nce
from chestssl.methods.projection import ema_update, projection_mlp
from chestssl.methods.simclr import contrastive_views
from chestssl.train.distributed import gather

if TYPE_CHECKING:
    from chestssl.train.loop import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoCoV2Config:
    """MoCo v2 settings (``mocov2.*``): projection, temperature, momentum, queue, batch-norm groups and views.

    The paper's momentum 0.999 suits ImageNet's 5,000 steps an epoch; a chest data set of a few thousand images
    gives tens of steps an epoch, and a key encoder averaging over 1,000 steps would lag many epochs behind, so
    the default is 0.99 (an average over about 100 steps). The queue must fit in the data: at most the keys of
    one epoch minus one global batch (checked when pretraining starts); 4,096 suits PneumoniaMNIST at batch 256.
    """

    projection_hidden_size: int = 512  # hidden width of the projection MLP (the paper: 2048)
    projection_size: int = 128  # width of the space the loss compares in
    projection_layers: int = 2  # linear layers of the projection MLP
    temperature: float = 0.2  # InfoNCE temperature (MoCo v2)
    momentum: float = 0.99  # EMA rate of the key encoder (paper 0.999 for ImageNet; 0.99 for small data sets)
    queue_size: int = 4096  # queued keys used as negatives (at most one epoch's keys minus one global batch)
    exclude_own_keys: bool = True  # a sample's older keys in the queue are not its negatives (common on small data)
    bn_splits: int = 1  # batch-norm groups per process for queries and shuffled keys (>1: shuffle-BN on one device)
    view_preset: str = "medical"  # medical: views.* made contrastive (crop, gamma, blur, noise); base: views.* as set

    def __post_init__(self) -> None:
        for name in ("projection_hidden_size", "projection_size", "projection_layers", "queue_size", "bn_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"mocov2.{name} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"mocov2.temperature must be positive, got {self.temperature}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"mocov2.momentum must be in [0, 1], got {self.momentum}")
        if self.view_preset not in VIEW_PRESETS:
            raise ValueError(f"mocov2.view_preset must be one of {VIEW_PRESETS}, got {self.view_preset!r}")


class MoCoV2(nn.Module):
    """Query encoder + projection against momentum keys and a queue of past keys; InfoNCE loss."""

    encoders = ("resnet", "vit")
    Config = MoCoV2Config
    num_views = 2

    @classmethod
    def view_configs(cls, settings: MoCoV2Config, base: ViewConfig, image_size: int) -> tuple[ViewConfig, ...]:
        return contrastive_views(settings.view_preset, base)

    def __init__(self, encoder: nn.Module, config: MoCoV2Config | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"MoCo v2 works with encoders {list(self.encoders)}, got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or MoCoV2Config()
        self.config = config
        self.encoder = encoder
        self.projection = projection_mlp(encoder.feature_size, config.projection_hidden_size, config.projection_size,
                                         config.projection_layers)
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_projection = copy.deepcopy(self.projection)
        for parameter in [*self.key_encoder.parameters(), *self.key_projection.parameters()]:
            parameter.requires_grad_(False)
        # random unit keys until real ones arrive (as MoCo starts); sample -1 is no sample
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.projection_size), dim=1))
        self.register_buffer("queue_samples", torch.full((config.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros(1, dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None  # this step's keys, enqueued after it

    def check_dataset(self, samples_per_epoch: int, global_batch: int) -> None:
        """Refuse a queue larger than the data can fill with distinct samples: ConfigError naming the limit."""
        limit = samples_per_epoch - global_batch
        if self.config.queue_size > limit:
            raise ConfigError(f"mocov2.queue_size {self.config.queue_size} is more than the {max(limit, 0)} keys this "
                              f"data set supports ({samples_per_epoch} samples an epoch minus a global batch of "
                              f"{global_batch}): the queue would hold several keys of the same images; set "
                              f"mocov2.queue_size={max(limit, 1)} or less")
        share = (self.config.queue_size / samples_per_epoch) ** 2 / 2
        if not self.config.exclude_own_keys and share > 0.05:
            log.warning("mocov2.queue_size %d over %d samples an epoch: about %.0f%% of the queries meet an older key "
                        "of their own sample as a negative (mocov2.exclude_own_keys=true avoids it)",
                        self.config.queue_size, samples_per_epoch, 100 * share)

    def _grouped(self, network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shuffle: bool) -> torch.Tensor:
        """``network`` on ``x`` (B, ...) in ``bn_splits`` groups, each with its own batch statistics; with
        ``shuffle`` the groups are a random permutation of the batch, and the output is put back in order."""
        groups = self.config.bn_splits
        if groups == 1:
            return network(x)
        if x.shape[0] % groups or x.shape[0] // groups < 2:
            raise ValueError(f"mocov2.bn_splits {groups} needs a per-process batch divisible into groups of at least 2 "
                             f"samples, got {x.shape[0]}")
        order = torch.randperm(x.shape[0], device=x.device) if shuffle else torch.arange(x.shape[0], device=x.device)
        outputs = torch.cat([network(part) for part in x[order].chunk(groups)])  # (B, E) in shuffled order
        return outputs[order.argsort()]

    def forward_query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, E) queries."""
        return self._grouped(lambda v: self.projection(self.encoder(v)), x, shuffle=False)

    @torch.no_grad()
    def forward_key(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, E) unit keys of the momentum encoder, without gradient."""
        return F.normalize(self._grouped(lambda v: self.key_projection(self.key_encoder(v)), x, shuffle=True).float(),
                           dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """InfoNCE of queries from ``batch.views[0]`` against keys from ``batch.views[1]`` and the queue."""
        if len(batch.views) < 2:
            raise ValueError("MoCo v2 needs two augmented views per sample: make the batches with its view_configs")
        query = self.forward_query(batch.views[0])
        key = self.forward_key(batch.views[1])
        excluded = None
        if self.config.exclude_own_keys and batch.index is not None:
            samples = batch.index.to(self.queue_samples.device)
            excluded = self.queue_samples.unsqueeze(0) == samples.unsqueeze(1)  # (B, K)
        self._pending = (key, None if batch.index is None else batch.index.to(key.device))
        return info_nce(query, key, self.queue, self.config.temperature, excluded)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, samples: torch.Tensor | None = None) -> None:
        """Write ``keys`` (N, E) over the oldest queued ones (wrapping around), with their ``samples`` (N,)."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        positions = (self.queue_pointer + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[positions] = keys.to(self.queue.dtype)
        self.queue_samples[positions] = -1 if samples is None else samples[-size:].to(self.queue_samples.device)
        self.queue_pointer.copy_((self.queue_pointer + keys.shape[0]) % size)

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        """After each optimiser step: the momentum update of the key networks, then this step's keys from every
        process into the queue (each process the same, in rank order)."""
        ema_update(self.key_encoder, self.encoder, self.config.momentum)
        ema_update(self.key_projection, self.projection, self.config.momentum)
        if self._pending is not None:
            keys, samples = self._pending
            self.enqueue(gather(keys), None if samples is None else gather(samples))
            self._pending = None
