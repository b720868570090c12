"""``chestssl finetune``: fine-tune or linear-probe an encoder on a stratified fraction of the labels.

Model selection follows the label fraction: with ``selection: fraction`` the epoch is chosen on a validation
subset drawn with the same fraction (a 1% run sees 1% of the validation labels too); ``fixed`` trains a fixed
schedule and keeps the last epoch; ``full`` selects on the whole validation split and is reported as such.

The encoder comes from a pretrained encoder file (``pretrained``), or is built with fresh weights from the
architecture recorded in one (``architecture_of``: the pretrained model's from-scratch twin), or from the
``encoder`` kind and its section (``vit.*``, ``resnet.*``). The run writes ``model.safetensors`` +
``model.json``: everything needed to rebuild and apply the model (see :func:`chestssl.train.tasks.load_model`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chestssl.config import save_config
from chestssl.data.batch import Batches, Normalisation, xray_preprocessing
from chestssl.data.datasets import CT_CACHE, DATASETS, Labelled, Split, load_labelled
from chestssl.data.splits import label_count, label_fraction
from chestssl.data.views import ViewConfig
from chestssl.errors import CheckpointError, ConfigError
from chestssl.models.encoders import ENCODERS, architecture, build_encoder, record_of
from chestssl.models.heads import class_weights
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig
from chestssl.report.segmentation import overlay_grid
from chestssl.train import distributed
from chestssl.train.checkpoint import atomic_save, check_preprocessing, load_encoder, load_weights, read, read_encoder, save_model
from chestssl.train.loop import Schedule, fit, resume_identity
from chestssl.train.optim import param_groups
from chestssl.train.reuse import RESULTS_NAME, check_reusable, environment
from chestssl.train.tasks import TASKS, task_class

log = logging.getLogger(__name__)

MODES = ("full", "linear")
SELECTIONS = ("fraction", "fixed", "full")
MODEL_NAME = "model.safetensors"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved as ``config.yaml`` in its run directory."""

    run_dir: str = "runs/finetune"  # where the run writes config.yaml, checkpoints, the model and results.json
    data_dir: str | None = None  # data folder (else $CHESTSSL_DATA, else the user cache directory)
    dataset: str = "pneumoniamnist"  # a named dataset (pneumoniamnist, kermany, nih-cxr14, folder, dicom) or ct-cache
    cache_dir: str | None = None  # the volume cache of dataset ct-cache
    dataset_root: str | None = None  # the image folder of the folder and dicom datasets
    labels_csv: str | None = None  # their labels CSV (default ROOT/labels.csv)
    image_size: int = 28  # side of the X-ray images in pixels (CT: the cache's cube size)
    task: str = "classification"  # what the model predicts: classification, or segmentation (label-map datasets)
    encoder: str = "vit"  # encoder kind built here when no file gives it (vit, resnet)
    vit: ViTConfig = field(default_factory=ViTConfig)  # ViT sizes (when built here)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)  # ResNet sizes (when built here)
    pretrained: str | None = None  # encoder file to fine-tune (its weights and architecture)
    architecture_of: str | None = None  # encoder file whose architecture is built with fresh weights (its from-scratch twin)
    mode: str = "full"  # full fine-tuning, or linear (a probe on frozen features)
    freeze_epochs: int = 0  # full mode: the encoder frozen (eval mode, not updated) for this many epochs first
    unfreeze_lr_scale: float = 0.1  # the encoder's learning rate after unfreezing, relative to the schedule's
    label_fraction: float = 1.0  # share of the training labels used, stratified and patient-level
    label_count: int = 0  # instead of a fraction: about this many labelled training images, whole patients (0: off)
    selection: str = "fraction"  # epoch chosen on a validation subset of the same fraction, the full split, or fixed (last)
    split_seed: int = 0  # seed of generated train/val/test splits
    seed: int = 0  # seed of the label subset, initialisation, order and augmentation
    epochs: int = 30  # passes over the labelled subset
    min_steps: int = 0  # at least this many optimiser steps (more epochs for tiny subsets)
    batch_size: int = 128  # global batch, split across processes
    lr: float = 1e-3  # learning rate at batch 256 (the run uses lr x batch_size / 256)
    layer_decay: float = 0.75  # layer-wise learning-rate decay (1.0: off)
    weight_decay: float = 0.05  # AdamW weight decay of matrices and kernels
    warmup_epochs: float = 2.0  # linear warm-up before the cosine decay
    drop_path: float = 0.1  # stochastic depth of the ViT's last block
    class_weighting: str = "balanced"  # balanced (inverse class frequency) or none
    views: ViewConfig = field(default_factory=lambda: ViewConfig(crop_scale=(0.7, 1.0)))  # training augmentation
    normalisation_mean: float = 0.5  # pixels in [0, 1] minus this...
    normalisation_std: float = 0.25  # ...divided by this (must match a pretrained encoder's)
    num_workers: int = 0  # loader processes reading cached volumes (0: in this process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    checkpoint_every: int = 5  # epochs between checkpoints (at most one a minute; the last epoch always; 0: only the last)
    overwrite: bool = False  # run again when the run directory holds a finished run with other settings
    trace_test: bool = False  # diagnostic: log test metrics every epoch (never used for selection)

    def __post_init__(self) -> None:
        for name, value, valid in (("mode", self.mode, MODES), ("selection", self.selection, SELECTIONS),
                                   ("class_weighting", self.class_weighting, ("balanced", "none")),
                                   ("task", self.task, tuple(TASKS)), ("encoder", self.encoder, tuple(ENCODERS))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
        if self.dataset not in (*DATASETS, CT_CACHE):
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join([*DATASETS, CT_CACHE])}")
        if self.dataset == CT_CACHE and not self.cache_dir:
            raise ValueError("dataset ct-cache needs cache_dir: a folder written by prepare-ct or prepare-lidc")
        if self.pretrained and self.architecture_of:
            raise ValueError("set pretrained (weights and architecture of an encoder file) or architecture_of "
                             "(its architecture with fresh weights), not both")
        if self.mode == "linear" and not self.pretrained:
            raise ValueError("a linear probe needs a pretrained encoder: set pretrained=FILE")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.label_count < 0 or (self.label_count and self.label_fraction != 1.0):
            raise ValueError(f"label_count ({self.label_count}) must be >= 0 and is used instead of label_fraction "
                             f"({self.label_fraction}): set one of them")
        if self.task == "segmentation" and self.mode == "linear":
            raise ValueError("segmentation has no linear probe on pooled features: use mode=full (freeze_epochs "
                             "keeps the encoder frozen for a while)")
        if self.freeze_epochs and self.mode != "full":
            raise ValueError("freeze_epochs (freeze-then-unfreeze) applies to mode=full; a linear probe is always frozen")
        if not 0.0 < self.unfreeze_lr_scale <= 1.0:
            raise ValueError(f"unfreeze_lr_scale must be in (0, 1], got {self.unfreeze_lr_scale}")
        for name in ("min_steps", "num_workers", "checkpoint_every", "freeze_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"weight_decay and warmup_epochs must be >= 0 and drop_path in [0, 1), got "
                             f"{self.weight_decay}, {self.warmup_epochs}, {self.drop_path}")
        if not self.normalisation_std > 0:
            raise ValueError(f"normalisation_std must be positive, got {self.normalisation_std}")

    def unused_sections(self) -> tuple[str, ...]:
        """The encoder sizes this run never reads (left out of its identity, so a changed ViT default does not stop
        a finished ResNet run's reuse): every kind's when an encoder file gives the architecture, else the others'."""
        read = () if self.pretrained or self.architecture_of else (self.encoder,)
        return tuple(name for name in ENCODERS if name not in read)

    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalisation_mean, self.normalisation_std)


def load_data(config: FinetuneConfig) -> Labelled:
    """Train/val/test for the run: a named 2D dataset, or a CT volume cache (``dataset: ct-cache``)."""
    return load_labelled(config.dataset, config.data_dir, config.image_size, config.split_seed,
                         xray_preprocessing(config.image_size, config.normalisation()), cache_dir=config.cache_dir,
                         root=config.dataset_root, labels_csv=config.labels_csv, task=config.task)


def _check_inputs(record: dict[str, Any], data: Labelled, source: str) -> None:
    expected = {"spatial_dims": data.spatial_dims, "image_size": data.image_size, "in_channels": 1}
    differences = [f"{key}: encoder {record[key]} vs data {value}" for key, value in expected.items() if record[key] != value]
    if differences:
        raise CheckpointError(f"{source} was made for other inputs than this data ({'; '.join(differences)})")


def build_run_encoder(config: FinetuneConfig, data: Labelled) -> tuple[torch.nn.Module, str]:
    """The encoder to fine-tune and where its weights came from ("scratch" or "<method>:<file>")."""
    options = {"drop_path": config.drop_path} if config.mode == "full" else {}
    if config.pretrained:
        _, meta = read_encoder(config.pretrained)
        check_preprocessing(config.pretrained, meta["preprocessing"], data.preprocessing)
        _check_inputs(meta["architecture"], data, config.pretrained)
        encoder, _ = load_encoder(config.pretrained, **options)
        return encoder, f"{meta.get('method', 'pretrained')}:{config.pretrained}"
    if config.architecture_of:
        _, meta = read_encoder(config.architecture_of)
        _check_inputs(meta["architecture"], data, config.architecture_of)
        return build_encoder(meta["architecture"], config.architecture_of, **options), "scratch"
    settings = config.vit if config.encoder == "vit" else config.resnet
    try:
        record = architecture(config.encoder, settings, data.spatial_dims, data.image_size)
        return build_encoder(record, **options), "scratch"
    except ValueError as error:  # sizes that do not fit the data (a patch that does not divide the image...)
        raise ConfigError(f"{config.encoder} encoder settings: {error}") from error


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, split: Split, normalisation: Normalisation, device: torch.device,
                     num_workers: int = 0) -> np.ndarray:
    """Pooled encoder features (N, F) of a split, in order, without augmentation."""
    encoder.eval()
    batches = Batches(split.inputs, None, 256, normalisation, (), False, False, device=device, num_workers=num_workers)
    return torch.cat([encoder(batch.images).float().cpu() for batch in batches.epoch(0, 0)]).numpy()


def _labelled_subset(split: Split, data: Labelled, fraction: float, count: int, seed: int, where: str) -> np.ndarray:
    """Indices of the labelled subset: ``count`` images (whole patients), or a ``fraction``, stratified by class
    (label maps have no class to stratify by: a fraction of them is a count)."""
    if data.label_kind == "segmentation" and not count and fraction < 1.0:
        count = max(1, int(np.floor(fraction * len(split) + 0.5)))
    if count:
        return label_count(_patients(split), count, seed, where)
    return label_fraction(split.labels, fraction, seed, split.patient_ids, data.class_names, where)


def _patients(split: Split) -> np.ndarray:
    return split.patient_ids if split.patient_ids is not None else np.arange(len(split)).astype(str)


def _choose(config: FinetuneConfig, data: Labelled) -> tuple[Split, Split | None, str]:
    """The labelled training subset and the validation set used for model selection (None for ``fixed``)."""
    train, val = data.train, data.val
    count = min(config.label_count, len(train)) if config.label_count else 0
    if config.label_count > len(train):
        log.info("label_count %d: the training split has %d images; using all of them", config.label_count, len(train))
    chosen = train.subset(_labelled_subset(train, data, config.label_fraction, count, config.seed, "training split"))
    if config.selection == "fixed":
        return chosen, None, "fixed schedule, last epoch (no validation labels)"
    everything = config.label_fraction == 1.0 and (not count or count == len(train))
    if config.selection == "full" or everything:
        note = "full validation split" + ("" if everything else " (more labels than the budget claims)")
        return chosen, val, note
    share = max(1, round(len(chosen) * len(val) / len(train))) if count else 0
    indices = _labelled_subset(val, data, config.label_fraction, share, config.seed, "validation split")
    kind = "share of images" if count else "fraction"
    return chosen, val.subset(indices), f"validation subset of the same {kind} ({len(indices)} of {len(val)})"


def check_label_subsets(configs: list[FinetuneConfig]) -> None:
    """Draw the labelled and validation subsets of every run before any of them trains (the data loaded once per
    dataset, size and split), so that a label budget the data cannot give (a class left without a patient, a
    validation subset without a class) stops a benchmark at once, not after hours of pretraining.

    Raises:
        DataError: the first budget that cannot be drawn, naming it.
    """
    loaded: dict[tuple, Labelled] = {}
    for config in configs:
        key = (config.dataset, config.data_dir, config.image_size, config.split_seed, config.cache_dir,
               config.dataset_root, config.labels_csv, config.task, repr(config.normalisation()))
        if key not in loaded:
            loaded[key] = load_data(config)
        _choose(config, loaded[key])


def freeze_then_unfreeze(model: torch.nn.Module, optimizer: torch.optim.Optimizer, freeze_epochs: int,
                         unfreeze_lr_scale: float) -> Callable[[int], None] | None:
    """Wolf et al.'s protocol as an epoch-start hook: for the first ``freeze_epochs`` epochs the encoder is in
    eval mode (batch-norm statistics fixed) and its parameter groups (``part`` "encoder") get learning rate 0
    (AdamW leaves a parameter exactly unchanged at rate 0, decay included), so only the head learns; afterwards
    the encoder trains at ``unfreeze_lr_scale`` times its rate. The parameters keep ``requires_grad``, so DDP
    sees the same graph throughout; the hook depends on the epoch alone, so a resumed run is exact. None when
    ``freeze_epochs`` is 0."""
    if not freeze_epochs:
        return None
    # indices and rates now: loading a checkpoint replaces the optimizer's group dicts (and their lr_scale)
    base = {i: g.get("lr_scale", 1.0) for i, g in enumerate(optimizer.param_groups) if g.get("part") == "encoder"}

    def on_epoch_start(epoch: int) -> None:
        frozen = epoch < freeze_epochs
        if frozen:
            model.encoder.eval()
        for index, scale in base.items():
            optimizer.param_groups[index]["lr_scale"] = 0.0 if frozen else scale * unfreeze_lr_scale

    return on_epoch_start


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) one fine-tuning run; returns its results dict.

    A finished run is reused only when its config is the same (apart from where and how often it writes);
    otherwise it stops naming the changed settings, or, with ``overwrite=true``, runs again.
    """
    run_dir = Path(config.run_dir)
    results_path = run_dir / RESULTS_NAME
    identity = resume_identity(config, config.unused_sections())
    finished = check_reusable(run_dir, identity, config.overwrite)
    if finished is not None:
        log.info("%s already finished with this config; reading its results", run_dir)
        return finished
    context = distributed.setup(config.device)
    started = time.perf_counter()
    data = load_data(config)
    train, val, selection_note = _choose(config, data)
    test = data.test
    try:
        task = task_class(config.task)(data.label_kind, data.class_names)
    except ValueError as error:
        raise ConfigError(f"task {config.task} on dataset {config.dataset}: {error}") from error
    log.info("fine-tuning on %d labelled samples of %d; selection: %s", len(train), len(data.train), selection_note)

    torch.manual_seed(config.seed)
    normalisation = config.normalisation()
    encoder, source = build_run_encoder(config, data)
    if context.is_main:  # only now is the run known to be valid: nothing was written before
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    dense = task.name == "segmentation"  # label maps: no class weights (Dice balances), moved with the views
    weights = class_weights(train.labels, data.label_kind) if config.class_weighting == "balanced" and not dense else None
    if config.mode == "linear":
        encoder.to(context.device)
        splits = (train, val, test)
        train_inputs, val_inputs, test_inputs = (None if s is None else extract_features(
            encoder, s, normalisation, context.device, config.num_workers) for s in splits)
        input_norm, views = None, ()
        model = task.build_model(None, encoder.feature_size, "batch", weights)
        groups = param_groups(model, 0.0)
    else:
        train_inputs, val_inputs, test_inputs = train.inputs, None if val is None else val.inputs, test.inputs
        input_norm, views = normalisation, (config.views,)
        model = task.build_model(encoder, encoder.feature_size, encoder.head_norm, weights)
        depth = encoder.num_layers

        def layer_of(name: str) -> int:
            return encoder.layer_id(name.removeprefix("encoder.")) if name.startswith("encoder.") else depth + 1

        groups = param_groups(model, config.weight_decay, config.layer_decay, depth, layer_of,
                              lambda name: "encoder" if name.startswith("encoder.") else "head")
    model.to(context.device)
    batches = Batches(train_inputs, train.labels, config.batch_size, input_norm, views, True, True, context.rank,
                      context.world_size, context.device, config.num_workers, dense_labels=dense)

    def evaluation(inputs: Any) -> Batches:
        return Batches(inputs, None, 256, input_norm, (), False, False, device=context.device, num_workers=config.num_workers)

    epochs = max(config.epochs, math.ceil(config.min_steps / len(batches)))
    lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.AdamW(groups, lr=lr)
    on_epoch_start = freeze_then_unfreeze(model, optimizer, config.freeze_epochs, config.unfreeze_lr_scale)
    schedule = Schedule(epochs=epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    best_path = run_dir / "best.safetensors"
    state: dict[str, Any] = {"best_key": None, "best_epoch": None, "best_values": None}

    def on_epoch_end(epoch: int) -> dict[str, Any]:
        traced = {}
        if config.trace_test:  # to measure how fragile selection is; the chosen epoch never depends on it
            traced = {f"trace_test_{k}": v for k, v in task.metrics(test.labels, task.scores(model, evaluation(test_inputs))).items()}
        if val_inputs is None:
            return traced
        key, values = task.selection(val.labels, task.scores(model, evaluation(val_inputs)))
        if state["best_key"] is None or tuple(key) > tuple(state["best_key"]):
            state.update(best_key=list(key), best_epoch=epoch, best_values=values)
            if context.is_main:
                atomic_save(model.state_dict(), {"epoch": epoch, **values}, best_path)
        return {**values, **traced}

    fit(model, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir, config.seed,
        {**identity, "init": source}, checkpoint_every=config.checkpoint_every, on_epoch_end=on_epoch_end,
        on_epoch_start=on_epoch_start, state=state,
        description=f"finetune {encoder.kind} {config.label_fraction:g}")
    distributed.barrier(context)
    if val_inputs is not None:
        tensors, _ = read(best_path)
        load_weights(model, tensors, str(best_path))
    scores = task.scores(model, evaluation(test_inputs))
    test_metrics = task.metrics(test.labels, scores)
    if config.mode == "linear":  # the saved model runs on images: the frozen encoder under the trained head
        head_state = model.state_dict()
        model = task.build_model(encoder, encoder.feature_size, "batch").to(context.device)
        own = model.state_dict()
        model.load_state_dict({**own, **{k: v for k, v in head_state.items() if k in own}})
    result = {
        "run_dir": str(run_dir), "dataset": config.dataset, "task": config.task, "encoder": encoder.kind,
        "init": source, "mode": config.mode, "label_fraction": config.label_fraction, "seed": config.seed,
        "label_count": config.label_count, "n_train": len(train), "n_val": 0 if val is None else len(val),
        "selection": selection_note,
        "epochs": epochs, "steps": epochs * len(batches),
        "best_epoch": state["best_epoch"] if val_inputs is not None else epochs - 1,
        **{key: value for key, value in (state["best_values"] or {}).items() if key != "val_loss"},
        "seconds": round(time.perf_counter() - started, 1),
        **{f"test_{name}": value for name, value in test_metrics.items()},
        **environment(context.device),
    }
    if context.is_main:
        save_model(run_dir / MODEL_NAME, model, {
            **task.describe(), "encoder": record_of(model.encoder),
            "head": task.head_record(model, "batch" if config.mode == "linear" else encoder.head_norm),
            "preprocessing": data.preprocessing, "dataset": config.dataset, "mode": config.mode, "init": source, "label_fraction": config.label_fraction,
        })
        if dense:  # pictures a person can check: the test images with the true and the predicted outlines
            overlay_grid(test.inputs, test.labels, scores.argmax(axis=1), data.class_names, run_dir / "test_overlays.png")
        results_path.write_text(json.dumps({**result, "identity": identity}, indent=2))
        log.info("test %s", "  ".join(f"{name} {value:.4f}" for name, value in test_metrics.items()))
    return result

