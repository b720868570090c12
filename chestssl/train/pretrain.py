"""``chestssl pretrain``: self-supervised pretraining of an encoder on unlabelled chest X-rays (2D) or prepared
chest CT volumes (3D), with any method of :data:`chestssl.methods.METHODS` (``method=mae``; MAE's lung-weighted
loss of Dack et al. 2025 with ``mae.lung_weight``).

The run hands on ``encoder.safetensors`` + ``encoder.json``: the encoder's weights, its complete architecture
record and the preprocessing of its inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chestssl.config import save_config, to_dict
from chestssl.data.batch import Batches, Normalisation, epoch_generator, xray_preprocessing
from chestssl.data.datasets import cache_preprocessing, ensure_splits
from chestssl.data.views import ViewConfig
from chestssl.data.xray.unlabelled import SOURCES as UNLABELLED_SOURCES
from chestssl.errors import ConfigError
from chestssl.methods import METHODS, build_method, method_class
from chestssl.methods.byol import BYOLConfig
from chestssl.methods.groupmask import GroupMaskConfig
from chestssl.methods.mae import MAEConfig
from chestssl.methods.moco import MoCoV2Config
from chestssl.methods.simclr import SimCLRConfig
from chestssl.methods.spark import SparKConfig
from chestssl.methods.swav import SwAVConfig
from chestssl.models.encoders import ENCODERS, architecture, build_encoder
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig
from chestssl.report.reconstruction import save_reconstruction_grid
from chestssl.train import distributed
from chestssl.train.checkpoint import check_resumable, save_encoder
from chestssl.train.loop import CHECKPOINT_NAME, Schedule, fit, resume_identity
from chestssl.train.optim import param_groups

log = logging.getLogger(__name__)

ENCODER_NAME = "encoder.safetensors"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on; saved as ``config.yaml`` in its run directory.

    ``method`` picks the method and its section (``mae.*``); ``encoder`` the encoder kind and its section
    (``vit.*``, ``resnet.*``). The input's shape comes from the data: ``image_size`` for X-rays, the cache's
    cube size for CT.
    """

    run_dir: str = "runs/pretrain"  # where the run writes config.yaml, checkpoints, grids and the encoder
    data_dir: str | None = None  # data folder (else $CHESTSSL_DATA, else the user cache directory)
    spatial_dims: int = 2  # 2 for X-ray sources, 3 for prepared CT volumes
    sources: tuple[str, ...] = ("pneumoniamnist",)  # unlabelled X-ray sources pooled for 2D pretraining
    cache_dirs: tuple[str, ...] = ()  # CT volume caches (prepare-ct / prepare-lidc) for 3D pretraining
    exclude_splits: tuple[str, ...] = ("test",)  # splits never pretrained on (the test split by default)
    split_seed: int = 0  # seed of the patient-level split recorded with a cache that has none
    image_size: int = 28  # side of the X-ray images in pixels (3D: the cache's cube size is used)
    method: str = "mae"  # pretraining method (a key of chestssl.methods.METHODS); its section holds its settings
    encoder: str = "vit"  # encoder kind (a key of chestssl.models.encoders.ENCODERS); its section holds its sizes
    vit: ViTConfig = field(default_factory=ViTConfig)  # ViT sizes
    resnet: ResNetConfig = field(default_factory=ResNetConfig)  # ResNet sizes
    mae: MAEConfig = field(default_factory=MAEConfig)  # MAE settings
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)  # SimCLR settings
    mocov2: MoCoV2Config = field(default_factory=MoCoV2Config)  # MoCo v2 settings
    spark: SparKConfig = field(default_factory=SparKConfig)  # SparK settings
    byol: BYOLConfig = field(default_factory=BYOLConfig)  # BYOL settings
    swav: SwAVConfig = field(default_factory=SwAVConfig)  # SwAV settings
    groupmask: GroupMaskConfig = field(default_factory=GroupMaskConfig)  # group-masking settings
    epochs: int = 100  # passes over the unlabelled data
    batch_size: int = 256  # global batch, split across processes
    base_lr: float = 1.5e-4  # learning rate at batch 256 (the run uses base_lr x batch_size / 256)
    weight_decay: float = 0.05  # AdamW weight decay of matrices and kernels
    warmup_epochs: float = 5.0  # linear warm-up before the cosine decay
    views: ViewConfig = field(default_factory=ViewConfig)  # augmentation of each view
    normalisation_mean: float = 0.5  # pixels in [0, 1] minus this...
    normalisation_std: float = 0.25  # ...divided by this (recorded with the encoder)
    seed: int = 0  # seed of initialisation, order, augmentation and masks
    num_workers: int = 0  # loader processes reading cached volumes (0: in this process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    checkpoint_every: int = 5  # epochs between checkpoints (at most one a minute; the last epoch always; 0: only the last)
    grid_every: int = 10  # epochs between reconstruction grids (0: only the last)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (X-ray sources) or 3 (CT cache_dirs), got {self.spatial_dims}")
        if self.spatial_dims == 3 and not self.cache_dirs:
            raise ValueError("3D pretraining reads prepared CT volumes: set cache_dirs (folders written by prepare-ct)")
        unknown = [source for source in self.sources if source not in UNLABELLED_SOURCES]
        if self.spatial_dims == 2 and (unknown or not self.sources):
            raise ValueError(f"unknown or no unlabelled source(s) {unknown} in sources; valid: {', '.join(UNLABELLED_SOURCES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; valid: {', '.join(ENCODERS)}")
        if self.encoder not in method_class(self.method).encoders:
            raise ValueError(f"method {self.method} works with encoder(s) {list(method_class(self.method).encoders)}, "
                             f"not {self.encoder!r}")
        if self.mae.lung_weight is not None and self.spatial_dims != 3:
            raise ValueError("the lung-weighted loss needs lung masks: it is for 3D CT (spatial_dims=3)")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {self.base_lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.num_workers < 0 or self.checkpoint_every < 0:
            raise ValueError("weight_decay, warmup_epochs, num_workers and checkpoint_every must be >= 0")
        if not self.normalisation_std > 0:
            raise ValueError(f"normalisation_std must be positive, got {self.normalisation_std}")

    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalisation_mean, self.normalisation_std)

    def unused_sections(self) -> tuple[str, ...]:
        """The sections this run never reads: the other methods' settings and the other encoder kinds' sizes (left
        out of the resume identity, so a changed default of another method does not stop a finished run's reuse)."""
        return tuple(name for name in (*METHODS, *ENCODERS) if name not in (self.method, self.encoder))

    def method_settings(self) -> Any:
        """The chosen method's own section."""
        return getattr(self, self.method)

    def encoder_record(self, image_size: int) -> dict[str, Any]:
        """The architecture record of the encoder this run trains, for inputs of side ``image_size``."""
        return architecture(self.encoder, getattr(self, self.encoder), self.spatial_dims, image_size)


def method_views(cls: type, settings: Any, base: ViewConfig, image_size: int) -> tuple[ViewConfig, ...]:
    """The augmented views a method asks for, for inputs of side ``image_size``: its ``view_configs(settings,
    base, image_size)`` (multi-crop, asymmetric views), else ``num_views`` copies of ``base``."""
    if hasattr(cls, "view_configs"):
        return tuple(cls.view_configs(settings, base, image_size))
    return (base,) * getattr(cls, "num_views", 1)


def build_pretraining(config: PretrainConfig, image_size: int) -> torch.nn.Module:
    """The method of ``config`` around a fresh encoder for inputs of side ``image_size``."""
    try:
        encoder = build_encoder(config.encoder_record(image_size))
        return build_method(config.method, encoder, config.method_settings())
    except ValueError as error:  # sizes that do not fit together (a patch that does not divide the image...)
        raise ConfigError(f"{config.encoder} encoder / {config.method} settings: {error}") from error


def unlabelled_volumes(config: PretrainConfig) -> tuple[list, dict]:
    """Files of the prepared volumes in ``cache_dirs`` (splits in ``exclude_splits`` left out, the patient-level
    split recorded with each cache) and their common preprocessing record; caches prepared differently cannot
    be mixed."""
    files, record = [], None
    for cache in config.cache_dirs:
        cache_record = cache_preprocessing(cache)
        if record is not None and cache_record != record:
            raise ConfigError(f"{cache} was prepared differently from {config.cache_dirs[0]}: {cache_record} vs {record}")
        record = cache_record
        files += [Path(cache) / row["file"] for row in ensure_splits(cache, config.split_seed)
                  if row["status"] == "ok" and row.get("split", "") not in config.exclude_splits]
    if not files:
        raise ConfigError(f"no prepared volume outside the splits {list(config.exclude_splits)} in {config.cache_dirs}")
    return files, {**record, "normalisation": {"mean": config.normalisation_mean, "std": config.normalisation_std}}


def pretrain(config: PretrainConfig) -> Path:
    """Run (or resume) pretraining; returns the path of the exported encoder."""
    from chestssl.data.xray.unlabelled import load_unlabelled

    context = distributed.setup(config.device)
    run_dir = Path(config.run_dir)
    identity = resume_identity(config, config.unused_sections())
    check_resumable(run_dir / CHECKPOINT_NAME, identity)  # before anything is written
    if config.spatial_dims == 2:
        build_pretraining(config, config.image_size)  # sizes checked before any data is loaded
    normalisation = config.normalisation()
    if config.spatial_dims == 2:
        data = load_unlabelled(list(config.sources), data_dir=config.data_dir, image_size=config.image_size,
                               exclude_splits=config.exclude_splits)
        inputs, image_size = data.images, config.image_size
        preprocessing = xray_preprocessing(config.image_size, normalisation)
    else:
        if context.is_main:  # one process records missing splits (under the cache lock); the others then read them
            for cache in config.cache_dirs:
                ensure_splits(cache, config.split_seed)
        distributed.barrier(context)
        inputs, preprocessing = unlabelled_volumes(config)
        image_size = int(preprocessing["size"])
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        log.info("pretraining %s on %d unlabelled %s (excluding splits %s) in %d process(es)", config.method,
                 len(inputs), "images" if config.spatial_dims == 2 else "volumes", config.exclude_splits,
                 context.world_size)
    views = method_views(method_class(config.method), config.method_settings(), config.views, image_size)
    if context.is_main and len({view.size for view in views}) > 1:  # multi-crop: say the sizes a null setting chose
        log.info("views of side %s", [view.size or image_size for view in views])
    batches = Batches(inputs, None, config.batch_size, normalisation, views, True, True, context.rank,
                      context.world_size, context.device, config.num_workers)
    torch.manual_seed(config.seed)
    method = build_pretraining(config, image_size).to(context.device)
    if hasattr(method, "check_dataset"):  # a queue the data must fill, prototypes a batch must share
        method.check_dataset(len(batches) * batches.batch_size, batches.batch_size)
    lr = config.base_lr * config.batch_size / 256
    log.info("effective learning rate %.3g (base_lr %.3g x batch %d / 256)", lr, config.base_lr, config.batch_size)
    optimizer = torch.optim.AdamW(param_groups(method, config.weight_decay), lr=lr, betas=(0.9, 0.95))
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    preview_size = 4 if config.spatial_dims == 3 else 6
    preview = next(iter(Batches(inputs, None, preview_size, normalisation, (), True, True,
                                device=context.device).epoch(config.seed, 0)))

    def on_epoch_end(epoch: int) -> dict:
        last = epoch + 1 == config.epochs
        due = last or (config.grid_every > 0 and (epoch + 1) % config.grid_every == 0)
        if context.is_main and due and hasattr(method, "preview"):
            method.eval()
            panels = method.preview(preview, epoch_generator(config.seed, 0, 99))
            method.train()
            save_reconstruction_grid(panels, run_dir / f"reconstruction_epoch{epoch + 1:03d}.png",
                                     f"{config.method} epoch {epoch + 1}")
        return {}

    fit(method, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir,
        config.seed, identity, checkpoint_every=config.checkpoint_every, on_epoch_end=on_epoch_end,
        description=f"pretrain {config.method}")
    encoder_path = run_dir / ENCODER_NAME
    if context.is_main:
        sources = list(config.sources) if config.spatial_dims == 2 else list(config.cache_dirs)
        save_encoder(encoder_path, method.encoder, preprocessing,
                     {"method": config.method, "method_config": to_dict(config.method_settings()),
                      "epochs": config.epochs, "inputs": len(inputs), "sources": sources})
        log.info("encoder written to %s", encoder_path)
    distributed.barrier(context)
    return encoder_path
