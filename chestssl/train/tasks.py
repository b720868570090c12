"""The task layer: what a fine-tuned model predicts, how it is scored and how it is rebuilt from its file.

A task turns an encoder into a model with a head, scores a split, chooses between epochs, and describes
itself for the model file (``model.safetensors`` + ``model.json``): ``classification`` (image- or volume-level
labels) and ``segmentation`` (label maps: a decoder to per-pixel classes, scored by Dice and HD95).

Legend: ``N`` samples, ``B`` batch, ``K`` classes, ``S`` spatial (H, W) or (D, H, W).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.xray.lungseg import CLASS_GROUPS
from chestssl.errors import CheckpointError, ConfigError
from chestssl.models.encoders import build_encoder
from chestssl.models.heads import Classifier, probabilities
from chestssl.models.segmentation import SegmentationModel, build_segmentation
from chestssl.train.checkpoint import load_weights, read_model
from chestssl.train.evaluate import auc, classification_metrics, cross_entropy, segmentation_metrics

LABEL_KINDS = ("binary", "multiclass", "multilabel")


@torch.no_grad()
def scores_in_order(task: "Classification | Segmentation", model: nn.Module, batches: Batches) -> np.ndarray:
    """``task.scores_of`` over every batch of ``batches`` in order, the model in evaluation mode meanwhile."""
    was_training = model.training
    model.eval()
    outputs = [task.scores_of(model, batch.images) for batch in batches.epoch(0, 0)]
    model.train(was_training)
    return np.concatenate(outputs)


class Classification:
    """Image- or volume-level labels: binary (one logit), multiclass (softmax) or multilabel (K sigmoids).

    Args:
        label_kind: one of :data:`LABEL_KINDS`.
        class_names: the K class names (for binary, the names of class 0 and class 1).
        threshold: probability above which a binary or multilabel prediction is positive.
    """

    name = "classification"

    def __init__(self, label_kind: str, class_names: tuple[str, ...], threshold: float = 0.5) -> None:
        if label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
        self.label_kind, self.class_names, self.threshold = label_kind, tuple(class_names), threshold

    @property
    def num_outputs(self) -> int:
        return 1 if self.label_kind == "binary" else len(self.class_names)

    def build_model(self, encoder: nn.Module | None, feature_size: int, feature_norm: str,
                    weights: torch.Tensor | None = None) -> Classifier:
        return Classifier(encoder, feature_size, self.num_outputs, self.label_kind, weights, feature_norm)

    def scores(self, model: nn.Module, batches: Batches) -> np.ndarray:
        """Probabilities for every sample of ``batches`` (in order, evaluation mode): (N,) or (N, K)."""
        return scores_in_order(self, model, batches)

    @torch.no_grad()
    def scores_of(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        """Probabilities of a batch of model inputs (B, C, *S): (B,) or (B, K). ``predict`` uses it too."""
        return probabilities(model.logits(x).float(), self.label_kind).cpu().numpy()

    def metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return classification_metrics(labels, scores, self.label_kind)

    def selection(self, labels: np.ndarray, scores: np.ndarray) -> tuple[tuple[float, float], dict[str, float]]:
        """The key an epoch is chosen by (higher is better) and the values to log.

        Validation AUC first; validation loss breaks ties, since a small validation subset often puts AUC at
        1.0 for many epochs.
        """
        val_auc, val_loss = auc(labels, scores, self.label_kind), cross_entropy(labels, scores, self.label_kind)
        return (-1.0 if math.isnan(val_auc) else val_auc, -val_loss), {"val_auc": val_auc, "val_loss": val_loss}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "label_kind": self.label_kind, "class_names": list(self.class_names),
                "threshold": self.threshold}

    def head_record(self, model: Classifier, feature_norm: str) -> dict[str, Any]:
        return {"feature_size": model.head.in_features, "feature_norm": feature_norm}

    @classmethod
    def from_description(cls, meta: dict[str, Any]) -> "Classification":
        return cls(meta["label_kind"], tuple(meta["class_names"]), float(meta["threshold"]))

    def rebuild(self, meta: dict[str, Any], source: str) -> Classifier:
        """The model a file describes, with fresh weights (its ``head`` record names the head)."""
        head = meta["head"]
        encoder = build_encoder(meta["encoder"], source)
        return self.build_model(encoder, int(head["feature_size"]), head["feature_norm"])


class Segmentation:
    """Label maps: every pixel (voxel) one of K classes, background (class 0) included.

    The model is the encoder under a decoder (:func:`chestssl.models.segmentation.build_segmentation`: UNETR-style
    for a ViT, U-Net for a ResNet), trained with Dice + cross-entropy. Scores are the softmax (N, K, *S); the
    prediction is their argmax. Metrics: Dice and 95% Hausdorff distance of each foreground class, and of the
    unions in :data:`~chestssl.data.xray.lungseg.CLASS_GROUPS` whose classes are all present (right lung + left
    lung = lung). Epochs are chosen by validation mean Dice, then HD95.
    """

    name = "segmentation"

    def __init__(self, label_kind: str, class_names: tuple[str, ...], threshold: float = 0.5) -> None:
        if label_kind != "segmentation":
            raise ValueError(f"the segmentation task needs label maps, got {label_kind!r} labels")
        if len(class_names) < 2:
            raise ValueError(f"segmentation needs background and at least one class, got {list(class_names)}")
        self.label_kind, self.class_names, self.threshold = label_kind, tuple(class_names), threshold
        self.groups = {name: tuple(self.class_names.index(m) for m in members) for name, members in CLASS_GROUPS.items()
                       if all(m in self.class_names for m in members)}

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def build_model(self, encoder: nn.Module | None, feature_size: int, feature_norm: str,
                    weights: torch.Tensor | None = None) -> SegmentationModel:
        if encoder is None:
            raise ConfigError("segmentation has no linear probe on pooled features: use mode=full (freeze_epochs "
                              "keeps the encoder frozen for a while)")
        return build_segmentation(encoder, self.num_outputs)

    def scores(self, model: nn.Module, batches: Batches) -> np.ndarray:
        """Class probabilities of every sample, in order, evaluation mode: (N, K, *S)."""
        return scores_in_order(self, model, batches)

    @torch.no_grad()
    def scores_of(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        return model.logits(x).float().softmax(dim=1).cpu().numpy()

    def metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return segmentation_metrics(labels, scores.argmax(axis=1), self.class_names, self.groups)

    def selection(self, labels: np.ndarray, scores: np.ndarray) -> tuple[tuple[float, float], dict[str, float]]:
        values = self.metrics(labels, scores)
        dice, hd95 = values["dice"], values["hd95"]
        key = (-1.0 if math.isnan(dice) else dice, -(math.inf if math.isnan(hd95) else hd95))
        return key, {"val_dice": dice, "val_hd95": hd95}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "label_kind": self.label_kind, "class_names": list(self.class_names),
                "groups": {name: list(members) for name, members in self.groups.items()}}

    def head_record(self, model: SegmentationModel, feature_norm: str) -> dict[str, Any]:
        return model.describe()

    @classmethod
    def from_description(cls, meta: dict[str, Any]) -> "Segmentation":
        return cls(meta["label_kind"], tuple(meta["class_names"]))

    def rebuild(self, meta: dict[str, Any], source: str) -> SegmentationModel:
        """The model a file describes, with fresh weights (its ``head`` record is the decoder's)."""
        head = meta["head"]
        encoder = build_encoder(meta["encoder"], source)
        return build_segmentation(encoder, int(head["num_classes"]), int(head["feature_size"]), head["norm_name"])


TASKS = {"classification": Classification, "segmentation": Segmentation}
Task = Classification | Segmentation


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


class LoadedModel:
    """A fine-tuned model rebuilt from its file: ``module`` (eval mode), its ``task``, ``preprocessing`` and
    the whole metadata record."""

    def __init__(self, module: nn.Module, task: Task, meta: dict[str, Any]) -> None:
        self.module, self.task, self.meta = module.eval(), task, meta
        self.preprocessing = meta["preprocessing"]
        norm = self.preprocessing.get("normalisation", {})
        self.normalisation = Normalisation(norm.get("mean", 0.5), norm.get("std", 0.25))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a fine-tuned model from ``model.safetensors`` (or its run directory) alone, weights strict."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors, meta = read_model(path)
    try:
        task = task_class(meta["task"]).from_description(meta)
        module = task.rebuild(meta, str(path))
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: its metadata does not describe a model chestssl can rebuild: {error}") from error
    load_weights(module, tensors, str(path))
    return LoadedModel(module.to(device), task, meta)
