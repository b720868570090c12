"""Where chest data lives, and where derived caches (decoded, resized images) are kept.

Data directory precedence: an explicit argument (``--data-dir``), then ``$CHESTSSL_DATA``, then a per-user
cache folder (``$XDG_CACHE_HOME/chestssl`` or ``~/.cache/chestssl``).

Derived caches: the X-ray loaders (Kermany, NIH ChestX-ray14, a user folder, user DICOMs) keep the decoded,
resized images of a dataset as one ``.npz`` under :func:`cache_dir`, so the next load skips decoding. These are
copies of the (possibly patient) images themselves. The folder is ``$CHESTSSL_CACHE`` if set, else
``$XDG_CACHE_HOME/chestssl/cache``, else ``~/.cache/chestssl/cache``; ``CHESTSSL_CACHE=off`` (or ``0``, ``none``,
``false``, ``no``) switches caching off, so nothing decoded is written to disk. Caches are written atomically (a
temporary file in the same folder, then ``os.replace``) so an interrupted run never leaves a half-written
file under the final name; a cache that cannot be read is ignored and rebuilt. Deleting the folder is safe.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_ENV = "CHESTSSL_DATA"
CACHE_ENV = "CHESTSSL_CACHE"
CACHE_OFF = ("off", "0", "none", "false", "no")  # values of $CHESTSSL_CACHE that switch caching off


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "chestssl"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds the named datasets.

    Args:
        data_dir: an explicit folder (for example from ``--data-dir``); wins when given.

    Returns:
        ``data_dir`` if given, else ``$CHESTSSL_DATA`` if set, else ``$XDG_CACHE_HOME/chestssl`` (or
        ``~/.cache/chestssl``). The path is expanded (``~``) but not required to exist.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return _user_cache_root()


def cache_dir() -> Path | None:
    """The folder for derived caches, or None when caching is off.

    Returns:
        ``$CHESTSSL_CACHE`` if set (None if it is one of :data:`CACHE_OFF`), else ``$XDG_CACHE_HOME/chestssl/cache``
        (or ``~/.cache/chestssl/cache``). The folder is not created here; :func:`save_cached_arrays` creates it
        when it first writes.
    """
    from_env = os.environ.get(CACHE_ENV, "").strip()
    if from_env.lower() in CACHE_OFF:
        return None
    if from_env:
        return Path(from_env).expanduser()
    return _user_cache_root() / "cache"


def load_cached_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is absent or unreadable (a warning says which)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as err:  # any damage means "rebuild", never "crash"
        logger.warning("ignoring unreadable cache %s (%s: %s); it will be rebuilt", path, type(err).__name__, err)
        return None


def save_cached_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` as an uncompressed .npz, atomically.

    Returns:
        True if the cache was written; False (with a warning) if the folder is not writable, so a
        read-only home never stops a load.
    """
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as handle:
            temp_name = handle.name
            np.savez(handle, **arrays)
        os.replace(temp_name, path)
        return True
    except OSError as err:
        logger.warning("could not write cache %s (%s); continuing without it", path, err)
        if temp_name is not None and os.path.exists(temp_name):
            os.unlink(temp_name)
        return False
