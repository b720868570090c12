"""PneumoniaMNIST (Yang et al., Sci Data 2023) from the MedMNIST npz: local file, official download, md5 check.

A present file whose md5 is not the official one is accepted when its counts match the release (with a warning):
the copy in ``../shared/data`` is such a rebuild. Offline, a missing file is a DataError naming every path searched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from chestssl.data.xray.io import resize_image
from chestssl.data.types import ImageDataset
from chestssl.errors import DataError

logger = logging.getLogger(__name__)

# MedMNIST v3 (Zenodo record 10519652), from MedMNIST/MedMNIST medmnist/info.py; the 28 px file is unchanged since v2
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
PNEUMONIAMNIST_MD5 = {
    28: "28209eda62fecd6e6a2d98b1501bb15f",
    64: "8f4eceb4ccffa70c672198ea285246c6",
    128: "05b46931834c231683c68f40c47b2971",
    224: "d6a3c71de1b945ea11211b03746c1fe1",
}
PNEUMONIAMNIST_COUNTS = {"train": 4708, "val": 524, "test": 624}


def _pneumoniamnist_candidates(data_dir: Path, size: int) -> list[Path]:
    file = "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"
    return [data_dir / "pneumoniamnist" / file, data_dir / file]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_file(url: str, destination: Path, md5: str) -> None:
    """Fetch ``url`` into ``destination`` (temp file, md5 check, then ``os.replace``)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, destination)
    digest = hashlib.md5()
    with tempfile.NamedTemporaryFile(dir=destination.parent, suffix=".part", delete=False) as handle:
        partial = Path(handle.name)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: downloaded file has md5 {digest.hexdigest()}, expected {md5}")
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


_WARNED_MD5: set[tuple[str, str]] = set()  # warn about a rebuilt file once per process, not once per load


def _read_medmnist(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 1, S, S), labels (N,) and split (N,) of a MedMNIST npz, checked against the official release."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err
    expected = [f"{split}_{kind}" for split in PNEUMONIAMNIST_COUNTS for kind in ("images", "labels")]
    missing = [key for key in expected if key not in arrays]
    if missing:
        raise DataError(f"{path}: not a MedMNIST file; missing keys {missing} (has {sorted(arrays)})")
    counts = {split: len(arrays[f"{split}_images"]) for split in PNEUMONIAMNIST_COUNTS}
    official_md5 = PNEUMONIAMNIST_MD5[size]
    actual_md5 = _md5(path)
    if actual_md5 != official_md5:
        if counts != PNEUMONIAMNIST_COUNTS:
            raise DataError(
                f"{path}: md5 {actual_md5} is not the official {official_md5} and the counts {counts} differ from "
                f"the official {PNEUMONIAMNIST_COUNTS}; replace it with the MedMNIST release"
            )
        if (str(path), actual_md5) not in _WARNED_MD5:
            _WARNED_MD5.add((str(path), actual_md5))
            logger.warning(
                "%s: md5 %s differs from the official %s, but the counts match the release %s; using it "
                "(a rebuilt or re-saved copy)", path, actual_md5, official_md5, PNEUMONIAMNIST_COUNTS,
            )
    images, labels, split = [], [], []
    for name in PNEUMONIAMNIST_COUNTS:
        block, block_labels = arrays[f"{name}_images"], arrays[f"{name}_labels"].reshape(-1)
        if block.dtype != np.uint8 or block.shape[1:] != (size, size) or len(block_labels) != len(block):
            raise DataError(
                f"{path}: {name}_images is {block.dtype} {block.shape} with {len(block_labels)} labels; "
                f"expected uint8 (N, {size}, {size}) with N labels"
            )
        images.append(block[:, None])
        labels.append(block_labels.astype(np.int64))
        split.append(np.full(len(block), name))
    labels = np.concatenate(labels)
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: labels must be 0 (normal) or 1 (pneumonia), got {np.unique(labels).tolist()}")
    return np.concatenate(images), labels, np.concatenate(split)


def load_pneumoniamnist(
    data_dir: Path, image_size: int | None, on_error: str, *, download: bool = True
) -> ImageDataset:
    """PneumoniaMNIST (Yang et al., Sci Data 2023) from the MedMNIST npz, official train/val/test split.

    The file for ``image_size`` (28 default; 64, 128, 224) is looked up in ``<data_dir>/pneumoniamnist/`` and
    ``<data_dir>/``, else downloaded into ``<data_dir>/pneumoniamnist/`` and md5-checked. A size with no
    official file (e.g. 32), or an official size that is neither present nor downloadable while a larger
    one is present, is resized from the smallest larger file with a warning. Sizes above 224 are an error.
    """
    size = image_size or 28
    if size > max(PNEUMONIAMNIST_MD5):
        raise DataError(f"pneumoniamnist: no release larger than {max(PNEUMONIAMNIST_MD5)} px (asked {size})")
    source_sizes = [candidate for candidate in sorted(PNEUMONIAMNIST_MD5) if candidate >= size]
    searched = [path for candidate in source_sizes for path in _pneumoniamnist_candidates(data_dir, candidate)]
    local = {candidate: next((p for p in _pneumoniamnist_candidates(data_dir, candidate) if p.is_file()), None)
             for candidate in source_sizes}
    source, path, problem = source_sizes[0], local[source_sizes[0]], "downloading disabled (download=False)"
    if path is None and download:
        target = _pneumoniamnist_candidates(data_dir, source)[0]
        try:
            _download_file(MEDMNIST_URL.format(file=target.name), target, PNEUMONIAMNIST_MD5[source])
            path = target
        except (OSError, DataError) as err:
            problem = f"download failed: {type(err).__name__}: {err}"
    if path is None:
        source, path = next(((s, p) for s, p in local.items() if p is not None), (source, None))
    if path is None:
        raise DataError(
            f"pneumoniamnist: no {size} px file found ({problem}). Searched: {', '.join(map(str, searched))}. "
            f"Fetch {MEDMNIST_URL.format(file=_pneumoniamnist_candidates(data_dir, source)[0].name)} "
            f"(md5 {PNEUMONIAMNIST_MD5[source]}) on a machine with internet, put it in <data>/pneumoniamnist/ "
            f"and point chestssl at <data> with --data-dir or CHESTSSL_DATA"
        )
    images, labels, split = _read_medmnist(path, source)
    if source != size:
        reason = problem if size in PNEUMONIAMNIST_MD5 else "no official release of that size"
        logger.warning(
            "pneumoniamnist: no %d px file (%s); resizing the %d px images of %s", size, reason, source, path
        )
        images = np.stack([resize_image(image[0], size) for image in images])[:, None]
    return ImageDataset(
        images=images, labels=labels, task="binary", class_names=("normal", "pneumonia"), split=split,
        patient_ids=None, name=f"pneumoniamnist-{size}",
    )
