"""The pretraining methods. A method is a small ``nn.Module`` composition holding an ``encoder``:

- ``forward(batch)`` returns the loss, or ``(loss, {name: scalar})`` with extra values to log;
- ``after_step(progress)`` (optional) runs after every optimiser step: EMA targets, queues, own schedules;
- ``preview(batch, generator)`` (optional) returns named images for the reconstruction grid;
- class attributes: ``Config`` (its settings section, ``<name>.*``), ``encoders`` (the encoder kinds it
  works with) and ``num_views`` (augmented views per sample it needs).

The training loop knows none of this beyond ``forward`` and ``after_step``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from chestssl.methods.byol import BYOL
from chestssl.methods.groupmask import GroupMask
from chestssl.methods.mae import MAE
from chestssl.methods.moco import MoCoV2
from chestssl.methods.simclr import SimCLR
from chestssl.methods.spark import SparK
from chestssl.methods.swav import SwAV

METHODS: dict[str, type[nn.Module]] = {
    "mae": MAE,
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "spark": SparK,
    "byol": BYOL,
    "swav": SwAV,
    "groupmask": GroupMask,
}


def method_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(name: str, encoder: nn.Module, config: Any = None) -> nn.Module:
    """Method ``name`` around ``encoder`` with its settings ``config`` (its ``Config`` defaults if None)."""
    cls = method_class(name)
    if encoder.kind not in cls.encoders:
        raise ValueError(f"method {name!r} works with encoder(s) {list(cls.encoders)}, not {encoder.kind!r}")
    return cls(encoder, config if config is not None else cls.Config())
