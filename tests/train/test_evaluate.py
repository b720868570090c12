import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from chestssl.train.evaluate import classification_metrics


def test_binary_metrics_match_scikit_learn_and_threshold_half():
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.8, 0.9, 0.2, 0.5, 0.7])
    metrics = classification_metrics(labels, scores, "binary")
    predicted = (scores > 0.5).astype(int)  # 0.5 itself is "normal", as in MedMNIST's `y_score > threshold`
    assert predicted.tolist() == [0, 1, 0, 1, 1, 0, 0, 1]
    assert metrics["auc"] == roc_auc_score(labels, scores)
    assert metrics["acc"] == accuracy_score(labels, predicted) == 0.625
    assert metrics["balanced_accuracy"] == balanced_accuracy_score(labels, predicted)
    assert metrics["f1_weighted"] == f1_score(labels, predicted, average="weighted")


def test_multiclass_auc_is_mean_one_vs_rest_and_acc_is_argmax():
    labels = np.array([0, 1, 2, 2, 1, 0])
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    metrics = classification_metrics(labels, scores, "multiclass")
    expected_auc = np.mean([roc_auc_score(labels == k, scores[:, k]) for k in range(3)])
    assert abs(metrics["auc"] - expected_auc) < 1e-12
    assert metrics["acc"] == accuracy_score(labels, scores.argmax(1)) == 5 / 6


def test_multilabel_acc_is_mean_per_label_accuracy():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.4, 0.3], [0.6, 0.7], [0.2, 0.9]])
    metrics = classification_metrics(labels, scores, "multilabel")
    assert metrics["acc"] == (1.0 + 0.5) / 2
    assert abs(metrics["auc"] - np.mean([roc_auc_score(labels[:, k], scores[:, k]) for k in range(2)])) < 1e-12


def test_cross_entropy_matches_scikit_learn():
    from sklearn.metrics import log_loss

    from chestssl.train.evaluate import cross_entropy

    labels = np.array([0, 1, 1, 0, 2])
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
    assert abs(cross_entropy(labels, scores, "multiclass") - log_loss(labels, scores)) < 1e-12
    binary = np.array([0.2, 0.9, 0.6, 0.3])
    assert abs(cross_entropy(np.array([0, 1, 1, 0]), binary, "binary") - log_loss([0, 1, 1, 0], binary)) < 1e-12
