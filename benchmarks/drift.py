"""Robustness under drift: every Kermany-trained model of a benchmark on the Kermany test split, the same images
through 64 px, and the NIH sample (No Finding vs Pneumonia / Consolidation / Infiltration); see
``chestssl.train.drift``. Writes ``drift.csv`` and ``drift.md`` into the benchmark directory.

    python benchmarks/drift.py runs/kermany128 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import logging

from chestssl.train.drift import drift_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark_dir")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = drift_table(args.benchmark_dir, args.data_dir)
    print(path.read_text())


if __name__ == "__main__":
    main()
