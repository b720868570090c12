"""Lung-mask overlays and timings on the real chest CTs of the shared data folder.

Writes one PNG per volume (axial, coronal and sagittal slices through the middle of the mask, the
mask in red) into the output folder, and prints per volume the lung volume in litres, the number
of connected mask components and the time ``lung_mask`` took (best of ``--repeats`` runs).

    python benchmarks/lung_mask_overlays.py runs/lung_overlays [--data ../shared/data] [--repeats 3]

The data root is ``--data``, else ``$CHESTSSL_DATA``, else ``/work/shared/data``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from chestssl.data.ct.io import CTVolume, read_ct  # noqa: E402
from chestssl.data.ct.lung_mask import lung_mask  # noqa: E402

VOLUMES = {
    "lung1": "ct/pyradiomics/lung1_image.nrrd",
    "lung2": "ct/pyradiomics/lung2_image.nrrd",
    "lung_pet_ct_dx_A0001": "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2",
    "totalseg_aorta_crop": "ct/totalsegmentator/aorta_report_ct_cropped.nii.gz",
    "totalseg_pulmonary_crop": "ct/totalsegmentator/pulmonary_report_ct_cropped.nii.gz",
    "totalseg_abdomen": "ct/totalsegmentator/abdomen_ct_dicom",  # lung bases at most: expect ~0 L
}


def save_overlay(volume: CTVolume, mask: np.ndarray, title: str, path: Path) -> None:
    """Axial, coronal and sagittal slices through the middle of the mask, mask in red."""
    hu, (dz, dy, dx) = volume.hu, volume.spacing
    centre = [int(round(c)) for c in ndi.center_of_mass(mask)] if mask.any() else [n // 2 for n in hu.shape]
    views = [  # (image, mask, aspect, label): arrays shown with superior up, anterior up in axial
        (hu[centre[0]], mask[centre[0]], dy / dx, f"axial z={centre[0]}"),
        (hu[::-1, centre[1]], mask[::-1, centre[1]], dz / dx, f"coronal y={centre[1]}"),
        (hu[::-1, :, centre[2]], mask[::-1, :, centre[2]], dz / dy, f"sagittal x={centre[2]}"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for axis, (image, overlay, aspect, label) in zip(axes, views):
        axis.imshow(image, cmap="gray", vmin=-1000, vmax=200, aspect=aspect, interpolation="nearest")
        axis.imshow(np.ma.masked_where(~overlay, overlay), cmap="autumn", alpha=0.35, aspect=aspect,
                    interpolation="nearest")
        if overlay.any():
            axis.contour(overlay, levels=[0.5], colors="red", linewidths=0.7)
        axis.set_title(label)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder for the PNG overlays")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CHESTSSL_DATA", "/work/shared/data")))
    parser.add_argument("--repeats", type=int, default=3, help="time lung_mask this many times, report the best")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)

    print(f"{'volume':26s} {'shape (z, y, x)':18s} {'spacing mm':20s} {'mask s':>7s} {'lungs L':>8s} "
          f"{'comps':>5s}  component litres")
    for name, relative in VOLUMES.items():
        volume = read_ct(args.data / relative)
        seconds = []
        for repeat in range(max(1, args.repeats)):
            logging.getLogger("chestssl").setLevel(logging.INFO if repeat == 0 else logging.WARNING)
            start = time.perf_counter()
            mask = lung_mask(volume.hu, volume.spacing)
            seconds.append(time.perf_counter() - start)
        voxel_litres = float(np.prod(volume.spacing)) / 1e6
        labels, count = ndi.label(mask)
        litres = np.sort(np.bincount(labels.ravel())[1:])[::-1] * voxel_litres
        spacing = "x".join(f"{s:.2f}" for s in volume.spacing)
        print(f"{name:26s} {str(volume.hu.shape):18s} {spacing:20s} {min(seconds):7.2f} "
              f"{mask.sum() * voxel_litres:8.2f} {count:5d}  {np.round(litres, 2).tolist()}")
        title = f"{name}: {mask.sum() * voxel_litres:.2f} L, {count} component(s)"
        save_overlay(volume, mask, title, args.output / f"{name}.png")


if __name__ == "__main__":
    main()
