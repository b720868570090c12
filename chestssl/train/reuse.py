"""When a finished run may be reused, and the record of where a result was computed.

A finished run (``results.json``) is reused only when the config that made it is the one asked for now, apart
from the settings that only say where and how often a run writes; otherwise the run stops and names the
settings that changed, or, on request (``overwrite=true``), its outputs are removed and it runs again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from chestssl.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
RUN_OUTPUTS = ("results.json", "checkpoint.safetensors", "best.safetensors", "model.safetensors", "model.json",
               "metrics.jsonl")


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): values}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting (nested keys dotted) that differs between two identities."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}"
            for key in sorted(set(before) | set(after)) if before.get(key, "<absent>") != after.get(key, "<absent>")]


def narrowed_to(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` (a stored identity) without the settings sections (dicts) that ``new`` leaves out of its config as
    unused: identities written before runs left them out hold every method's section, and a section the run does
    not read cannot make a stored state or result another run's. Plain settings are kept, so they still count."""
    old_config, new_config = old.get("config"), new.get("config")
    if not (isinstance(old_config, dict) and isinstance(new_config, dict)):
        return old
    kept = {key: value for key, value in old_config.items() if key in new_config or not isinstance(value, dict)}
    return {**old, "config": kept}


def check_reusable(run_dir: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The finished result of ``run_dir`` if it was made with ``identity``; None if there is none (or it was
    removed because ``overwrite``); ConfigError naming the changed settings otherwise."""
    path = Path(run_dir) / RESULTS_NAME
    if not path.exists():
        return None
    finished = json.loads(path.read_text())
    old = narrowed_to(finished.pop("identity", None) or {}, identity)
    if old == identity:
        return finished
    if overwrite:
        log.warning("%s finished with other settings; overwrite=true: removing its outputs and running again", run_dir)
        for name in RUN_OUTPUTS:
            (Path(run_dir) / name).unlink(missing_ok=True)
        return None
    changes = changed_settings(old, identity)
    shown = "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else "")
    raise ConfigError(f"{run_dir} already holds a finished run made with other settings ({shown}); "
                      "use another run_dir, or overwrite=true to run it again")


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the chestssl checkout (with ``-dirty`` for uncommitted changes), else the package version."""
    from chestssl import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "chestssl"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"chestssl-{__version__}"


def environment(device: torch.device) -> dict[str, Any]:
    """Where a result was computed: code version, library versions, device and threads (one results row each)."""
    import monai

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"code_version": code_version(), "torch": torch.__version__, "monai": monai.__version__,
            "device": f"{device.type}:{name}", "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
