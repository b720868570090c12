"""``chestssl pretrain``: masked-autoencoder pretraining of a ViT on unlabelled chest X-rays."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from chestssl.config import save_config, to_dict
from chestssl.data.augment import AugmentConfig
from chestssl.data.batches import Batches, Normalisation, epoch_generator, xray_preprocessing
from chestssl.methods.mae import MAE
from chestssl.models.patches import patchify, unpatchify
from chestssl.models.vit import ViT, ViTConfig
from chestssl.report.reconstruction import save_reconstruction_grid
from chestssl.train import distributed
from chestssl.train.checkpoint import save_encoder
from chestssl.train.loop import Schedule, fit
from chestssl.train.optim import param_groups

log = logging.getLogger(__name__)

ENCODER_NAME = "encoder.safetensors"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on; saved as ``config.yaml`` in its run directory."""

    run_dir: str = "runs/pretrain"
    data_dir: str | None = None
    sources: tuple[str, ...] = ("pneumoniamnist",)
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
    device: str = "auto"
    checkpoint_every: int = 5
    grid_every: int = 10

    def vit_config(self) -> ViTConfig:
        return ViTConfig(spatial_dims=2, image_size=self.image_size, patch_size=self.patch_size, in_channels=1,
                         hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads)

    def preprocessing(self) -> dict:
        """How the encoder's inputs are made; fine-tuning data must match it."""
        return xray_preprocessing(self.image_size, Normalisation(self.normalisation_mean, self.normalisation_std))


def build_mae(config: PretrainConfig) -> MAE:
    return MAE(ViT(config.vit_config()), config.decoder_hidden_size, config.decoder_depth, config.decoder_num_heads,
               mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss)


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
    from chestssl.data.unlabelled import load_unlabelled

    context = distributed.setup(config.device)
    run_dir = Path(config.run_dir)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    data = load_unlabelled(list(config.sources), data_dir=config.data_dir, image_size=config.image_size,
                           exclude_splits=config.exclude_splits)
    log.info("pretraining on %d unlabelled images from %s (excluding splits %s)", len(data), config.sources, config.exclude_splits)
    normalisation = Normalisation(config.normalisation_mean, config.normalisation_std)
    augment = AugmentConfig(crop_scale=config.crop_scale, rotate_degrees=config.rotate_degrees,
                            flip_probability=config.flip_probability, intensity=config.intensity)
    batches = Batches(data.images, None, config.batch_size, normalisation, augment, shuffle=True, drop_last=True,
                      rank=context.rank, world_size=context.world_size, device=context.device)
    torch.manual_seed(config.seed)
    mae = build_mae(config).to(context.device)
    lr = config.base_lr * config.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(mae, config.weight_decay), lr=lr, betas=(0.9, 0.95))
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    preview_ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:6]
    preview = normalisation.apply(torch.from_numpy(data.images[preview_ids.numpy()])).to(context.device)

    def on_epoch_end(epoch: int) -> dict:
        last = epoch + 1 == config.epochs
        if context.is_main and (last or (config.grid_every > 0 and (epoch + 1) % config.grid_every == 0)):
            path = run_dir / f"reconstruction_epoch{epoch + 1:03d}.png"
            reconstruction_figure(mae, preview, config.seed, path, f"MAE epoch {epoch + 1}")
        return {}

    identity = {"method": "mae", "architecture": config.vit_config().to_dict(), "config": to_dict(config)}
    identity["config"].pop("run_dir")
    identity["config"].pop("device")
    fit(mae, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir,
        config.seed, identity, config.checkpoint_every, on_epoch_end, description="pretrain")
    encoder_path = run_dir / ENCODER_NAME
    if context.is_main:
        save_encoder(encoder_path, mae.encoder, {"name": "vit", **config.vit_config().to_dict()}, config.preprocessing(),
                     {"method": "mae", "epochs": config.epochs, "images": len(data), "sources": list(config.sources)})
        log.info("encoder written to %s", encoder_path)
    distributed.barrier(context)
    return encoder_path

