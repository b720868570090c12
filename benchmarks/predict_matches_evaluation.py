"""Check that ``chestssl predict`` on a dataset's test files gives the probabilities fine-tuning evaluated them at.

For a model fine-tuned on a file-based X-ray dataset (``kermany`` or ``folder``), the test split is loaded as the
fine-tuning run loaded it (its saved ``config.yaml``) and scored by the task's evaluation; the same test files,
named by their paths, go through ``predict`` (decoding, resizing and normalisation as recorded in the model).
Printed: the largest absolute difference and the AUC of both. With ``--out`` the predictions, heat maps and
report are written there as ``chestssl predict`` writes them.

    python benchmarks/predict_matches_evaluation.py -m runs/kermany64/frac0.1_seed0 --out runs/kermany64_predict
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from chestssl.data.batch import Batches, xray_preprocessing
from chestssl.data.datasets import load_labelled
from chestssl.data.paths import resolve_data_dir
from chestssl.predict import load_model, predict_to_folder
from chestssl.train.tasks import load_model as load_task_model

ROOTS = {"kermany": "kermany-224"}


def test_paths(config: dict) -> list[Path]:
    """The test split's files in the order the dataset loader keeps them (the CSV's order)."""
    if config["dataset"] in ROOTS:
        root = resolve_data_dir(config.get("data_dir")) / ROOTS[config["dataset"]]
        csv_path = root / "labels.csv"
    elif config["dataset"] == "folder":
        root = Path(config["dataset_root"])
        csv_path = Path(config["labels_csv"]) if config.get("labels_csv") else root / "labels.csv"
    else:
        raise SystemExit(f"dataset {config['dataset']!r}: this check needs a file-based dataset (kermany, folder)")
    with open(csv_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not any(row.get("split") == "test" for row in rows):
        raise SystemExit(f"{csv_path} has no official test split: the generated one cannot be listed by path here")
    return [root / row["path"] for row in rows if row.get("split") == "test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="a fine-tuning run directory")
    parser.add_argument("--out", help="also write chestssl predict's outputs (with heat maps) here")
    parser.add_argument("--heatmaps", type=int, default=24, help="with --out: heat maps for the first N test images")
    args = parser.parse_args()

    config = yaml.safe_load(open(Path(args.model) / "config.yaml"))
    loaded = load_task_model(args.model, "cpu")
    size = int(loaded.preprocessing["image_size"])
    data = load_labelled(config["dataset"], config.get("data_dir"), size, config["split_seed"],
                         xray_preprocessing(size, loaded.normalisation), root=config.get("dataset_root"),
                         labels_csv=config.get("labels_csv"))
    evaluated = loaded.task.scores(loaded.module, Batches(data.test.inputs, None, 256, loaded.normalisation, (),
                                                           False, False))
    paths = test_paths(config)
    if len(paths) != len(evaluated):
        raise SystemExit(f"{len(paths)} test files listed but {len(evaluated)} evaluated (unreadable files skipped?)")
    predictions = load_model(args.model, "cpu").predict(paths)
    failed = [p for p in predictions if p.status != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} test files failed in predict, e.g. {failed[0].source}: {failed[0].reason}")
    positive = loaded.task.class_names[-1]
    predicted = np.array([p.probabilities[positive] for p in predictions])
    labels = data.test.labels
    print(f"{len(paths)} test images of {config['dataset']} at {size} px: max |predict - evaluation| = "
          f"{np.abs(predicted - evaluated).max():.3g}; test AUC evaluation {roc_auc_score(labels, evaluated):.4f}, "
          f"predict {roc_auc_score(labels, predicted):.4f}")
    if args.out:
        predict_to_folder(args.model, [str(p) for p in paths[: args.heatmaps]], args.out, heatmap=True, device="cpu")
        print(f"heat maps of the first {args.heatmaps} test images: {args.out}/heatmaps")


if __name__ == "__main__":
    main()
