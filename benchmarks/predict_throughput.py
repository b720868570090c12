"""Prediction throughput: the whole path (read, preprocess, model) against the model alone, with and without heat maps.

For a fine-tuned model (its run directory) and real inputs (X-ray files or CT scans), in alternating rounds so
machine drift reaches all alike:

- ``whole``: ``Predictor.predict(paths)`` - decoding, preprocessing as recorded in the model, the model;
- ``model``: the model alone on the already prepared pixels (batches of ``--batch-size``);
- ``prepare``: the preprocessing alone;
- ``heatmap``: the whole path with saliency maps (Grad-CAM for a ResNet, occlusion for a ViT) in the input's
  own geometry.

Printed: inputs/s of each (median over rounds, min-max) and the ratio model-only / whole path. The target for
X-rays: preprocessing does not dominate, i.e. the model alone is within 2x of the whole path.

    python benchmarks/predict_throughput.py -m runs/kermany128/resnet18-scratch/frac0.1_seed0 \\
        -i ../shared/data/kermany-224/test --limit 64
    python benchmarks/predict_throughput.py -m RUN_OF_A_CT_MODEL -i CT_FILES_OR_FOLDERS --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from chestssl.predict import load_model
from chestssl.predict.prepare import Prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="a fine-tuning run directory")
    parser.add_argument("-i", "--inputs", nargs="+", required=True, help="files, folders or a CSV")
    parser.add_argument("--limit", type=int, default=64, help="inputs used (the first N found)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    predictor = load_model(args.model, args.device)
    inputs = predictor.inputs(args.inputs)[: args.limit]
    paths = [item.source if not item.series else item.path for item in inputs]
    prepared = [p for p in predictor.prepare_all(inputs) if isinstance(p, Prepared)]
    if len(prepared) < len(inputs):
        print(f"{len(inputs) - len(prepared)} of {len(inputs)} inputs could not be prepared; timing the rest")
    pixels = np.stack([p.pixels for p in prepared])

    def whole() -> None:
        predictor.predict(paths, batch_size=args.batch_size)

    def model() -> None:
        for start in range(0, len(pixels), args.batch_size):
            predictor.probabilities(pixels[start : start + args.batch_size])

    def prepare() -> None:
        predictor.prepare_all(inputs)

    def heatmap() -> None:
        predictor.predict(paths, heatmap=True, batch_size=args.batch_size)

    timers = {"whole": whole, "model": model, "prepare": prepare, "heatmap": heatmap}
    model()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in timers}
    for round_index in range(args.rounds):
        order = list(timers) if round_index % 2 == 0 else list(timers)[::-1]
        for name in order:
            start = time.perf_counter()
            timers[name]()
            rates[name].append(len(prepared) / (time.perf_counter() - start))
    print(f"model {args.model}: {predictor.recipe.kind} {predictor.recipe.size}px, encoder "
          f"{predictor.loaded.meta['encoder']['kind']}; {len(prepared)} inputs; {args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, device {args.device}")
    for name, values in rates.items():
        print(f"  {name:8s} {statistics.median(values):9.2f} inputs/s  (min {min(values):.2f}, max {max(values):.2f})")
    ratio = [m / w for m, w in zip(rates["model"], rates["whole"])]
    print(f"  model-only / whole path: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, max {max(ratio):.2f})")


if __name__ == "__main__":
    main()
