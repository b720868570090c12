"""``chestssl pretrain``: masked-autoencoder pretraining of a ViT on unlabelled chest X-rays (2D) or prepared
chest CT volumes (3D, optionally with the lung-weighted loss of Dack et al. 2025)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from chestssl.config import save_config
from chestssl.data.augment import AugmentConfig
from chestssl.data.batches import Normalisation, epoch_generator, xray_preprocessing
from chestssl.data.ct.cache import read_manifest
from chestssl.errors import ConfigError
from chestssl.methods.mae import MAE
from chestssl.models.patches import patchify, unpatchify
from chestssl.models.vit import ViT, ViTConfig
from chestssl.report.reconstruction import save_reconstruction_grid
from chestssl.train import distributed
from chestssl.train.checkpoint import save_encoder
from chestssl.train.inputs import cache_preprocessing, make_batches
from chestssl.train.loop import Schedule, fit, resume_identity
from chestssl.train.optim import param_groups

log = logging.getLogger(__name__)

ENCODER_NAME = "encoder.safetensors"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on; saved as ``config.yaml`` in its run directory."""

    run_dir: str = "runs/pretrain"
    data_dir: str | None = None
    spatial_dims: int = 2
    sources: tuple[str, ...] = ("pneumoniamnist",)
    cache_dirs: tuple[str, ...] = ()
    exclude_splits: tuple[str, ...] = ("test",)
    image_size: int = 28
    patch_size: int = 4
    hidden_size: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_hidden_size: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    loss: str = "mse"
    lung_weight: float | None = None
    lung_threshold: float = 0.25
    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    rotate_degrees: float = 10.0
    flip_probability: float = 0.0
    intensity: float = 0.1
    normalisation_mean: float = 0.5
    normalisation_std: float = 0.25
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    checkpoint_every: int = 5
    grid_every: int = 10

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (X-ray sources) or 3 (CT cache_dirs), got {self.spatial_dims}")
        if self.spatial_dims == 3 and not self.cache_dirs:
            raise ValueError("3D pretraining reads prepared CT volumes: set cache_dirs (folders written by prepare-ct)")
        if self.lung_weight is not None and self.spatial_dims != 3:
            raise ValueError("the lung-weighted loss needs lung masks: it is for 3D CT (spatial_dims=3)")

    def vit_config(self, image_size: int | None = None) -> ViTConfig:
        return ViTConfig(spatial_dims=self.spatial_dims, image_size=image_size or self.image_size,
                         patch_size=self.patch_size, in_channels=1, hidden_size=self.hidden_size, depth=self.depth,
                         num_heads=self.num_heads)

    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalisation_mean, self.normalisation_std)


def build_mae(config: PretrainConfig, image_size: int | None = None) -> MAE:
    return MAE(ViT(config.vit_config(image_size)), config.decoder_hidden_size, config.decoder_depth,
               config.decoder_num_heads, mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss,
               loss_kind=config.loss, lung_weight=config.lung_weight, lung_threshold=config.lung_threshold)


def unlabelled_volumes(config: PretrainConfig) -> tuple[list, dict]:
    """Files of the prepared volumes in ``cache_dirs`` (splits in ``exclude_splits`` left out) and their common
    preprocessing record; caches prepared differently cannot be mixed."""
    files, record = [], None
    for cache in config.cache_dirs:
        cache_record = cache_preprocessing(cache)
        if record is not None and cache_record != record:
            raise ConfigError(f"{cache} was prepared differently from {config.cache_dirs[0]}: {cache_record} vs {record}")
        record = cache_record
        files += [Path(cache) / row["file"] for row in read_manifest(cache)
                  if row["status"] == "ok" and row.get("split", "") not in config.exclude_splits]
    if not files:
        raise ConfigError(f"no prepared volume in {config.cache_dirs}")
    return files, {**record, "normalisation": {"mean": config.normalisation_mean, "std": config.normalisation_std}}


def reconstruction_figure(mae: MAE, images: torch.Tensor, seed: int, path: Path, title: str) -> None:
    """Original | masked | reconstruction for a fixed batch and a fixed mask."""
    mae.eval()
    mask = mae.make_mask(images.shape[0], images.device, epoch_generator(seed, 0, 99))
    patch = mae.encoder.config.patch_size
    patches = patchify(images, patch)
    hidden = torch.where(mask.unsqueeze(-1), torch.full_like(patches, float(images.min())), patches)
    masked = unpatchify(hidden, patch, images.shape[2:], images.shape[1])
    save_reconstruction_grid(images, masked, mae.reconstruct(images, mask), path, title)
    mae.train()


def pretrain(config: PretrainConfig) -> Path:
    """Run (or resume) MAE pretraining; returns the path of the exported encoder."""
    from chestssl.data.xray.unlabelled import load_unlabelled

    context = distributed.setup(config.device)
    run_dir = Path(config.run_dir)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    normalisation = config.normalisation()
    if config.spatial_dims == 2:
        data = load_unlabelled(list(config.sources), data_dir=config.data_dir, image_size=config.image_size,
                               exclude_splits=config.exclude_splits)
        inputs, image_size = data.images, config.image_size
        preprocessing = xray_preprocessing(config.image_size, normalisation)
        augment = AugmentConfig(crop_scale=config.crop_scale, rotate_degrees=config.rotate_degrees,
                                flip_probability=config.flip_probability, intensity=config.intensity)
    else:
        inputs, preprocessing = unlabelled_volumes(config)
        image_size = int(preprocessing["size"])
        augment = AugmentConfig(intensity=config.intensity)
    if context.is_main:
        log.info("pretraining on %d unlabelled %s (excluding splits %s) in %d process(es)", len(inputs),
                 "images" if config.spatial_dims == 2 else "volumes", config.exclude_splits, context.world_size)
    batches = make_batches(inputs, None, config.batch_size, normalisation, augment, True, True, context.rank,
                           context.world_size, context.device, config.num_workers)
    torch.manual_seed(config.seed)
    mae = build_mae(config, image_size).to(context.device)
    lr = config.base_lr * config.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(mae, config.weight_decay), lr=lr, betas=(0.9, 0.95))
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    preview_batches = make_batches(inputs, None, 4 if config.spatial_dims == 3 else 6, normalisation, None, True, True,
                                   device=context.device)
    preview = next(iter(preview_batches.epoch(config.seed, 0)))[0]

    def on_epoch_end(epoch: int) -> dict:
        last = epoch + 1 == config.epochs
        if context.is_main and (last or (config.grid_every > 0 and (epoch + 1) % config.grid_every == 0)):
            path = run_dir / f"reconstruction_epoch{epoch + 1:03d}.png"
            reconstruction_figure(mae, preview, config.seed, path, f"MAE epoch {epoch + 1}")
        return {}

    identity = resume_identity(config, method="mae", architecture=config.vit_config(image_size).to_dict())
    fit(mae, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir,
        config.seed, identity, checkpoint_every=config.checkpoint_every, on_epoch_end=on_epoch_end, description="pretrain")
    encoder_path = run_dir / ENCODER_NAME
    if context.is_main:
        method = "mae" if config.lung_weight is None else "mae-lung-weighted"
        sources = list(config.sources) if config.spatial_dims == 2 else list(config.cache_dirs)
        save_encoder(encoder_path, mae.encoder, {"name": "vit", **config.vit_config(image_size).to_dict()}, preprocessing,
                     {"method": method, "epochs": config.epochs, "inputs": len(inputs), "sources": sources})
        log.info("encoder written to %s", encoder_path)
    distributed.barrier(context)
    return encoder_path

