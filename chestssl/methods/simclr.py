"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"), 2D and 3D.

Legend: ``B`` this process's batch, ``N`` the global batch, ``C`` channels, ``S`` spatial, ``F`` encoder
features, ``E`` projection width.

Under ``torchrun`` the negatives come from the global batch: every process gathers the projections of all
processes with an all-gather that carries gradients back (each process's rows receive the gradients of every
process's loss), and takes its own samples as anchors. DDP's gradient average then gives exactly the gradient
of NT-Xent over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional
from torch import nn

from chestssl.data.batch import Batch
from chestssl.data.views import VIEW_PRESETS, ViewConfig, contrastive_view
from chestssl.methods.contrastive_losses import nt_xent
from chestssl.methods.projection import projection_mlp


def gather_with_gradient(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(B, ...) rows of every process concatenated in rank order, (B x processes, ...), and this process's rows.

    The backward sums, for each process's rows, the gradients of every process's use of them. Alone it returns
    ``tensor`` itself. Every process must pass the same shape.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor, slice(0, tensor.shape[0])
    parts = distributed_functional.all_gather(tensor.contiguous())
    start = dist.get_rank() * tensor.shape[0]
    return torch.cat(parts), slice(start, start + tensor.shape[0])


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR settings (``simclr.*``): the projection head, the NT-Xent temperature and the two views.

    The temperature is 0.5, the paper's setting for CIFAR-10 with batches of a few hundred, rather than its
    ImageNet 0.1 at batch 4096: with a few hundred negatives, many of them near-duplicate chest images of the
    same anatomy, a low temperature concentrates the gradient on the hardest negatives, which are the likeliest
    false ones.
    """

    projection_hidden_size: int = 512  # hidden width of the projection MLP
    projection_size: int = 128  # width of the space the loss compares in
    projection_layers: int = 2  # linear layers of the projection MLP
    temperature: float = 0.5  # NT-Xent temperature (0.5: the paper's small-batch CIFAR-10 setting; ImageNet 0.1)
    view_preset: str = "medical"  # medical: views.* made contrastive (crop, gamma, blur, noise); base: views.* as set

    def __post_init__(self) -> None:
        for name in ("projection_hidden_size", "projection_size", "projection_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"simclr.{name} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"simclr.temperature must be positive, got {self.temperature}")
        if self.view_preset not in VIEW_PRESETS:
            raise ValueError(f"simclr.view_preset must be one of {VIEW_PRESETS}, got {self.view_preset!r}")


def contrastive_views(preset: str, base: ViewConfig) -> tuple[ViewConfig, ViewConfig]:
    """The two (identically distributed) views of a contrastive method: ``base`` made contrastive, or as set."""
    view = contrastive_view(base) if preset == "medical" else base
    return view, view


class SimCLR(nn.Module):
    """Encoder -> projection MLP -> NT-Xent between two views of each sample; ``.encoder`` is what is handed on."""

    encoders = ("resnet", "vit")
    Config = SimCLRConfig
    num_views = 2

    @classmethod
    def view_configs(cls, settings: SimCLRConfig, base: ViewConfig, image_size: int) -> tuple[ViewConfig, ...]:
        return contrastive_views(settings.view_preset, base)

    def __init__(self, encoder: nn.Module, config: SimCLRConfig | None = None) -> None:
        super().__init__()
        if getattr(encoder, "kind", None) not in self.encoders:
            raise ValueError(f"SimCLR works with encoders {list(self.encoders)}, got "
                             f"{getattr(encoder, 'kind', type(encoder).__name__)!r}")
        config = config or SimCLRConfig()
        self.config = config
        self.encoder = encoder
        self.projection = projection_mlp(encoder.feature_size, config.projection_hidden_size, config.projection_size,
                                         config.projection_layers)

    def forward_projection(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, E)."""
        return self.projection(self.encoder(x))

    def forward(self, batch: Batch) -> torch.Tensor:
        """NT-Xent of ``batch.views[0]`` against ``batch.views[1]`` (each (B, C, *S)); negatives: the global batch."""
        if len(batch.views) < 2:
            raise ValueError("SimCLR needs two augmented views per sample: make the batches with its view_configs")
        first, second = batch.views[0], batch.views[1]
        count = first.shape[0]
        projected = self.forward_projection(torch.cat([first, second]))  # (2B, E): one pass, batch norm over both
        everyone1, mine = gather_with_gradient(projected[:count])  # (N, E)
        everyone2, _ = gather_with_gradient(projected[count:])
        return nt_xent(everyone1, everyone2, self.config.temperature, anchors=mine)
