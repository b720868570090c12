"""Classification heads and the classifier that joins an encoder to one, with the task's loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.data.batch import Batch


def class_weights(labels: np.ndarray, task: str) -> torch.Tensor:
    """Inverse-frequency weights: binary -> pos_weight n_neg / n_pos (1,); multiclass -> n / (K n_k) (K,);
    multilabel -> per-label n_neg / n_pos (K,), clipped to [0.1, 100]."""
    labels = np.asarray(labels)
    if task == "multiclass":
        counts = np.bincount(labels, minlength=int(labels.max()) + 1).astype(np.float64)
        return torch.tensor(len(labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    positives = labels.reshape(len(labels), -1).sum(axis=0).astype(np.float64)
    negatives = len(labels) - positives
    return torch.tensor(np.clip(negatives / np.maximum(positives, 1), 0.1, 100.0), dtype=torch.float32)


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for the task: (B,) logits for binary, (B, K) for multiclass and multilabel."""
    if task == "multiclass":
        return F.cross_entropy(logits, targets.long(), weight=weights)
    return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=weights)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if task == "multiclass" else logits.sigmoid()


class Classifier(nn.Module):
    """``encoder`` (images -> (B, F) features) + linear head; ``forward(batch)`` returns the loss on
    ``batch.images`` and ``batch.labels`` (a :class:`chestssl.data.batch.Batch`).

    Args:
        encoder: a feature extractor with a ``feature_size`` (ViT or ResNet); None for a head on precomputed
            features (linear probing).
        feature_size: F.
        num_outputs: 1 for binary, K otherwise.
        task: "binary", "multiclass" or "multilabel".
        weights: class weights for the loss (see :func:`class_weights`), or None.
        feature_norm: "layer" (fine-tuning, MAE's fc_norm), "batch" (BatchNorm without affine, MAE's linear
            probe) or "none".
    """

    def __init__(self, encoder: nn.Module | None, feature_size: int, num_outputs: int, task: str,
                 weights: torch.Tensor | None = None, feature_norm: str = "layer") -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        norms = {"layer": lambda: nn.LayerNorm(feature_size), "batch": lambda: nn.BatchNorm1d(feature_size, affine=False),
                 "none": nn.Identity}
        if feature_norm not in norms:
            raise ValueError(f"feature_norm must be one of {sorted(norms)}, got {feature_norm!r}")
        self.norm = norms[feature_norm]()
        self.head = nn.Linear(feature_size, num_outputs)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("weights", weights if weights is not None else torch.empty(0), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = x if self.encoder is None else self.encoder(x)  # (B, F)
        logits = self.head(self.norm(features))
        return logits.squeeze(-1) if self.task == "binary" else logits

    def forward(self, batch: Batch) -> torch.Tensor:
        weights = self.weights if self.weights.numel() else None
        return task_loss(self.logits(batch.images).float(), batch.labels, self.task, weights)
