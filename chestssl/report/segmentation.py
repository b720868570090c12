"""Pictures of segmentations a person can check: each image with the true and the predicted outlines.

Shapes: ``N`` images, ``S`` spatial (H, W) or (D, H, W); volumes are shown by their middle axial slice.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chestssl.train.evaluate import region_scores  # noqa: E402

COLOURS = ("#00c853", "#2979ff", "#ffab00", "#d500f9", "#00e5ff")  # one per foreground class


def _slice(array: np.ndarray) -> np.ndarray:
    """(H, W) as is; (D, H, W) -> its middle slice along D."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def overlay_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...],
                 path: str | Path, limit: int = 24) -> Path:
    """Write a grid of images with each class's true outline (solid) and predicted outline (dashed).

    Args:
        images: uint8 (N, 1, *S) or float (N, 1, *S) inputs as stored.
        labels, predicted: (N, *S) class-index maps.
        class_names: K names, background first.
        path: the PNG to write.
        limit: at most this many images, evenly spaced over N.

    Each panel is titled by its position in the split and its mean foreground Dice (never by a file name or a
    patient id).
    """
    count = len(images)
    chosen = np.unique(np.linspace(0, count - 1, min(limit, count)).round().astype(int))
    dice = np.nanmean(np.stack([scores[0] for name, scores in
                                region_scores(labels[chosen], predicted[chosen], len(class_names)).items()]), axis=0)
    columns = min(6, len(chosen))
    rows = -(-len(chosen) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index, score in zip(axes.flat, chosen, dice):
        axis.imshow(_slice(np.asarray(images[index][0], dtype=np.float32)), cmap="gray")
        for k in range(1, len(class_names)):
            colour = COLOURS[(k - 1) % len(COLOURS)]
            for maps, style in ((labels, "solid"), (predicted, "dashed")):
                region = (_slice(maps[index]) == k).astype(np.float32)
                if region.any():
                    axis.contour(region, levels=[0.5], colors=[colour], linewidths=0.9, linestyles=style)
        axis.set_title(f"#{index}  Dice {score:.3f}", fontsize=8)
    handles = [plt.Line2D([], [], color=COLOURS[(k - 1) % len(COLOURS)], label=class_names[k])
               for k in range(1, len(class_names))]
    handles += [plt.Line2D([], [], color="k", label="truth"), plt.Line2D([], [], color="k", ls="--", label="prediction")]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
