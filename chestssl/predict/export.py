"""``chestssl export``: a fine-tuned model as ONNX, checked against PyTorch on real inputs, with its metadata.

The graph takes ``image``: float32 (B, 1, S, S) or (B, 1, S, S, S) holding the stored pixels scaled to [0, 1]
(an X-ray's uint8 pixels / 255 after chestssl's decoding and resize; a CT cube as ``prepare-ct`` or
``prepare-lidc`` makes it), any batch size B; the normalisation is inside the graph. It returns
``probabilities``: (B,) for a binary model (of the second class name), (B, K) otherwise. ``FILE.onnx.json`` beside it
holds what using it needs: input size, value range, normalisation, class names, threshold and the preprocessing
record. Needs the ``export`` extra: ``pip install 'chestssl[export]'`` (onnx, onnxruntime).

The export uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs no further package with the
pinned torch; the check runs onnxruntime on the inputs given and refuses (and removes) a file whose probabilities
differ from PyTorch's by more than ``tolerance``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chestssl.errors import CheckpointError, ConfigError, DataError
from chestssl.predict.prepare import Prepared
from chestssl.predict.run import load_model

log = logging.getLogger(__name__)

ONNX_FORMAT = "chestssl-onnx-1"
TOLERANCE = 1e-4  # largest |probability difference| accepted between onnxruntime and PyTorch
OPSET = 17


class _Exported(nn.Module):
    """Images in [0, 1] -> probabilities: normalisation, the classifier, its output activation."""

    def __init__(self, model: nn.Module, mean: float, std: float, label_kind: str) -> None:
        super().__init__()
        self.model, self.mean, self.std, self.label_kind = model, mean, std, label_kind

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits((image - self.mean) / self.std)
        if self.label_kind == "segmentation":
            return logits.softmax(dim=1)  # (B, K, *S) per-pixel class probabilities
        return logits.softmax(dim=-1) if self.label_kind == "multiclass" else logits.sigmoid()


def _output_record(meta: dict[str, Any], size: int, dims: int) -> dict[str, Any]:
    names, kind = meta["class_names"], meta["label_kind"]
    if kind == "segmentation":
        return {"name": "probabilities", "shape": ["batch", len(names)] + [size] * dims,
                "meaning": "probability of each class at each pixel; the label map is its argmax over axis 1"}
    if kind == "binary":
        return {"name": "probabilities", "shape": ["batch"], "meaning": f"probability of {names[-1]!r}"}
    return {"name": "probabilities", "shape": ["batch", len(names)], "meaning": "probability of each class"}


def metadata_path(onnx_file: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (never a run directory's own ``model.json``)."""
    return Path(str(onnx_file) + ".json")


def _unit_range(prepared: list[Prepared]) -> np.ndarray:
    pixels = np.stack([p.pixels for p in prepared])[:, None]
    return (pixels.astype(np.float32) / 255.0) if pixels.dtype == np.uint8 else pixels.astype(np.float32)


def export_onnx(model_path: str | Path, out_file: str | Path, check_inputs: list[str],
                tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export, check on ``check_inputs`` (files, folders or a CSV, prepared as ``predict`` prepares them) and
    write the metadata; returns the metadata record.

    Raises:
        ConfigError: onnx or onnxruntime is not installed, or no check input is given.
        DataError: no check input could be prepared.
        CheckpointError: onnxruntime's probabilities differ from PyTorch's by more than ``tolerance``.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ConfigError(f"export needs onnx and onnxruntime: pip install 'chestssl[export]' ({error})") from error
    if not check_inputs:
        raise ConfigError("export checks the ONNX model against PyTorch on real inputs: give at least one with -i")
    predictor = load_model(model_path, "cpu")
    outcomes = predictor.prepare_all(predictor.inputs(check_inputs))
    prepared = [p for p in outcomes if isinstance(p, Prepared)]
    if not prepared:
        reasons = "; ".join(f"{o.source}: {o.reason}" for o in outcomes)
        raise DataError(f"none of the check inputs could be prepared for this model ({reasons or 'none found'})")
    if len(prepared) == 1:
        prepared = prepared * 2  # a batch of two exercises the dynamic batch axis
    images = _unit_range(prepared)
    expected = predictor.probabilities(np.stack([p.pixels for p in prepared]))
    norm = predictor.recipe.normalisation
    # the stored pixels in [0, 1]: uint8 X-rays are divided by 255, as Normalisation.apply does
    module = _Exported(predictor.loaded.module.cpu().eval(), norm.mean, norm.std, predictor.task.label_kind)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, (torch.from_numpy(images[:1]),), str(out_file), input_names=["image"],
                      output_names=["probabilities"], dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(out_file)))
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images})[0]
    difference = float(np.abs(got - expected).max())
    if not difference <= tolerance:
        out_file.unlink(missing_ok=True)
        raise CheckpointError(f"the exported model's probabilities differ from PyTorch's by {difference:.3g} (more than "
                              f"{tolerance:g}) on {len(prepared)} check inputs; the ONNX file was removed")
    meta = predictor.loaded.meta
    size, dims = predictor.recipe.size, predictor.recipe.spatial_dims
    record = {
        "format": ONNX_FORMAT, "model": str(model_path), "task": meta["task"], "label_kind": meta["label_kind"],
        "class_names": meta["class_names"], "threshold": meta.get("threshold"),
        "input": {"name": "image", "shape": ["batch", 1] + [size] * dims, "dtype": "float32",
                  "values": "stored pixels in [0, 1]: uint8 X-ray pixels / 255, or the CT cube's values",
                  "recipe": predictor.recipe.kind},
        "output": _output_record(meta, size, dims),
        "normalisation": {"mean": norm.mean, "std": norm.std, "applied": "inside the graph"},
        "preprocessing": meta["preprocessing"], "encoder": meta["encoder"], "opset": OPSET,
        "check": {"inputs": len(prepared), "max_abs_difference": difference, "tolerance": tolerance,
                  "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
    }
    metadata_path(out_file).write_text(json.dumps(record, indent=2))
    log.info("ONNX model %s checked on %d inputs: max |difference| %.2g", out_file, len(prepared), difference)
    return record
