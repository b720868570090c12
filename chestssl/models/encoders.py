"""The encoder registry and the architecture record that names an encoder completely.

An architecture record is a flat dict: ``kind`` (a key of :data:`ENCODERS`), the input's ``spatial_dims``,
``image_size`` and ``in_channels``, then every size of that kind's config. It is written into every encoder and
fine-tuned model file, and both a pretrained model and its from-scratch twin are built from it, so the
architecture is declared once and the comparison cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import typing
from math import prod
from typing import Any

from torch import nn

from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.models.vit import ViT, ViTConfig

ENCODERS: dict[str, type[nn.Module]] = {"vit": ViT, "resnet": ResNet}
INPUT_KEYS = ("spatial_dims", "image_size", "in_channels")
# A record claiming more than this many parameters is refused before anything is allocated.
MAX_PARAMETERS = 2_000_000_000


def encoder_class(kind: str) -> type[nn.Module]:
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[kind]


def architecture(kind: str, config: ViTConfig | ResNetConfig, spatial_dims: int, image_size: int,
                 in_channels: int = 1) -> dict[str, Any]:
    """The record of an encoder of ``kind`` with sizes ``config`` for inputs (B, in_channels, image_size^dims)."""
    cls = encoder_class(kind)
    if not isinstance(config, cls.Config):
        raise ValueError(f"a {kind} encoder takes a {cls.Config.__name__}, got {type(config).__name__}")
    sizes = {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}
    return {"kind": kind, "spatial_dims": spatial_dims, "image_size": image_size, "in_channels": in_channels, **sizes}


def _estimated_parameters(kind: str, config: Any, spatial_dims: int, in_channels: int) -> int:
    """An upper-bound-ish parameter count from the sizes alone, to refuse absurd records cheaply."""
    if kind == "vit":
        width = config.hidden_size
        per_block = 4 * width * width + 2 * width * int(width * config.mlp_ratio)
        return config.depth * per_block + width * in_channels * config.patch_size**spatial_dims
    widths = (config.widths[0],) + tuple(config.widths)
    return sum(9 * 6 * a * b * 3 ** (spatial_dims - 2) for a, b in zip(widths[:-1], widths[1:]))


def parse_architecture(record: dict[str, Any], source: str = "architecture") -> tuple[type[nn.Module], Any, dict]:
    """Validate a record: its kind, exactly the keys of that kind, and plausible sizes.

    Returns:
        The encoder class, its config and the input keyword arguments (spatial_dims, image_size, in_channels).

    Raises:
        ValueError: an unknown kind, a missing or unknown key, a bad size; the message names ``source``.
    """
    if not isinstance(record, dict) or "kind" not in record:
        raise ValueError(f"{source}: an architecture record needs a 'kind' among {list(ENCODERS)}")
    kind = record["kind"]
    if kind not in ENCODERS:
        raise ValueError(f"{source}: unknown encoder kind {kind!r}; valid: {', '.join(ENCODERS)}")
    cls = ENCODERS[kind]
    hints = typing.get_type_hints(cls.Config)
    names = [field.name for field in dataclasses.fields(cls.Config)]
    expected = {"kind", *INPUT_KEYS, *names}
    missing, unknown = sorted(expected - set(record)), sorted(set(record) - expected)
    if missing or unknown:
        raise ValueError(f"{source}: {kind} architecture record has missing key(s) {missing} and unknown key(s) "
                         f"{unknown}; it must name exactly {sorted(expected)}")
    inputs = {key: record[key] for key in INPUT_KEYS}
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in inputs.values()):
        raise ValueError(f"{source}: {INPUT_KEYS} must be integers, got {inputs}")
    if inputs["spatial_dims"] not in (2, 3) or inputs["image_size"] < 1 or inputs["in_channels"] < 1:
        raise ValueError(f"{source}: bad input sizes {inputs}")
    values = {}
    for name in names:
        value = record[name]
        if typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        values[name] = value
    config = cls.Config(**values)
    count = _estimated_parameters(kind, config, inputs["spatial_dims"], inputs["in_channels"])
    if count > MAX_PARAMETERS or prod([inputs["image_size"]] * inputs["spatial_dims"]) > 2**31:
        raise ValueError(f"{source}: the record describes an implausibly large encoder (~{count:.3g} parameters, "
                         f"input {inputs['image_size']}^{inputs['spatial_dims']}); refusing to build it")
    return cls, config, inputs


def build_encoder(record: dict[str, Any], source: str = "architecture", **options: Any) -> nn.Module:
    """An encoder with fresh weights from its record; ``options`` such as ``drop_path`` are not architecture."""
    cls, config, inputs = parse_architecture(record, source)
    return cls(config, **inputs, **options)


def record_of(encoder: nn.Module) -> dict[str, Any]:
    """The architecture record of a built encoder."""
    return architecture(encoder.kind, encoder.config, encoder.spatial_dims, encoder.image_size, encoder.in_channels)
