"""Time the prepare-ct per-volume path against a common reference recipe, on the real 512x512xN chest CTs.

chestssl: ``read_ct`` → :func:`~chestssl.data.ct.preprocess.preprocess_volume` (anti-aliased SimpleITK
resampling to 1.5 mm, lung mask, crop, HU window, resize to the cube) → ``save_volume``; the best of
``--repeats`` runs. Reference: ``read_ct`` → ``scipy.ndimage.zoom(order=3)`` to isotropic 1 mm → HU clip
to the window (scaled to [0, 1]) → ``zoom(order=3)`` to the cube; timed once (it is slow). Both are
measured in this run, one process, on whatever else the machine is doing (load average printed).

    python benchmarks/prepare_ct_speed.py [--data ../shared/data] [--size 64] [--repeats 3]

The data root is ``--data``, else ``$CHESTSSL_DATA``, else ``/work/shared/data``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from chestssl.data.ct.io import read_ct
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume
from chestssl.data.ct.cache import save_volume

VOLUMES = {
    "lung1 (NRRD)": "ct/pyradiomics/lung1_image.nrrd",
    "lung2 (NRRD)": "ct/pyradiomics/lung2_image.nrrd",
    "Lung_Dx-A0001 (DICOM)": "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2",
}


def chestssl_path(path: Path, config: PrepareCTConfig, output: Path) -> tuple[float, float, np.ndarray]:
    """(seconds in all, seconds reading, image) for the prepare-ct per-volume path."""
    start = time.perf_counter()
    volume = read_ct(path)
    read_seconds = time.perf_counter() - start
    image, lung, _ = preprocess_volume(volume, config)
    save_volume(output, image, lung)
    return time.perf_counter() - start, read_seconds, image


def reference_path(path: Path, config: PrepareCTConfig) -> tuple[float, np.ndarray]:
    """(seconds, image) for read → cubic zoom to 1 mm → HU clip → cubic zoom to the cube."""
    start = time.perf_counter()
    volume = read_ct(path)
    iso = ndi.zoom(volume.hu.astype(np.float32), [s / 1.0 for s in volume.spacing], order=3)  # (z, y, x) at 1 mm
    windowed = (np.clip(iso, config.hu_low, config.hu_high) - config.hu_low) / (config.hu_high - config.hu_low)
    cube = ndi.zoom(windowed, [config.size / n for n in windowed.shape], order=3)
    return time.perf_counter() - start, cube


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CHESTSSL_DATA", "/work/shared/data")))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="chestssl runs per volume; the best is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = PrepareCTConfig(size=args.size)

    print(f"cpus {os.cpu_count()}, SimpleITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}, "
          f"load average {os.getloadavg()[0]:.1f}, cube {args.size}^3, spacing {config.spacing_mm} mm")
    print(f"{'volume':24s} {'shape (z, y, x)':16s} {'read s':>7s} {'chestssl s':>11s} {'reference s':>12s} "
          f"{'speed-up':>9s}")
    ratios = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, relative in VOLUMES.items():
            path = args.data / relative
            runs = [chestssl_path(path, config, Path(scratch) / "volume.npz") for _ in range(max(1, args.repeats))]
            seconds, read_seconds, image = min(runs, key=lambda run: run[0])
            reference_seconds, cube = reference_path(path, config)
            assert image.shape == cube.shape == (args.size,) * 3
            ratios.append(reference_seconds / seconds)
            shape = "x".join(str(n) for n in read_ct(path).hu.shape)
            print(f"{name:24s} {shape:16s} {read_seconds:7.2f} {seconds:11.2f} {reference_seconds:12.2f} "
                  f"{ratios[-1]:8.1f}x")
    print(f"geometric mean speed-up {np.exp(np.mean(np.log(ratios))):.1f}x")


if __name__ == "__main__":
    main()
