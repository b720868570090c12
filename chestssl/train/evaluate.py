"""Test metrics: AUC and ACC exactly as the MedMNIST evaluator computes them, plus balanced accuracy and
weighted F1 (Dack et al. report these two); for segmentation, Dice and the 95% Hausdorff distance by MONAI.

Scores are probabilities: (N,) for binary tasks (probability of class 1), (N, K) softmax for multiclass,
(N, K) sigmoid for multilabel. ACC uses the threshold 0.5 for binary and multilabel, argmax for multiclass.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
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


def metric_name(class_name: str) -> str:
    """A class name as part of a metric key: "right lung" -> "right_lung"."""
    return "_".join(class_name.lower().replace("-", " ").split())


def _one_hot(maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(maps.long(), num_classes).movedim(-1, 1).float()  # (N, K, *S)


def region_scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int,
                  groups: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-image Dice and 95% Hausdorff distance (in pixels or voxels) of every foreground region, by MONAI.

    Args:
        labels, predicted: (N, *S) class-index maps.
        num_classes: K, background (0) included.
        groups: extra regions scored as the union of their classes, e.g. {"lung": (1, 2)}.

    Returns:
        region index (as a string: "1", "2", ...) or group name -> (dice (N,), hd95 (N,)); Dice is NaN where the
        region is absent from both maps, HD95 NaN or inf where it is absent from either.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    truth, guess = torch.as_tensor(labels), torch.as_tensor(predicted)
    regions = {str(k): ((guess == k), (truth == k)) for k in range(1, num_classes)}
    for name, members in (groups or {}).items():
        inside = torch.as_tensor(list(members))
        regions[name] = (torch.isin(guess, inside), torch.isin(truth, inside))
    scores = {}
    for name, (mine, theirs) in regions.items():
        y_pred, y = _one_hot(mine, 2), _one_hot(theirs, 2)
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        hausdorff = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        dice(y_pred=y_pred, y=y)
        with warnings.catch_warnings():  # an empty region gives inf or NaN: counted by the caller, not warned
            warnings.simplefilter("ignore")
            hausdorff(y_pred=y_pred, y=y)
        scores[name] = (dice.aggregate()[:, 0].numpy(), hausdorff.aggregate()[:, 0].numpy())
    return scores


def segmentation_metrics(labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...],
                         groups: dict[str, tuple[int, ...]] | None = None) -> dict[str, float]:
    """Mean Dice and HD95 over images of every foreground class and group, and their means over classes.

    ``dice`` and ``hd95`` are the means over the foreground classes (groups left out); ``dice_<class>`` and
    ``hd95_<class>`` each region's; ``hd95`` values are means over the images where the distance is finite and
    ``hd95_missed`` counts image-region pairs where it is not (a region predicted empty, or present only in the
    prediction).
    """
    scores = region_scores(labels, predicted, len(class_names), groups)
    out: dict[str, float] = {}
    missed = 0
    for region, (dice, hd95) in scores.items():
        name = metric_name(class_names[int(region)]) if region.isdigit() else metric_name(region)
        finite = np.isfinite(hd95)
        present = ~np.isnan(dice)
        missed += int((present & ~finite).sum())
        out[f"dice_{name}"] = float(np.nanmean(dice)) if present.any() else float("nan")
        out[f"hd95_{name}"] = float(hd95[finite].mean()) if finite.any() else float("nan")
    classes = [metric_name(c) for c in class_names[1:]]
    return {"dice": float(np.nanmean([out[f"dice_{c}"] for c in classes])),
            "hd95": float(np.nanmean([out[f"hd95_{c}"] for c in classes])), "hd95_missed": float(missed), **out}
