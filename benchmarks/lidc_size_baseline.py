"""How far nodule size alone goes on the LIDC-IDRI malignancy benchmark: the AUC of one number per nodule.

Reads the cache written by ``chestssl prepare-lidc`` (``manifest.csv`` for labels and splits, ``nodules.csv`` for
the index's ``diameter_mm`` and the cube's nodule volume from the segmentation) and prints, per split, the AUC of
ranking nodules by each. The diameter and the segmentation come from the radiologists' annotations, so this is a
reference for how much of the task is size, not a model that sees only the image.

    python benchmarks/lidc_size_baseline.py runs/lidc32
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sklearn.metrics import roc_auc_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache_dir", type=Path)
    args = parser.parse_args()
    with (args.cache_dir / "manifest.csv").open(newline="") as stream:
        manifest = {row["id"]: row for row in csv.DictReader(stream) if row["status"] == "ok" and row["label"]}
    with (args.cache_dir / "nodules.csv").open(newline="") as stream:
        nodules = [row for row in csv.DictReader(stream) if row["id"] in manifest]
    print(f"{'split':<6}{'nodules':>8}{'malignant':>10}{'AUC diameter_mm':>17}{'AUC nodule_ml':>15}")
    for split in ("train", "val", "test"):
        rows = [row for row in nodules if manifest[row["id"]]["split"] == split]
        labels = [int(manifest[row["id"]]["label"]) for row in rows]
        aucs = [roc_auc_score(labels, [float(row[key]) for row in rows]) for key in ("diameter_mm", "nodule_ml")]
        print(f"{split:<6}{len(rows):>8}{sum(labels):>10}{aucs[0]:>17.3f}{aucs[1]:>15.3f}")


if __name__ == "__main__":
    main()
