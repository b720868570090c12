"""Checkpoints as safetensors plus JSON metadata: no pickle, so loading a file never executes code.

A training checkpoint holds the method's weights, the optimiser state and the loop position; an encoder file
holds only the encoder's weights with its architecture and the preprocessing its inputs went through
(SparK/MAE hand-off: fine-tuning refuses an encoder whose preprocessing does not match its data).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chestssl.errors import CheckpointError
from chestssl.models.encoders import build_encoder, parse_architecture, record_of
from chestssl.train.reuse import changed_settings, narrowed_to

FORMAT = "chestssl-checkpoint-1"
ENCODER_FORMAT = "chestssl-encoder-2"  # version 2: the architecture record of chestssl.models.encoders
MODEL_FORMAT = "chestssl-model-1"  # a fine-tuned model: encoder, head, task, classes, preprocessing


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], path: str | Path) -> None:
    """Write tensors and JSON metadata to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"chestssl": json.dumps(metadata)})
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed :func:`atomic_save` left in ``folder`` (``.NAME.*.tmp``); returns them.

    Call it only where no other process is writing into ``folder`` (a run's main process at start).
    """
    removed = []
    for path in Path(folder).glob(".*.safetensors.*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logging.getLogger(__name__).info("removed %d temporary file(s) left by an interrupted write in %s",
                                         len(removed), folder)
    return removed


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a chestssl safetensors file; CheckpointError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("chestssl")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without chestssl metadata; it was not written by chestssl")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {error}") from error
    return tensors, metadata


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any], identity: dict[str, Any]
) -> None:
    """Save weights, optimiser state and ``progress`` (epoch, step, best score...) for an exact resume.

    ``identity`` (architecture and config) is checked on resume so a run never continues from another's state.
    """
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    tensors.update(optimizer_tensors)
    atomic_save(tensors, {"format": FORMAT, "identity": identity, "progress": progress, "optimizer": optimizer_meta}, path)


def check_resumable(path: str | Path, identity: dict[str, Any]) -> None:
    """Refuse, before a run writes anything, to continue a checkpoint written with another identity."""
    if not Path(path).exists():
        return
    _, meta = read(path)
    if meta.get("format") == FORMAT:
        _check_identity(path, meta["identity"], identity)


def _check_identity(path: str | Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse unless ``old`` (a checkpoint's), narrowed to the sections ``new`` reads, is ``new``."""
    old = narrowed_to(old, new)
    if old != new:
        _refuse(path, old, new)


def _refuse(path: str | Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    changes = changed_settings(old, new)
    raise CheckpointError(
        f"{path} was written by a run with other settings ({'; '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}); "
        "refusing to resume. Use another run_dir, or delete the checkpoint to start again"
    )


def load_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, identity: dict[str, Any]
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns ``progress``."""
    tensors, meta = read(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a chestssl training checkpoint (format {meta.get('format')!r})")
    _check_identity(path, meta["identity"], identity)
    model_state = {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}
    load_weights(model, model_state, str(path))
    optimizer_tensors = {name: value for name, value in tensors.items() if name.startswith("optimizer.")}
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, meta["optimizer"]))
    return meta["progress"]


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load exactly matching weights; CheckpointError listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatch {shapes[:5]}"
        )
    model.load_state_dict(state)


def _save_with_json(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    atomic_save(tensors, metadata, path)
    Path(path).with_suffix(".json").write_text(json.dumps(metadata, indent=2))


def save_encoder(path: str | Path, encoder: torch.nn.Module, preprocessing: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> None:
    """Hand the encoder on: weights, its complete architecture record and the preprocessing of its inputs.

    A readable copy of the metadata is written beside it as ``.json``; the safetensors header is what counts.
    """
    metadata = {"format": ENCODER_FORMAT, "architecture": record_of(encoder), "preprocessing": preprocessing,
                **(extra or {})}
    _save_with_json(path, encoder.state_dict(), metadata)


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an encoder file, its architecture record validated (nothing built yet)."""
    tensors, meta = read(path)
    if meta.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"{path} is not a chestssl encoder file of this version (format {meta.get('format')!r}, "
                              f"expected {ENCODER_FORMAT!r}); pretrain the encoder again with this chestssl")
    _check_record(path, meta.get("architecture"))
    return tensors, meta


def load_encoder(path: str | Path, **options: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The encoder of an encoder file with its weights loaded strictly, and the file's metadata."""
    tensors, meta = read_encoder(path)
    encoder = build_encoder(meta["architecture"], str(path), **options)
    load_weights(encoder, tensors, str(path))
    return encoder, meta


def _check_record(path: str | Path, record: Any) -> None:
    try:
        parse_architecture(record, str(path))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: its architecture record is not usable: {error}") from error


def save_model(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """A fine-tuned model: all its weights, plus what rebuilding and using it needs (see ``chestssl.train.tasks``)."""
    _save_with_json(path, model.state_dict(), {"format": MODEL_FORMAT, **metadata})


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of a fine-tuned model file; its encoder's architecture record validated."""
    tensors, meta = read(path)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a chestssl fine-tuned model file (format {meta.get('format')!r})")
    _check_record(path, meta.get("encoder"))
    return tensors, meta


def check_preprocessing(encoder_path: str | Path, expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Refuse an encoder whose recorded preprocessing differs from the data's, naming each difference."""
    differences = [
        f"{key}: encoder {expected.get(key)!r} vs data {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) != actual.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"encoder {encoder_path} was pretrained on inputs prepared differently from this data ("
            + "; ".join(differences)
            + "). Prepare the data the same way (e.g. image_size) or pretrain an encoder for it."
        )
