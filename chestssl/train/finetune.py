"""``chestssl finetune``: fine-tune or linear-probe a classifier on a stratified fraction of the labels.

Model selection follows the label fraction: with ``selection: fraction`` the epoch is chosen on a validation
subset drawn with the same fraction (a 1% run sees 1% of the validation labels too); ``fixed`` trains a fixed
schedule and keeps the last epoch; ``full`` selects on the whole validation split and is reported as such.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chestssl.config import save_config
from chestssl.data.augment import AugmentConfig
from chestssl.data.batches import Normalisation, xray_preprocessing
from chestssl.data.splits import label_fraction, load_splits
from chestssl.errors import CheckpointError
from chestssl.models.heads import Classifier, class_weights, probabilities
from chestssl.models.resnet import resnet18
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train import distributed
from chestssl.train.checkpoint import atomic_save, check_preprocessing, load_weights, read, read_encoder
from chestssl.train.evaluate import auc, classification_metrics, cross_entropy
from chestssl.train.inputs import Labelled, Split, load_cache_splits, make_batches
from chestssl.train.loop import Schedule, fit, resume_identity
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
    cache_dir: str | None = None
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
    resnet_small_input: bool = True
    num_workers: int = 0
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
        if self.dataset == "ct-cache" and not self.cache_dir:
            raise ValueError("dataset ct-cache needs cache_dir: a folder written by prepare-ct or a dataset builder")

    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalisation_mean, self.normalisation_std)


def load_labelled(config: FinetuneConfig) -> Labelled:
    """Train/val/test for the run: a named 2D dataset, or a CT volume cache (``dataset: ct-cache``)."""
    if config.dataset == "ct-cache":
        data = load_cache_splits(config.cache_dir, config.split_seed)
        normalisation = {"mean": config.normalisation_mean, "std": config.normalisation_std}
        return dataclasses.replace(data, preprocessing={**data.preprocessing, "normalisation": normalisation})
    splits = load_splits(config.dataset, config.data_dir, config.image_size, config.split_seed,
                         root=config.dataset_root, labels_csv=config.labels_csv)
    parts = {name: Split(d.images, d.labels, d.patient_ids) for name, d in splits.items()}
    train = splits["train"]
    return Labelled(parts["train"], parts["val"], parts["test"], train.task, train.class_names, 2,
                    xray_preprocessing(config.image_size, config.normalisation()))


def build_encoder(config: FinetuneConfig, data: Labelled) -> tuple[torch.nn.Module, int, str]:
    """The encoder to fine-tune, its depth (for layer-wise decay) and where its weights came from."""
    spatial_dims = data.spatial_dims
    if config.model == "resnet18":
        return resnet18(spatial_dims=spatial_dims, in_channels=1, small_input=config.resnet_small_input), 0, "scratch"
    if config.encoder:
        tensors, meta = read_encoder(config.encoder)
        check_preprocessing(config.encoder, meta["preprocessing"], data.preprocessing)
        if meta["architecture"].get("name") != "vit":
            raise CheckpointError(f"{config.encoder} holds a {meta['architecture'].get('name')!r} encoder, not a ViT")
        architecture = {k: v for k, v in meta["architecture"].items() if k != "name"}
        encoder = ViT(ViTConfig(**architecture), drop_path=config.drop_path)
        load_weights(encoder, tensors, str(config.encoder))
        return encoder, encoder.config.depth, f"{meta.get('method', 'pretrained')}:{config.encoder}"
    size = data.preprocessing.get("size", config.image_size) if spatial_dims == 3 else config.image_size
    vit = ViTConfig(spatial_dims=spatial_dims, image_size=size, patch_size=config.patch_size, in_channels=1,
                    hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads)
    return ViT(vit, drop_path=config.drop_path), vit.depth, "scratch"


@torch.no_grad()
def predict(model: torch.nn.Module, inputs, normalisation: Normalisation | None, device: torch.device,
            num_workers: int = 0, batch_size: int = 256) -> np.ndarray:
    """Probabilities for every input, in order (evaluation mode, no augmentation)."""
    model.eval()
    batches = make_batches(inputs, None, batch_size, normalisation, None, False, False, device=device, num_workers=num_workers)
    outputs = [probabilities(model.logits(batch[0]).float(), model.task).cpu() for batch in batches.epoch(0, 0)]
    model.train()
    return torch.cat(outputs).numpy()


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, inputs, normalisation: Normalisation, device: torch.device,
                     num_workers: int = 0) -> np.ndarray:
    encoder.eval()
    batches = make_batches(inputs, None, 256, normalisation, None, False, False, device=device, num_workers=num_workers)
    return torch.cat([encoder(batch[0]).float().cpu() for batch in batches.epoch(0, 0)]).numpy()


def _choose(config: FinetuneConfig, data: Labelled) -> tuple[Split, Split | None, str]:
    """The labelled training subset and the validation set used for model selection (None for ``fixed``)."""
    train, val = data.train, data.val
    chosen = train.subset(label_fraction(train.labels, config.label_fraction, config.seed, train.patient_ids,
                                         data.class_names, "training split"))
    if config.selection == "fixed":
        return chosen, None, "fixed schedule, last epoch (no validation labels)"
    if config.selection == "full" or config.label_fraction == 1.0:
        note = "full validation split" + (" (more labels than the fraction claims)" if config.label_fraction < 1 else "")
        return chosen, val, note
    indices = label_fraction(val.labels, config.label_fraction, config.seed, val.patient_ids, data.class_names, "validation split")
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
    data = load_labelled(config)
    train, val, selection_note = _choose(config, data)
    test, task = data.test, data.task
    num_outputs = 1 if task == "binary" else len(data.class_names)
    log.info("fine-tuning on %d labelled samples (%.3g of %d); selection: %s", len(train), config.label_fraction,
             len(data.train), selection_note)

    torch.manual_seed(config.seed)
    normalisation = config.normalisation()
    encoder, depth, source = build_encoder(config, data)
    weights = class_weights(train.labels, task) if config.class_weighting == "balanced" else None
    if config.mode == "linear":
        encoder.to(context.device)
        features = [None if split is None else extract_features(encoder, split.inputs, normalisation, context.device,
                                                                 config.num_workers) for split in (train, val, test)]
        train_inputs, val_inputs, test_inputs = features
        input_norm = None
        model = Classifier(None, encoder.feature_size, num_outputs, task, weights, feature_norm="batch")
        groups, augment = param_groups(model, 0.0), None
    else:
        train_inputs, val_inputs, test_inputs = train.inputs, None if val is None else val.inputs, test.inputs
        input_norm = normalisation
        model = Classifier(encoder, encoder.feature_size, num_outputs, task, weights,
                           feature_norm="layer" if config.model == "vit" else "none")
        layer_of = (lambda name: vit_layer_id(name.removeprefix("encoder."), depth)) if config.model == "vit" else None
        groups = param_groups(model, config.weight_decay, config.layer_decay if config.model == "vit" else 1.0, depth, layer_of)
        augment = AugmentConfig(crop_scale=config.crop_scale, rotate_degrees=config.rotate_degrees,
                                flip_probability=config.flip_probability, intensity=config.intensity)
    model.to(context.device)
    batches = make_batches(train_inputs, train.labels, config.batch_size, input_norm, augment, True, True,
                           context.rank, context.world_size, context.device, config.num_workers)
    epochs = max(config.epochs, math.ceil(config.min_steps / len(batches)))
    lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = Schedule(epochs=epochs, steps_per_epoch=len(batches), lr=lr, warmup_epochs=config.warmup_epochs)
    best_path = run_dir / "best.safetensors"
    state: dict[str, Any] = {"best_score": None, "best_loss": None, "best_epoch": None}

    def on_epoch_end(epoch: int) -> dict[str, Any]:
        if val_inputs is None:
            return {}
        scores = predict(model, val_inputs, input_norm, context.device, config.num_workers)
        val_auc, val_loss = auc(val.labels, scores, task), cross_entropy(val.labels, scores, task)
        # validation loss breaks ties: a small validation subset often puts AUC at 1.0 for many epochs
        key = (-1.0 if math.isnan(val_auc) else val_auc, -val_loss)
        if state["best_score"] is None or key > (state["best_score"], -state["best_loss"]):
            state.update(best_score=key[0], best_loss=val_loss, best_epoch=epoch)
            if context.is_main:
                atomic_save(model.state_dict(), {"epoch": epoch, "val_auc": val_auc, "val_loss": val_loss}, best_path)
        return {"val_auc": val_auc, "val_loss": val_loss}

    identity = resume_identity(config, model=config.model, source=source)
    fit(model, optimizer, lambda epoch: batches.epoch(config.seed, epoch), schedule, context, run_dir, config.seed,
        identity, checkpoint_every=config.checkpoint_every, on_epoch_end=on_epoch_end, state=state,
        description=f"finetune {config.model} {config.label_fraction:g}")
    distributed.barrier(context)
    if val_inputs is not None:
        tensors, _ = read(best_path)
        load_weights(model, tensors, str(best_path))
    scores = predict(model, test_inputs, input_norm, context.device, config.num_workers)
    test_metrics = classification_metrics(test.labels, scores, task)
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
