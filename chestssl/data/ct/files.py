"""Which files hold a CT and in which format, and the anonymous ids that CT volumes and cache entries are named by.

Shared by :mod:`chestssl.data.ct.io` (reading), :mod:`chestssl.data.ct.dicom_series` (DICOM series discovery) and
:mod:`chestssl.data.ct.inputs` (finding the inputs of ``prepare-ct``), so that they agree on what is DICOM;
:func:`short_hash` also names the cache entries of :mod:`chestssl.data.ct.lidc` and :mod:`chestssl.data.ct.patches`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # such a file that is not DICOM is corrupt, not ignored
NOT_DICOM_SUFFIXES = (".xml", ".txt", ".json", ".csv", ".md")  # annotations beside a series: not read


def short_hash(text: str) -> str:
    """A 12-hex-digit SHA-256 prefix: a stable id that does not reveal ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def has_dicom_preamble(path: Path) -> bool:
    """The file has the 128-byte preamble and "DICM" marker of a DICOM Part 10 file."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"
