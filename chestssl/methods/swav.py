"""Swapping Assignments between Views (Caron et al. 2020, "Unsupervised learning of visual features by contrasting
cluster assignments"), with multi-crop, 2D and 3D, with a ResNet or a ViT encoder.

Every crop is embedded (encoder -> projection MLP -> L2 normalisation) and scored against ``K`` prototypes, unit
vectors learnt with the network. The two global crops' scores are turned into soft codes by Sinkhorn-Knopp
(an equal share of the batch for each prototype), and each code is predicted from every other crop:
``-sum_k q_s^(k) log softmax(z_t . c / temperature)^(k)``. Multi-crop adds small local crops that are only
predicting, never predicted (codes come from global crops). No feature queue: the Sinkhorn pool is the global
batch, summed across processes under ``torchrun``, so keep ``num_prototypes`` near or below the global batch.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``F`` encoder features, ``P`` embedding,
``K`` prototypes, ``V`` crops, ``A`` crops whose codes are predicted (the two global ones).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chestssl.data.batch import Batch
from chestssl.data.views import VIEW_PRESETS, ViewConfig, contrastive_view
from chestssl.methods.projection import projection_mlp

if TYPE_CHECKING:  # for the annotation only: methods do not depend on the training loop
    from chestssl.train.loop import Progress

log = logging.getLogger(__name__)

GLOBAL_CROPS = 2  # the paper's two full-size views, the only ones whose codes are computed
MIN_LOCAL_SIDE = 16  # the smallest default local crop side (28 px images, 32³ CT cubes: near native resolution)


def _sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over every process of a ``torchrun`` group (nothing to do alone)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes (B, K) from prototype scores (B, K) by Sinkhorn-Knopp (Caron et al. 2020, eq. 3 and Algorithm 1).

    ``Q = exp(scores / epsilon)`` is scaled, ``iterations`` times, so that every prototype holds ``1/K`` of the
    mass (rows of the (K, B) plan) and every sample ``1/B`` (columns); the last step rescales each sample's code to
    sum to 1. Under ``torchrun`` the sums run over the global batch (every process's columns), so the codes equal
    those of one process holding the whole batch. No gradient.
    """
    scores = scores.detach().float()
    shift = scores.max().reshape(1)  # one shift for every process: it cancels in the first normalisation
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    plan = torch.exp((scores - shift) / epsilon).t()  # (K, B)
    prototypes = plan.shape[0]
    total = _sum_across_processes(torch.stack([plan.sum(), torch.tensor(float(plan.shape[1]), device=plan.device)]))
    plan /= total[0]
    samples = total[1]  # the global batch size
    for _ in range(iterations):
        rows = _sum_across_processes(plan.sum(dim=1, keepdim=True))  # (K, 1) mass of each prototype
        plan /= rows.clamp_min(torch.finfo(plan.dtype).tiny) * prototypes
        plan /= plan.sum(dim=0, keepdim=True) * samples  # each sample's column to 1/B
    return (plan * samples).t()  # (B, K): each code sums to 1


def swapped_prediction_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
                            temperature: float = 0.1) -> torch.Tensor:
    """The swapped prediction loss over all crops (Caron et al. 2020, eq. 1 with multi-crop).

    For each code ``q_a`` (of crop ``a``), the mean over every other crop ``v`` of the cross-entropy between
    ``q_a`` and ``softmax(scores_v / temperature)``; then the mean over the codes.

    Args:
        scores: V tensors (B, K), the prototype scores of every crop; the first ``len(codes)`` crops are the ones
            whose codes are given.
        codes: A tensors (B, K), the codes of crops 0..A-1 (constants).
        temperature: softmax temperature of the predictions.
    """
    crops, coded = len(scores), len(codes)
    if crops < 2 or not 1 <= coded <= crops:
        raise ValueError(f"swapped prediction needs at least 2 crops and 1..{crops} codes, got {crops} and {coded}")
    log_predictions = torch.stack([F.log_softmax(s.float() / temperature, dim=-1) for s in scores])  # (V, B, K)
    targets = torch.stack([q.detach().float() for q in codes])  # (A, B, K)
    # elementwise rather than a matrix product, so autocast keeps it in float32: (A, 1, B, K) x (1, V, B, K)
    cross_entropy = -(targets.unsqueeze(1) * log_predictions.unsqueeze(0)).sum(dim=-1).mean(dim=-1)  # (A, V)
    other = ~torch.eye(coded, crops, dtype=torch.bool, device=cross_entropy.device)  # a code is not its own target
    return cross_entropy[other].sum() / (coded * (crops - 1))


@dataclass(frozen=True)
class SwAVConfig:
    """SwAV settings (``swav.*``): head and prototypes, Sinkhorn, prototype freezing and the local crops.

    The paper uses 3000 prototypes for ImageNet (1.28M images, 1000 classes) with batches of 4096, or 256 plus a
    queue of 3840 features, so the Sinkhorn pool always exceeds K and an equal split over the prototypes stays
    meaningful; it finds the count matters little over a wide range. Without a queue the pool is the global batch
    (256 by default): 300 prototypes keep about one sample per prototype per batch and ~16 images per prototype on
    ~5k PneumoniaMNIST images. The paper freezes the prototypes for its first epoch (313 steps at batch 4096);
    20 steps are about one epoch of 4.7k images at batch 256. The paper's local crops cover 5-14% of the image,
    up to the lower bound of its global crops (14%), resampled to 96 px; on 28-64 px chest images 5% would be a
    6-14 px patch, so here 10-30% (up to the contrastive global crops' lower bound, 30%), resampled by default to
    the paper's 96/224 of the input side, at least 16 px (16³ voxels for cubes): 16 px at 28 px and for CT cubes
    of 32 (near native resolution), 27 px at 64 px, 55 px at 128 px (about half, as the paper's). A fixed 16 px
    would leave an ImageNet-stem ResNet a 1 x 1 map after its third stage at 128 px. Four local crops cost about as
    much as the paper's six relative to the global ones (4 x 16² / 28² = 1.3 global crops; the paper's
    6 x 96² / 224² = 1.1). ``view_preset`` "medical" makes every crop contrastive (the grayscale stand-ins for
    the paper's colour distortion and blur, as SimCLR here); "base" takes ``views.*`` as set.
    """

    projection_hidden_size: int = 512  # hidden width of the projection MLP (the paper: 2048, a ResNet-50's features)
    projection_size: int = 128  # embedding width scored against the prototypes (the paper's 128)
    num_prototypes: int = 300  # K, the number of prototypes (paper 3000 for ImageNet; near the global batch here)
    temperature: float = 0.1  # softmax temperature of the predictions
    sinkhorn_epsilon: float = 0.05  # entropy regularisation of the Sinkhorn codes (smaller: sharper codes)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp row/column normalisations per batch
    freeze_prototypes_steps: int = 20  # optimiser steps with frozen prototypes at the start (about one epoch)
    local_crops: int = 4  # small crops besides the two global views (0: two views only)
    local_crop_size: int | None = None  # local crop side in pixels or voxels (null: 96/224 of the input, at least 16)
    local_crop_scale: tuple[float, float] = (0.1, 0.3)  # area share of the input that a local crop covers
    view_preset: str = "medical"  # medical: views.* made contrastive for every crop; base: views.* as set

    def __post_init__(self) -> None:
        for name in ("projection_hidden_size", "projection_size", "num_prototypes", "sinkhorn_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"swav.{name} must be at least 1, got {getattr(self, name)}")
        if self.local_crop_size is not None and self.local_crop_size < 1:
            raise ValueError(f"swav.local_crop_size must be at least 1 or null, got {self.local_crop_size}")
        if self.freeze_prototypes_steps < 0 or self.local_crops < 0:
            raise ValueError(f"swav.freeze_prototypes_steps and swav.local_crops must be >= 0, got "
                             f"{self.freeze_prototypes_steps} and {self.local_crops}")
        if not self.temperature > 0 or not self.sinkhorn_epsilon > 0:
            raise ValueError(f"swav.temperature and swav.sinkhorn_epsilon must be positive, got {self.temperature} "
                             f"and {self.sinkhorn_epsilon}")
        low, high = self.local_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"swav.local_crop_scale must satisfy 0 < low <= high <= 1, got {list(self.local_crop_scale)}")
        if self.view_preset not in VIEW_PRESETS:
            raise ValueError(f"swav.view_preset must be one of {VIEW_PRESETS}, got {self.view_preset!r}")

    def local_side(self, image_size: int) -> int:
        """The local crops' side for inputs of side ``image_size``: ``local_crop_size``, or when that is null the
        paper's 96/224 of the input side, at least 16 (and never above the input side)."""
        if self.local_crop_size is not None:
            return self.local_crop_size
        return min(image_size, max(MIN_LOCAL_SIDE, round(image_size * 96 / 224)))


class SwAV(nn.Module):
    """SwAV around ``encoder`` (pooled (B, F) features); ``forward(batch)`` returns the swapped prediction loss
    over ``batch.views``: the two global views first, then the local crops.

    A ViT has a fixed token grid, so its local crops are resampled up to its input size before encoding (the
    same small area of the image, without the compute saving a ResNet gets from encoding them small).
    """

    encoders = ("resnet", "vit")
    Config = SwAVConfig
    num_views = GLOBAL_CROPS  # the global views; view_configs adds swav.local_crops small ones

    def __init__(self, encoder: nn.Module, config: SwAVConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"SwAV works with encoder(s) {list(self.encoders)}, got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or SwAVConfig()
        self.config = config
        self.encoder = encoder
        self.projector = projection_mlp(encoder.feature_size, config.projection_hidden_size, config.projection_size)
        self.prototypes = nn.Linear(config.projection_size, config.num_prototypes, bias=False)
        # optimiser steps taken, set by after_step: decides the prototype freeze, saved for an exact resume
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @classmethod
    def view_configs(cls, settings: SwAVConfig, base: ViewConfig, image_size: int) -> tuple[ViewConfig, ...]:
        """Multi-crop for inputs of side ``image_size``: two global views (``base``, made contrastive by the
        medical preset), then ``settings.local_crops`` small crops of the same kind."""
        view = contrastive_view(base) if settings.view_preset == "medical" else base
        local = dataclasses.replace(view, crop_scale=settings.local_crop_scale, size=settings.local_side(image_size))
        return (view,) * GLOBAL_CROPS + (local,) * settings.local_crops

    def check_dataset(self, samples_per_epoch: int, global_batch: int) -> None:
        """Warn where the Sinkhorn pool, the global batch, is smaller than the prototypes: each code then gives
        every prototype less than one sample's share, and the equal split Sinkhorn enforces spreads the codes
        thin (the paper adds a feature queue there; chestssl has none)."""
        if self.config.num_prototypes > global_batch:
            log.warning("swav.num_prototypes %d is more than the global batch of %d that Sinkhorn-Knopp splits "
                        "equally over them: every prototype gets less than one sample a batch; "
                        "swav.num_prototypes=%d or a larger batch keeps at least one", self.config.num_prototypes,
                        global_batch, global_batch)

    @property
    def prototypes_frozen(self) -> bool:
        return int(self.steps_done) < self.config.freeze_prototypes_steps

    @torch.no_grad()
    def normalise_prototypes(self) -> None:
        """Each prototype (a row of the weight) back to unit length, as the paper does before every step."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """A crop as the encoder takes it: a ViT's fixed grid needs its own input size."""
        size = getattr(self.encoder, "image_size", None)
        if self.encoder.kind != "vit" or x.shape[-1] == size:
            return x
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        return F.interpolate(x, size=(size,) * (x.ndim - 2), mode=mode, align_corners=False)

    def forward_scores(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Crops, each (B, C, *S_v) -> their prototype scores, each (B, K).

        Crops of one size are encoded together (one pass per resolution, as in the paper's multi-crop); the
        projection then runs once on every crop's features, so its batch norm sees all of them.
        """
        crops = [self._encoder_input(view) for view in views]
        batch = crops[0].shape[0]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, crop in enumerate(crops):
            by_size.setdefault(tuple(crop.shape[1:]), []).append(index)
        features: list[torch.Tensor | None] = [None] * len(crops)  # filled below, in crop order
        for indices in by_size.values():
            encoded = self.encoder(torch.cat([crops[i] for i in indices]))  # (len(indices) B, F)
            for index, part in zip(indices, encoded.split(batch)):
                features[index] = part
        projected = self.projector(torch.cat(features))  # (V B, P)
        weight = self.prototypes.weight
        if self.prototypes_frozen:
            # the same values with a zero gradient: the prototypes stay in the graph (every parameter gets a
            # gradient, as DistributedDataParallel expects) but the optimiser gets nothing to move them with
            weight = weight.detach() + 0.0 * weight
        # scores in float32 even under autocast: Sinkhorn divides them by epsilon (0.05), which would turn
        # bfloat16's rounding of a cosine (~0.004) into ~8% errors in the codes; the layer is tiny
        with torch.autocast(device_type=projected.device.type, enabled=False):
            embedding = F.normalize(projected.float(), dim=-1)  # (V B, P), unit rows
            scores = F.linear(embedding, weight.float())  # (V B, K) cosines
        return list(scores.split(batch))  # V x (B, K)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Swapped prediction loss of ``batch.views``: codes of the two global views, predicted from every other
        crop."""
        views = batch.views
        if len(views) < GLOBAL_CROPS:
            raise ValueError(f"SwAV needs at least two augmented views per sample (batch.views), got {len(views)}")
        self.normalise_prototypes()
        scores = self.forward_scores(views)
        config = self.config
        codes = [sinkhorn(s, config.sinkhorn_epsilon, config.sinkhorn_iterations) for s in scores[:GLOBAL_CROPS]]
        return swapped_prediction_loss(scores, codes, config.temperature)

    def after_step(self, progress: Progress) -> None:
        """Count the step: the prototypes learn from step ``freeze_prototypes_steps`` on."""
        self.steps_done.fill_(progress.step + 1)
