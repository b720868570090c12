"""Test metrics: AUC and ACC exactly as the MedMNIST evaluator computes them, plus balanced accuracy and
weighted F1 (Dack et al. report these two).

Scores are probabilities: (N,) for binary tasks (probability of class 1), (N, K) softmax for multiclass,
(N, K) sigmoid for multilabel. ACC uses the threshold 0.5 for binary and multilabel, argmax for multiclass.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score


def predictions(scores: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard labels from probabilities."""
    if task == "multiclass":
        return scores.argmax(axis=-1)
    return (scores > threshold).astype(np.int64)


def auc(labels: np.ndarray, scores: np.ndarray, task: str) -> float:
    """MedMNIST ``getAUC``: binary ROC AUC; multiclass and multilabel: mean of per-class one-vs-rest AUCs.

    Classes absent from ``labels`` (no positive or no negative) are left out of the mean; NaN if none is left.
    """
    if task == "binary":
        return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")
    targets = labels if task == "multilabel" else np.eye(scores.shape[1], dtype=np.int64)[labels]
    values = [roc_auc_score(targets[:, k], scores[:, k]) for k in range(scores.shape[1]) if len(np.unique(targets[:, k])) == 2]
    return float(np.mean(values)) if values else float("nan")


def cross_entropy(labels: np.ndarray, scores: np.ndarray, task: str) -> float:
    """Mean negative log-likelihood of the labels under the probabilities (per label for multilabel)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    if task == "multiclass":
        return float(-np.mean(np.log(scores[np.arange(len(labels)), labels])))
    labels = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores)))


def classification_metrics(labels: np.ndarray, scores: np.ndarray, task: str) -> dict[str, float]:
    """AUC, ACC (MedMNIST definitions), balanced accuracy and weighted F1 of ``scores`` against ``labels``."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = predictions(scores, task)
    if task == "multilabel":
        columns = range(labels.shape[1])
        accuracy = float(np.mean([accuracy_score(labels[:, k], predicted[:, k]) for k in columns]))
        balanced = float(np.mean([
            balanced_accuracy_score(labels[:, k], predicted[:, k]) for k in columns if len(np.unique(labels[:, k])) == 2
        ] or [float("nan")]))
    else:
        accuracy = float(accuracy_score(labels, predicted))
        balanced = float(balanced_accuracy_score(labels, predicted))
    return {
        "auc": auc(labels, scores, task),
        "acc": accuracy,
        "balanced_accuracy": balanced,
        "f1_weighted": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
    }
