"""``chestssl finetune``: fine-tune or linear-probe a classifier on a stratified fraction of the labels.

Model selection follows the label fraction: with ``selection: fraction`` the epoch is chosen on a validation
subset drawn with the same fraction (a 1% run sees 1% of the validation labels too); ``fixed`` trains a fixed
schedule and keeps the last epoch; ``full`` selects on the whole validation split and is reported as such.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chestssl.config import save_config, to_dict
from chestssl.data.augment import AugmentConfig
from chestssl.data.batches import Batches, Normalisation, xray_preprocessing
from chestssl.data.splits import label_fraction, load_splits
from chestssl.data.types import ImageDataset
from chestssl.models.heads import Classifier, class_weights, probabilities
from chestssl.models.resnet import resnet18
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train import distributed
from chestssl.train.checkpoint import atomic_save, check_preprocessing, load_weights, read, read_encoder
from chestssl.train.evaluate import auc, classification_metrics
from chestssl.train.loop import Schedule, fit
from chestssl.train.optim import param_groups, vit_layer_id

log = logging.getLogger(__name__)

MODELS = ("vit", "resnet18")
MODES = ("full", "linear")
SELECTIONS = ("fraction", "fixed", "full")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved as ``config.yaml`` in its run directory."""

    run_dir: str = "runs/finetune"
    data_dir: str | None = None
    dataset: str = "pneumoniamnist"
    dataset_root: str | None = None
    labels_csv: str | None = None
    image_size: int = 28
    model: str = "vit"
    encoder: str | None = None
    patch_size: int = 4
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 3
    mode: str = "full"
    label_fraction: float = 1.0
    selection: str = "fraction"
    split_seed: int = 0
    seed: int = 0
    epochs: int = 30
    min_steps: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    drop_path: float = 0.1
    class_weighting: str = "balanced"
    crop_scale: tuple[float, float] = (0.7, 1.0)
    rotate_degrees: float = 10.0
    flip_probability: float = 0.0
    intensity: float = 0.1
    normalisation_mean: float = 0.5
    normalisation_std: float = 0.25
    device: str = "auto"
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        for name, value, valid in (("model", self.model, MODELS), ("mode", self.mode, MODES),
                                   ("selection", self.selection, SELECTIONS),
                                   ("class_weighting", self.class_weighting, ("balanced", "none"))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if self.encoder and self.model != "vit":
            raise ValueError("an encoder file is a pretrained ViT: set model=vit")

    def preprocessing(self) -> dict:
        return xray_preprocessing(self.image_size, Normalisation(self.normalisation_mean, self.normalisation_std))


def build_encoder(config: FinetuneConfig) -> tuple[torch.nn.Module, int, str]:
    """The encoder to fine-tune, its depth (for layer-wise decay) and where its weights came from."""
    if config.model == "resnet18":
        return resnet18(spatial_dims=2, in_channels=1), 0, "scratch"
    if config.encoder:
        tensors, meta = read_encoder(config.encoder)
        check_preprocessing(config.encoder, meta["preprocessing"], config.preprocessing())
        architecture = {k: v for k, v in meta["architecture"].items() if k != "name"}
        if meta["architecture"].get("name") != "vit":
            raise ValueError(f"{config.encoder} holds a {meta['architecture'].get('name')!r} encoder, not a ViT")
        encoder = ViT(ViTConfig(**architecture), drop_path=config.drop_path)
        load_weights(encoder, tensors, str(config.encoder))
        return encoder, encoder.config.depth, f"{meta.get('method', 'pretrained')}:{config.encoder}"
    vit = ViTConfig(spatial_dims=2, image_size=config.image_size, patch_size=config.patch_size, in_channels=1,
                    hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads)
    return ViT(vit, drop_path=config.drop_path), vit.depth, "scratch"


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: np.ndarray, normalisation: Normalisation | None, device: torch.device,
            batch_size: int = 256) -> np.ndarray:
    """Probabilities for every input, in order (evaluation mode, no augmentation)."""
    model.eval()
    batches = Batches(inputs, None, batch_size, normalisation, shuffle=False, drop_last=False, device=device)
    outputs = [probabilities(model.logits(x).float(), model.task).cpu() for x, _ in batches.epoch(0, 0)]
    model.train()
    return torch.cat(outputs).numpy()


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, normalisation: Normalisation, device: torch.device) -> np.ndarray:
    encoder.eval()
    batches = Batches(images, None, 256, normalisation, shuffle=False, drop_last=False, device=device)
    return torch.cat([encoder(x).float().cpu() for x, _ in batches.epoch(0, 0)]).numpy()


def _choose(config: FinetuneConfig, splits: dict[str, ImageDataset]) -> tuple[ImageDataset, ImageDataset | None, str]:
    """The labelled training subset and the validation set used for model selection (None for ``fixed``)."""
    train = splits["train"]
    chosen = train.subset(label_fraction(train.labels, config.label_fraction, config.seed, train.patient_ids,
                                         train.class_names, "training split"))
    val = splits["val"]
    if config.selection == "fixed":
        return chosen, None, "fixed schedule, last epoch (no validation labels)"
    if config.selection == "full" or config.label_fraction == 1.0:
        note = "full validation split" + (" (more labels than the fraction claims)" if config.label_fraction < 1 else "")
        return chosen, val, note
    indices = label_fraction(val.labels, config.label_fraction, config.seed, val.patient_ids, val.class_names, "validation split")
    return chosen, val.subset(indices), f"validation subset of the same fraction ({len(indices)} of {len(val)})"


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) one fine-tuning run; returns its results dict."""
    run_dir = Path(config.run_dir)
    results_path = run_dir / "results.json"
    if results_path.exists():
        log.info("%s already finished; reading its results", run_dir)
        return json.loads(results_path.read_text())
    context = distributed.setup(config.device)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    started = time.perf_counter()
    splits = load_splits(config.dataset, config.data_dir, config.image_size, config.split_seed,
                         root=config.dataset_root, labels_csv=config.labels_csv)
    train, val, selection_note = _choose(config, splits)
    test = splits["test"]
    task = train.task
    num_outputs = 1 if task == "binary" else len(train.class_names)
    log.info("fine-tuning on %d labelled images (%.3g of %d); selection: %s", len(train), config.label_fraction,
             len(splits["train"]), selection_note)

    torch.manual_seed(config.seed)
    normalisation = Normalisation(config.normalisation_mean, config.normalisation_std)
    encoder, depth, source = build_encoder(config)
    weights = class_weights(train.labels, task) if config.class_weighting == "balanced" else None
    if config.mode == "linear":
        encoder.to(context.device)
        train_inputs, input_norm = extract_features(encoder, train.images, normalisation, context.device), None
        val_inputs = None if val is None else extract_features(encoder, val.images, normalisation, context.device)
        test_inputs = extract_features(encoder, test.images, normalisation, context.device)
        model = Classifier(None, encoder.feature_size, num_outputs, task, weights, feature_norm="batch")
        groups, augment = param_groups(model, 0.0), None
    else:
        train_inputs, val_inputs, test_inputs = train.images, None if val is None else val.images, test.images
        input_norm = normalisation
        model = Classifier(encoder, encoder.feature_size, num_outputs, task, weights,
                           feature_norm="layer" if config.model == "vit" else "none")
        layer_of = (lambda name: vit_layer_id(name.removeprefix("encoder."), depth)) if config.model == "vit" else None
        groups = param_groups(model, config.weight_decay, config.layer_decay if config.model == "vit" else 1.0, depth, layer_of)
        augment = AugmentConfig(crop_scale=config.crop_scale, rotate_degrees=config.rotate_degrees,
                                flip_probability=config.flip_probability, intensity=config.intensity)
    model.to(context.device)
    batches = Batches(train_inputs, train.labels, config.batch_size, input_norm, augment, shuffle=True, drop_last=True,
                      rank=context.rank, world_size=context.world_size, device=context.device)
    epochs = max(config.epochs, math.ceil(config.min_steps / len(batches)))
    lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = Schedule(epochs=epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    best_path = run_dir / "best.safetensors"
    state: dict[str, Any] = {"best_score": None, "best_epoch": None}

    def on_epoch_end(epoch: int) -> dict[str, Any]:
        if val_inputs is None:
            return {}
        scores = predict(model, val_inputs, input_norm, context.device)
        val_auc = auc(val.labels, scores, task)
        score = -1.0 if math.isnan(val_auc) else val_auc
        if state["best_score"] is None or score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch)
            if context.is_main:
                atomic_save(model.state_dict(), {"epoch": epoch, "val_auc": val_auc}, best_path)
        return {"val_auc": val_auc}

    identity = {"model": config.model, "source": source, "config": {k: v for k, v in to_dict(config).items()
                                                                    if k not in ("run_dir", "device", "checkpoint_every")}}
    fit(model, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir, config.seed,
        identity, config.checkpoint_every, on_epoch_end, state, description=f"finetune {config.model} {config.label_fraction:g}")
    distributed.barrier(context)
    if val_inputs is not None:
        tensors, _ = read(best_path)
        load_weights(model, tensors, str(best_path))
    test_metrics = classification_metrics(test.labels, predict(model, test_inputs, input_norm, context.device), task)
    result = {
        "run_dir": str(run_dir), "dataset": config.dataset, "model": config.model, "init": source, "mode": config.mode,
        "label_fraction": config.label_fraction, "seed": config.seed, "n_train": len(train), "n_val": 0 if val is None else len(val),
        "selection": selection_note, "epochs": epochs, "steps": epochs * len(batches),
        "best_epoch": state["best_epoch"] if val_inputs is not None else epochs - 1,
        "val_auc": state["best_score"], "seconds": round(time.perf_counter() - started, 1),
        **{f"test_{name}": value for name, value in test_metrics.items()},
    }
    if context.is_main:
        results_path.write_text(json.dumps(result, indent=2))
        log.info("test AUC %.4f ACC %.4f balanced acc %.4f F1 %.4f", result["test_auc"], result["test_acc"],
                 result["test_balanced_accuracy"], result["test_f1_weighted"])
    return result
