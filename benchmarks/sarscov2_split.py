"""What the two splits of the SARS-CoV-2 CT slices hold: slices and runs (pseudo-patients) per split and class for
the run-level split (``sarscov2-ct``), and how many test slices of the slice-level split (``sarscov2-ct-slices``)
have a slice of the same run in its training (or validation) split, i.e. how much that split leaks.

    python benchmarks/sarscov2_split.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np

from chestssl.data.datasets import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    runs = load_dataset("sarscov2-ct", args.data_dir)
    slices = load_dataset("sarscov2-ct-slices", args.data_dir)
    print("run-level split (sarscov2-ct):")
    for split in ("train", "val", "test"):
        members = runs.split == split
        per_class = ", ".join(
            f"{name} {np.sum(members & (runs.labels == label))} slices / "
            f"{len(np.unique(runs.patient_ids[members & (runs.labels == label)]))} runs"
            for label, name in enumerate(runs.class_names))
        print(f"  {split:5s} {members.sum():5d} slices, {len(np.unique(runs.patient_ids[members]))} runs ({per_class})")
    # the slice-level split holds the same images in the same order, so the run ids of sarscov2-ct apply to it
    if not np.array_equal(runs.labels, slices.labels):
        raise SystemExit("sarscov2-ct and sarscov2-ct-slices list the slices in different orders")
    test = slices.split == "test"
    print(f"slice-level split (sarscov2-ct-slices): train {np.sum(slices.split == 'train')}, "
          f"val {np.sum(slices.split == 'val')}, test {test.sum()} slices")
    for fitted in (("train",), ("train", "val")):
        seen = set(runs.patient_ids[np.isin(slices.split, fitted)])
        leaked = np.array([run in seen for run in runs.patient_ids[test]])
        print(f"  {leaked.sum()} of its {test.sum()} test slices ({leaked.mean():.1%}) come from a run with slices "
              f"in its {' or '.join(fitted)} split")

if __name__ == "__main__":
    main()
