"""Where chest data lives, and where derived caches (decoded, resized images) are kept.

Data directory precedence: an explicit argument (``--data-dir``), then ``$CHESTSSL_DATA``, then a per-user
cache folder (``$XDG_CACHE_HOME/chestssl`` or ``~/.cache/chestssl``). Caches are written atomically (a
temporary file in the same folder, then ``os.replace``) so an interrupted run never leaves a half-written
file under the final name; a cache that cannot be read is ignored and rebuilt.
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


def cache_dir() -> Path:
    """The folder for derived caches: ``$CHESTSSL_CACHE`` if set, else ``~/.cache/chestssl/cache``.

    The folder is not created here; :func:`save_cached_arrays` creates it when it first writes.
    """
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "chestssl" / "cache"


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
