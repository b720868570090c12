"""The task layer: what a fine-tuned model predicts, how it is scored and how it is rebuilt from its file.

A task turns an encoder into a model with a head, scores a split, chooses between epochs, and describes
itself for the model file (``model.safetensors`` + ``model.json``). ``classification`` is here; dense tasks
(segmentation: masks and label maps) join :data:`TASKS` with the same methods.

Legend: ``N`` samples, ``B`` batch, ``K`` classes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chestssl.data.batch import Batches, Normalisation
from chestssl.errors import CheckpointError
from chestssl.models.encoders import build_encoder
from chestssl.models.heads import Classifier, probabilities
from chestssl.train.checkpoint import load_weights, read_model
from chestssl.train.evaluate import auc, classification_metrics, cross_entropy

LABEL_KINDS = ("binary", "multiclass", "multilabel")


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

    @torch.no_grad()
    def scores(self, model: nn.Module, batches: Batches) -> np.ndarray:
        """Probabilities for every sample of ``batches`` (in order, evaluation mode): (N,) or (N, K)."""
        was_training = model.training
        model.eval()
        outputs = [self.scores_of(model, batch.images) for batch in batches.epoch(0, 0)]
        model.train(was_training)
        return np.concatenate(outputs)

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

    @classmethod
    def from_description(cls, meta: dict[str, Any]) -> "Classification":
        return cls(meta["label_kind"], tuple(meta["class_names"]), float(meta["threshold"]))

    def rebuild(self, meta: dict[str, Any], source: str) -> Classifier:
        """The model a file describes, with fresh weights (its ``head`` record names the head)."""
        head = meta["head"]
        encoder = build_encoder(meta["encoder"], source)
        return self.build_model(encoder, int(head["feature_size"]), head["feature_norm"])


TASKS = {"classification": Classification}


def task_class(name: str) -> type[Classification]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


class LoadedModel:
    """A fine-tuned model rebuilt from its file: ``module`` (eval mode), its ``task``, ``preprocessing`` and
    the whole metadata record."""

    def __init__(self, module: nn.Module, task: Classification, meta: dict[str, Any]) -> None:
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
