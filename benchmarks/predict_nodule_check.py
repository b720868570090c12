"""``predict``'s nodule recipe on real LIDC VOIs gives exactly the cubes ``prepare-lidc`` cached for training.

For the first ``--limit`` built nodules of a ``prepare-lidc`` cache, each VOI and its nodule mask (as a user would
list them in a predict CSV) is prepared by :func:`chestssl.predict.prepare.prepare` with the cache's own
preprocessing record, and compared with the cached cube (the training input). Printed: the largest absolute
difference over all voxels.

    python benchmarks/predict_nodule_check.py runs/lidc32 --limit 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chestssl.data.ct.cache import PREPROCESSING, load_volume, read_manifest
from chestssl.data.ct.lidc import IMAGES, MASKS, lidc_folder
from chestssl.predict.inputs import Input
from chestssl.predict.prepare import prepare, recipe_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="a prepare-lidc cache")
    parser.add_argument("--data-dir", help="the data directory holding lidc-nodules/ (else $CHESTSSL_DATA)")
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    cache = Path(args.cache)
    record = {**json.loads((cache / PREPROCESSING).read_text()), "normalisation": {"mean": 0.5, "std": 0.25}}
    recipe = recipe_of({"preprocessing": record}, str(cache))
    root = lidc_folder(args.data_dir)
    rows = [r for r in read_manifest(cache) if r["status"] == "ok" and r["source"].startswith(IMAGES)][: args.limit]
    worst = 0.0
    for row in rows:
        name = row["source"].removeprefix(IMAGES + "/")
        item = Input(row["id"], name, root / IMAGES / name, mask=root / MASKS / name)
        cube = prepare(item, recipe).pixels
        cached, _ = load_volume(cache / row["file"])
        worst = max(worst, float(np.abs(cube - cached).max()))
    print(f"{len(rows)} LIDC nodules ({recipe.size}^3 at {record['spacing_mm']} mm): max |predict cube - cached cube| "
          f"= {worst:.3g}")


if __name__ == "__main__":
    main()
