"""Bootstrap Your Own Latent (Grill et al. 2020, "Bootstrap your own latent: a new approach to self-supervised
learning"), 2D and 3D, with a ResNet or a ViT encoder.

An online network (encoder -> projector -> predictor) learns to predict, from one augmented view, the target
network's projection of the other view. The target (encoder -> projector) gets no gradient: after every optimiser
step it moves toward the online weights by an exponential moving average whose rate rises from ``momentum_base``
to 1 on a cosine. ``.encoder`` is the online encoder, the one handed off; the target lives in ``.target``, saved
with the method's state (an exact resume needs it) but never exported.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``F`` encoder features, ``P`` projection.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from chestssl.data.batch import Batch
from chestssl.data.views import VIEW_PRESETS, ViewConfig, contrastive_view
from chestssl.methods.projection import ema_update, projection_mlp

if TYPE_CHECKING:  # for the annotation only: methods do not depend on the training loop
    from chestssl.train.loop import Progress


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised mean squared error ``2 - 2 cos(p, z')``, averaged over the batch (Grill et al. 2020, eq. 2).

    Args:
        prediction: (B, P) online predictions of one view.
        target: (B, P) target projections of the other view (treated as constants).
    """
    prediction = F.normalize(prediction.float(), dim=-1)
    target = F.normalize(target.detach().float(), dim=-1)
    return (2.0 - 2.0 * (prediction * target).sum(dim=-1)).mean()


def target_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA rate of the target after step ``step`` of ``total_steps``: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``
    (Grill et al. 2020, section 3.2): ``base`` at the start, 1 at the end."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@dataclass(frozen=True)
class BYOLConfig:
    """BYOL settings (``byol.*``): head sizes, the target's EMA rate and the two views.

    The paper's heads are 4096 hidden / 256 out for a 2048-wide ResNet-50 (hidden twice the features); here
    1024 hidden, twice a ResNet-18's 512 features. ``momentum_base`` 0.99 rather than the paper's 0.996: the
    paper tunes it for ~300k steps at batch 4096, while 100 epochs of ~5k images at batch 256 are ~2k steps;
    an EMA horizon of 1 / (1 - tau) = 100 steps (0.99) keeps the target within ~5% of the run behind the
    online network, 250 steps (0.996) would hold it back for an eighth of the run.

    ``view_preset`` "medical" makes ``views.*`` contrastive (the grayscale stand-ins for SimCLR's colour
    distortion, as SimCLR here) with the paper's asymmetric blur: always on the first view, on a tenth of the
    second (its appendix B; its solarisation of the second view has no counterpart here); "base" takes ``views.*``
    as set for both views.
    """

    projection_hidden_size: int = 1024  # hidden width of the projector and the predictor
    projection_size: int = 256  # output width of the projector and the predictor (the paper's 256)
    momentum_base: float = 0.99  # EMA rate of the target at the first step, raised to 1 by a cosine (paper 0.996)
    view_preset: str = "medical"  # medical: views.* made contrastive, blur always / 1 in 10; base: views.* as set

    def __post_init__(self) -> None:
        for name in ("projection_hidden_size", "projection_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"byol.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.momentum_base <= 1.0:
            raise ValueError(f"byol.momentum_base must be in [0, 1], got {self.momentum_base}")
        if self.view_preset not in VIEW_PRESETS:
            raise ValueError(f"byol.view_preset must be one of {VIEW_PRESETS}, got {self.view_preset!r}")


class BYOL(nn.Module):
    """BYOL around ``encoder`` (pooled (B, F) features); ``forward(batch)`` returns the symmetrised loss of the
    first two views, ``after_step(progress)`` moves the target."""

    encoders = ("resnet", "vit")
    Config = BYOLConfig
    num_views = 2

    @classmethod
    def view_configs(cls, settings: BYOLConfig, base: ViewConfig, image_size: int) -> tuple[ViewConfig, ViewConfig]:
        """The two views: ``base`` made contrastive with the paper's asymmetric blur, or ``base`` twice."""
        if settings.view_preset == "base":
            return base, base
        view = contrastive_view(base)
        return replace(view, blur_probability=1.0), replace(view, blur_probability=0.1)

    def __init__(self, encoder: nn.Module, config: BYOLConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"BYOL works with encoder(s) {list(self.encoders)}, got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or BYOLConfig()
        self.config = config
        self.encoder = encoder
        self.projector = projection_mlp(encoder.feature_size, config.projection_hidden_size, config.projection_size)
        self.predictor = projection_mlp(config.projection_size, config.projection_hidden_size, config.projection_size)
        # the target starts as a copy of the online encoder and projector and is only ever moved by ema_update
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)

    def forward_online(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, P) predictions of the target's projection."""
        return self.predictor(self.projector(self.encoder(x)))

    @torch.no_grad()
    def forward_target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, P) target projections, without gradient."""
        return self.target["projector"](self.target["encoder"](x))

    def forward(self, batch: Batch) -> torch.Tensor:
        """``l(p1, z2') + l(p2, z1')`` on the views ``batch.views[0]`` and ``[1]`` (each (B, C, *S))."""
        if len(batch.views) < 2:
            raise ValueError(f"BYOL needs two augmented views per sample (batch.views), got {len(batch.views)}")
        first, second = batch.views[0], batch.views[1]
        prediction_first, prediction_second = self.forward_online(first), self.forward_online(second)
        target_first, target_second = self.forward_target(first), self.forward_target(second)
        return byol_loss(prediction_first, target_second) + byol_loss(prediction_second, target_first)

    def after_step(self, progress: Progress) -> None:
        """Move the target toward the online network with the rate of step ``progress.step``."""
        momentum = target_momentum(progress.step, progress.total_steps, self.config.momentum_base)
        ema_update(self.target["encoder"], self.encoder, momentum)
        ema_update(self.target["projector"], self.projector, momentum)
