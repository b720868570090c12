"""Robustness under drift, as SPCXR reports it: Kermany-trained pneumonia models, unchanged, on shifted test sets.

Three test sets side by side for every fine-tuned model of a benchmark:

- ``in-distribution``: the Kermany test split at the model's own size;
- ``resolution``: the same images taken down to 64 px and back up (the NIH sample's resolution), so the part of
  a drop caused by resolution alone shows;
- ``external``: the NIH ChestX-ray14 sample (adults, another hospital, 64 px brought up to the model's size):
  "No Finding" images as normal against those labelled Pneumonia, Consolidation or Infiltration as pneumonia
  (images with only other findings left out). No NIH image may be in the models' pretraining: leave nih-cxr14
  out of its sources (:func:`drift_table` refuses a benchmark whose pretraining pooled it).

Shapes: ``N`` images, ``S`` the model's side.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from chestssl.data.batch import Batches
from chestssl.data.datasets import load_dataset
from chestssl.data.splits import load_splits
from chestssl.data.xray.io import resize_image
from chestssl.data.xray.sources import NIH_FINDINGS
from chestssl.errors import DataError
from chestssl.report.tables import BASELINES, paired_differences, paired_table
from chestssl.train.evaluate import classification_metrics
from chestssl.train.tasks import load_model

log = logging.getLogger(__name__)

PNEUMONIA_FINDINGS = ("Pneumonia", "Consolidation", "Infiltration")
LOW_RESOLUTION = 64  # the NIH sample's side
SETS = ("in-distribution", "resolution", "external")
PAIRED_METRICS = [("auc_external", "AUC external"), ("auc_lost", "AUC lost")]  # seed by seed against scratch


def nih_pneumonia(data_dir: str | Path | None, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NIH sample images (N, 1, S, S) and labels (N,): 0 "No Finding", 1 any of :data:`PNEUMONIA_FINDINGS`."""
    nih = load_dataset("nih-cxr14", data_dir, image_size=image_size)
    columns = [NIH_FINDINGS.index(name) for name in PNEUMONIA_FINDINGS]
    pneumonia = nih.labels[:, columns].max(axis=1) == 1
    normal = nih.labels.sum(axis=1) == 0
    keep = np.flatnonzero(pneumonia | normal)
    return nih.images[keep], pneumonia[keep].astype(np.int64)


def through_low_resolution(images: np.ndarray, low: int = LOW_RESOLUTION) -> np.ndarray:
    """Each image (N, 1, S, S) taken down to ``low`` px and back up to S (antialiased bilinear both ways)."""
    side = images.shape[-1]
    return np.stack([resize_image(resize_image(image[0], low), side) for image in images])[:, None]


def drift_sets(data_dir: str | Path | None, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three test sets of the module docstring at ``image_size``: name -> (images, labels)."""
    test = load_splits("kermany", data_dir, image_size)["test"]
    return {"in-distribution": (test.images, test.labels),
            "resolution": (through_low_resolution(test.images), test.labels),
            "external": nih_pneumonia(data_dir, image_size)}


@torch.no_grad()
def evaluate_on(model_path: str | Path, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Test metrics of one fine-tuned binary model (its run directory or model file) on every set."""
    loaded = load_model(model_path)
    if loaded.task.name != "classification" or loaded.task.label_kind != "binary":
        raise DataError(f"{model_path}: drift is measured for binary pneumonia classifiers, not {loaded.task.name} "
                        f"({loaded.task.label_kind})")
    size = int(loaded.preprocessing["image_size"])
    results = {}
    for name, (images, labels) in sets.items():
        if images.shape[-1] != size:
            raise DataError(f"{model_path}: the model takes {size} px images, the {name} set is {images.shape[-1]} px")
        batches = Batches(images, None, 256, loaded.normalisation, (), False, False)
        results[name] = classification_metrics(labels, loaded.task.scores(loaded.module, batches), "binary")
    return results


def drift_table(benchmark_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Evaluate every finished run of a Kermany benchmark on the three sets; write ``drift.csv`` (one row per run
    and set) and ``drift.md`` (mean ± std over seeds per init and fraction, and the AUC lost); returns drift.md."""
    benchmark_dir = Path(benchmark_dir)
    results_path = benchmark_dir / "results.csv"
    if not results_path.is_file():
        raise DataError(f"{benchmark_dir} has no results.csv: not a benchmark run directory")
    saved = benchmark_dir / "config.yaml"
    sources = (yaml.safe_load(saved.read_text()) or {}).get("pretrain", {}).get("sources", []) if saved.is_file() else []
    with results_path.open(newline="") as stream:
        runs = list(csv.DictReader(stream))
    pretrained = sorted({run["init"] for run in runs if run["init"] not in ("resnet18-scratch", "vit-scratch")})
    if "nih-cxr14" in sources and pretrained:
        raise DataError(f"{saved}: the pretraining of {pretrained} pooled nih-cxr14, the external test set of the "
                        "drift evaluation; pretrain without it (the external hospital must be unseen)")
    cache: dict[int, dict] = {}
    rows = []
    for run in runs:
        run_dir = Path(run["run_dir"])
        for name, values in evaluate_on(run_dir, _sets_for(run_dir, data_dir, cache)).items():
            rows.append({"init": run["init"], "label_fraction": run["label_fraction"], "seed": run["seed"], "set": name,
                         **{f"test_{k}": v for k, v in values.items()}})
        log.info("drift: %s done", run_dir)
    with (benchmark_dir / "drift.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_drift_markdown(benchmark_dir / "drift.md", rows)


def _sets_for(run_dir: Path, data_dir: str | Path | None, cache: dict[int, dict]) -> dict:
    """The three sets at the size of the run's model, made once per size."""
    size = int(json.loads((run_dir / "model.json").read_text())["preprocessing"]["image_size"])
    if size not in cache:
        cache[size] = drift_sets(data_dir, size)
    return cache[size]


def write_drift_markdown(path: Path, rows: list[dict]) -> Path:
    """Per init and fraction, AUC and balanced accuracy on each set (mean ± std over seeds) and the AUC lost to the
    external set; then that loss paired seed by seed with each scratch baseline the grid has (a seed draws the same
    labelled images for every init, so a pair differs in the initialisation alone). ``rows``: one per run and set."""
    runs: dict[tuple[str, float, int], dict[str, dict]] = defaultdict(dict)  # (init, fraction, seed) -> set -> row
    for row in rows:
        runs[(row["init"], float(row["label_fraction"]), int(row["seed"]))][row["set"]] = row
    per_run = [{"init": init, "label_fraction": fraction, "seed": seed,
                **{f"{metric}_{name}": float(sets[name][f"test_{metric}"])
                   for name in SETS for metric in ("auc", "balanced_accuracy")},
                "auc_lost": float(sets["in-distribution"]["test_auc"]) - float(sets["external"]["test_auc"])}
               for (init, fraction, seed), sets in sorted(runs.items())]
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in per_run:
        groups[(run["init"], run["label_fraction"])].append(run)

    def cell(members: list[dict], key: str) -> str:
        values = [run[key] for run in members]
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{np.mean(values):.3f}"

    columns = [f"auc_{name}" for name in SETS] + ["auc_lost"] + [f"balanced_accuracy_{name}" for name in SETS]
    lines = ["| labels | init | seeds | AUC in-distribution | AUC resolution only | AUC external (NIH) | AUC lost (external) "
             "| Bal. acc in-distribution | Bal. acc resolution only | Bal. acc external |", "|---" * 10 + "|"]
    order = sorted(groups, key=lambda key: (key[1], key[0]))
    for init, fraction in order:
        members = groups[(init, fraction)]
        cells = [f"{fraction:.0%}", init, str(len(members))] + [cell(members, key) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    budgets = [{"init": init, "label_fraction": fraction, "by_count": False} for init, fraction in order]
    paired = [(baseline, paired_differences(per_run, budgets, baseline, PAIRED_METRICS, {"auc_lost"}))
              for baseline in BASELINES]
    paired_sections = "".join(f"\n## Against {baseline}, seed by seed\n\nNegative AUC lost: the init loses less AUC "
                              f"to the external set than {baseline} with the same labelled images.\n\n"
                              f"{paired_table(items, PAIRED_METRICS, baseline)}\n" for baseline, items in paired if items)
    path.write_text("# Robustness under drift\n\nKermany-trained models, unchanged. Resolution only: the Kermany test "
                    f"images through {LOW_RESOLUTION} px. External: NIH ChestX-ray14 sample, No Finding vs "
                    f"{' / '.join(PNEUMONIA_FINDINGS)}. AUC lost: in-distribution minus external, per run.\n\n"
                    + "\n".join(lines) + "\n" + paired_sections)
    return path
