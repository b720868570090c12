"""Unlabelled chest X-rays for self-supervised pretraining, pooled from several sources.

Shapes: ``N`` images, ``S`` the side of the square images.

Held-out images must never be pretrained on: the Kermany test split *is* the PneumoniaMNIST test set, so
``exclude_splits=("test",)`` (the default) drops it along with every other source's test split. The lung
segmentation sets are sources twice: ``cxr-lungseg`` and ``cxr-lungseg-covid`` without their (fixed) test
splits, for pretraining before a segmentation benchmark; ``cxr-lungseg-all``, every image of both (114), for
pools whose models are never tested on them (the PneumoniaMNIST benchmark's pretraining).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chestssl.data.datasets import DATASETS, load_dataset
from chestssl.data.xray.io import read_xrays, resize_image
from chestssl.data.paths import resolve_data_dir
from chestssl.data.types import ImageDataset
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

LUNGSEG = "cxr-lungseg"
LUNGSEG_ALL = "cxr-lungseg-all"  # both segmentation sets whole, their test images included
# every named dataset that needs no options; not the slice-level split of sarscov2-ct, whose training split holds
# slices of sarscov2-ct's test patients
SOURCES = tuple(name for name in DATASETS if name not in ("folder", "dicom", "sarscov2-ct-slices")) + (LUNGSEG_ALL,)


def _load_lungseg(data_dir: Path, image_size: int) -> np.ndarray:
    """The 72 Montgomery/Shenzhen images (not their masks) and the 42 COVID-19 images: (114, S, S) uint8.

    The ``cxr-lungseg-all`` source: every image, the segmentation test splits included, so a pool holding it
    must not be pretrained on before a segmentation benchmark (the benchmark refuses it).
    """
    folder = data_dir / LUNGSEG / "montgomery-shenzhen" / "images_512"
    pairs = data_dir / LUNGSEG / "covid" / "pairs_256.npz"
    files = sorted(folder.glob("*.png"))
    if not files:
        raise DataError(f"{LUNGSEG}: no PNG images in {folder}")
    montgomery_shenzhen, _ = read_xrays(files, image_size, "raise")  # 72 files: fast enough without a cache
    try:
        with np.load(pairs, allow_pickle=False) as archive:
            covid = archive["images"]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{pairs}: cannot read its 'images' array ({type(err).__name__}: {err})") from err
    if covid.dtype != np.uint8 or covid.ndim != 3:
        raise DataError(f"{pairs}: 'images' is {covid.dtype} {covid.shape}; expected uint8 (N, H, W)")
    covid = np.stack([resize_image(image, image_size) for image in covid])
    return np.concatenate([montgomery_shenzhen, covid])


def load_unlabelled(
    sources: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    exclude_splits: Sequence[str] = ("test",),
) -> ImageDataset:
    """Pool the images of several sources for pretraining, without their labels.

    Args:
        sources: names from ``DATASETS`` that need no options (pneumoniamnist, kermany, nih-cxr14) and/or
            the segmentation sets: "cxr-lungseg", "cxr-lungseg-covid" (their test splits dropped as any
            other's) or "cxr-lungseg-all" (every image of both, for pools never tested on them).
        data_dir: folder holding the datasets; see :func:`~chestssl.data.paths.resolve_data_dir`.
        image_size: side S of the pooled images.
        exclude_splits: official splits to drop from every source (default the test splits). Sources with
            no official split (nih-cxr14, cxr-lungseg-all) are kept whole: if you evaluate on a split you make of
            them later, leave them out of the pretraining pool.

    Returns:
        images (N, 1, S, S) uint8, labels -1 (N,), task "binary" with no class names, each image's source
        split ("" where a source has none), patient_ids None (ids of different sources are not comparable).
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    valid = list(SOURCES)
    unknown = [source for source in sources if source not in valid]
    if unknown or not sources:
        raise ValueError(f"unknown or no unlabelled source(s) {list(unknown)}; valid names: {', '.join(valid)}")
    root = resolve_data_dir(data_dir)
    images, splits = [], []
    for source in sources:
        if source == LUNGSEG_ALL:
            block = _load_lungseg(root, image_size)
            images.append(block[:, None])
            splits.append(np.full(len(block), "", dtype=str))
        else:
            dataset = load_dataset(source, root, image_size=image_size)
            keep = ~np.isin(dataset.split, list(exclude_splits))
            images.append(dataset.images[keep])
            splits.append(dataset.split[keep])
            logger.info("%s: %d images for pretraining (%d in %s dropped)", source, keep.sum(), (~keep).sum(),
                        list(exclude_splits))
    pooled = np.concatenate(images)
    return ImageDataset(
        images=pooled, labels=np.full(len(pooled), -1, dtype=np.int64), task="binary", class_names=(),
        split=np.concatenate(splits), patient_ids=None, name="unlabelled:" + "+".join(sources),
    )
