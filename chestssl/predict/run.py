"""Apply a fine-tuned model to new scans: the Python API (:func:`load_model`) and ``chestssl predict``.

``chestssl predict -m RUN_DIR -i INPUT... -o OUT`` writes into OUT:

- ``predictions.csv`` (one row per input, appended as each batch finishes, so an interrupted run keeps what it
  did and ``--continue`` goes on from there) and ``predictions.json`` (the same rows);
- ``heatmaps/`` (classification models, unless ``--no-heatmap``): see :mod:`chestssl.predict.outputs`;
- ``masks/`` (segmentation models): each X-ray's predicted label map at its own size, and an overlay;
- ``report.json``: the model, the inputs, every failure with its reason, and the time spent preparing inputs,
  running the model and making heat maps.

An input that cannot be made the way the model's inputs were made (another modality, values that are not HU, no
lungs, an unreadable file) is recorded as failed with the reason, and the others go on. Outputs are named by the
input's id (a hash of its path, or the user's CSV id), never by anything read from a DICOM header.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from chestssl.errors import DataError
from chestssl.predict.inputs import Input, find_inputs
from chestssl.predict.outputs import (in_source_geometry, mask_in_source_geometry, write_ct_heatmap, write_xray_heatmap,
                                     write_xray_mask)
from chestssl.predict.prepare import Prepared, Recipe, prepare, recipe_of
from chestssl.predict.saliency import saliency
from chestssl.train.distributed import pick_device
from chestssl.train.reuse import code_version
from chestssl.train.tasks import LoadedModel, load_model as load_task_model

log = logging.getLogger(__name__)

PREDICTIONS_CSV, PREDICTIONS_JSON, REPORT_JSON, HEATMAPS = "predictions.csv", "predictions.json", "report.json", "heatmaps"
MASKS = "masks"
DECODE_THREADS = 2


@dataclass
class Prediction:
    """The outcome for one input: ``status`` "ok" with ``probabilities`` (class name -> probability) and the
    ``label`` at the model's threshold, or "failed" with the ``reason``; ``heatmap`` (when asked) is in the
    input's own geometry: (H, W) float array for an X-ray, a SimpleITK image on the source grid for CT.

    For a segmentation model ``mask`` is the predicted label map (H, W) uint8 in the input's own geometry and
    ``areas`` each class's share of the image's pixels; ``probabilities`` and ``label`` stay empty."""

    id: str
    source: str
    status: str
    probabilities: dict[str, float] = field(default_factory=dict)
    label: str = ""
    warnings: list[str] = field(default_factory=list)
    reason: str = ""
    heatmap: Any = None
    files: list[str] = field(default_factory=list)
    mask: np.ndarray | None = None
    areas: dict[str, float] = field(default_factory=dict)

    def row(self, class_names: tuple[str, ...], dense: bool = False) -> dict[str, str]:
        if dense:
            areas = {f"area_{name}": ("" if name not in self.areas else f"{self.areas[name]:.6f}") for name in class_names}
            return {"id": self.id, "source": self.source, "status": self.status, **areas,
                    "warnings": "; ".join(self.warnings), "reason": self.reason}
        probabilities = {f"p_{name}": ("" if name not in self.probabilities else f"{self.probabilities[name]:.6f}")
                         for name in class_names}
        return {"id": self.id, "source": self.source, "status": self.status, **probabilities, "label": self.label,
                "warnings": "; ".join(self.warnings), "reason": self.reason}


class Predictor:
    """A fine-tuned model ready to apply to files: ``predict(paths)`` returns one :class:`Prediction` per input.

    Args:
        loaded: the model rebuilt from its file (:func:`chestssl.train.tasks.load_model`).
        source: where it was read from (for messages and the report).
    """

    def __init__(self, loaded: LoadedModel, source: str) -> None:
        self.loaded, self.source = loaded, source
        self.task = loaded.task
        self.recipe: Recipe = recipe_of(loaded.meta, source)
        self.device = next(loaded.module.parameters()).device
        self.dense = self.task.name == "segmentation"
        if self.dense and self.recipe.modality != "xray":
            raise DataError(f"{source}: predict writes segmentations of 2D images only; this model's inputs are "
                            f"{self.recipe.kind}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.task.class_names

    def inputs(self, entries: Iterable[str | Path]) -> list[Input]:
        return find_inputs([str(e) for e in entries], self.recipe.modality)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Stored pixels (B, *S) -> class probabilities (B,) or (B, K), exactly as fine-tuning evaluated them."""
        x = torch.from_numpy(np.ascontiguousarray(pixels))[:, None].to(self.device)
        with torch.no_grad():
            return self.task.scores_of(self.loaded.module, self.recipe.normalisation.apply(x))

    def _decisions(self, scores: np.ndarray) -> list[tuple[dict[str, float], str]]:
        names, threshold, kind = self.class_names, self.task.threshold, self.task.label_kind
        decisions = []
        for score in scores:
            if kind == "binary":
                probabilities = {names[0]: float(1 - score), names[1]: float(score)}
                label = names[1] if score > threshold else names[0]
            elif kind == "multiclass":
                probabilities = {name: float(p) for name, p in zip(names, score)}
                label = names[int(np.argmax(score))]
            else:
                probabilities = {name: float(p) for name, p in zip(names, score)}
                label = ";".join(name for name, p in zip(names, score) if p > threshold)
            decisions.append((probabilities, label))
        return decisions

    def heatmaps(self, prepared: list[Prepared], scores: np.ndarray) -> np.ndarray:
        """Saliency (B, *S) in [0, 1] on the model's inputs, of each input's predicted class (multilabel: its most
        probable label)."""
        pixels = np.stack([p.pixels for p in prepared])
        x = self.recipe.normalisation.apply(torch.from_numpy(pixels)[:, None].to(self.device))
        if self.task.label_kind == "binary":
            index = torch.as_tensor(scores > self.task.threshold).long()
        else:
            index = torch.as_tensor(np.argmax(scores, axis=1))
        return saliency(self.loaded.module, x, index)[:, 0].cpu().numpy()

    def prepare_all(self, inputs: list[Input]) -> list[Prepared | Prediction]:
        """Each input made ready, or a failed :class:`Prediction` saying why it could not be."""

        def one(item: Input) -> Prepared | Prediction:
            try:
                prepared = prepare(item, self.recipe)
            except (DataError, OSError, RuntimeError, ValueError) as error:
                reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
                return Prediction(item.id, item.source, "failed", reason=" ".join(reason.split()))
            prepared.warnings[:0] = list(self.recipe.notes)
            return prepared

        if self.recipe.modality == "xray" and len(inputs) > 1:
            with ThreadPoolExecutor(DECODE_THREADS) as pool:
                return list(pool.map(one, inputs))
        return [one(item) for item in inputs]

    def predict_prepared(self, prepared: list[Prepared], heatmap: bool,
                         timing: dict[str, float] | None = None) -> list[Prediction]:
        """Predictions of inputs made ready; with ``heatmap`` each carries its map on the model's input grid.
        ``timing`` accumulates ``model_s`` and ``heatmap_s``."""
        timing = {} if timing is None else timing
        if not prepared:
            return []
        tick = time.perf_counter()
        scores = self.probabilities(np.stack([p.pixels for p in prepared]))
        timing["model_s"] = timing.get("model_s", 0.0) + time.perf_counter() - tick
        if self.dense:
            predictions = []
            for item, labels in zip(prepared, scores.argmax(axis=1).astype(np.uint8)):
                areas = {name: float((labels == k).mean()) for k, name in enumerate(self.class_names)}
                warnings = list(item.warnings)
                if not (labels > 0).any():
                    warnings.append("nothing segmented: every pixel predicted background")
                predictions.append(Prediction(item.input.id, item.input.source, "ok", warnings=warnings, mask=labels,
                                              areas=areas))
            return predictions
        maps: list[np.ndarray | None] = [None] * len(prepared)
        if heatmap:
            tick = time.perf_counter()
            maps = list(self.heatmaps(prepared, scores))
            timing["heatmap_s"] = timing.get("heatmap_s", 0.0) + time.perf_counter() - tick
        predictions = []
        for item, (probabilities, label), heat in zip(prepared, self._decisions(scores), maps):
            warnings = list(item.warnings)
            if heat is not None and not heat.max() > 0:
                warnings.append(f"empty heat map: no positive evidence for {label!r} at the explained layer")
            predictions.append(Prediction(item.input.id, item.input.source, "ok", probabilities, label, warnings,
                                          heatmap=heat))
        return predictions

    def predict(self, paths: Iterable[str | Path], heatmap: bool = False, batch_size: int = 16) -> list[Prediction]:
        """Predict every input named by ``paths`` (files, folders, CSVs); failures are returned, not raised.

        With ``heatmap`` each prediction carries its saliency map in the input's own geometry.
        """
        results = []
        inputs = self.inputs(paths)
        for start in range(0, len(inputs), batch_size):
            chunk = self.prepare_all(inputs[start : start + batch_size])
            ready = [p for p in chunk if isinstance(p, Prepared)]
            done = {p.id: p for p in self.predict_prepared(ready, heatmap)}
            for item, outcome in zip(inputs[start : start + batch_size], chunk):
                prediction = outcome if isinstance(outcome, Prediction) else done[item.id]
                if prediction.mask is not None:
                    prediction.mask = mask_in_source_geometry(outcome, prediction.mask)
                elif heatmap and prediction.status == "ok":
                    prediction.heatmap = in_source_geometry(outcome, prediction.heatmap)
                results.append(prediction)
        return results


def load_model(path: str | Path, device: str = "auto") -> Predictor:
    """A fine-tuned model (its run directory or ``model.safetensors``) ready to ``predict`` on files."""
    loaded = load_task_model(path, pick_device(device))
    return Predictor(loaded, str(path))


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def predict_to_folder(model: str | Path, entries: list[str], out_dir: str | Path, heatmap: bool | None = None,
                      device: str = "auto", resume: bool = False, batch_size: int = 16) -> dict[str, Any]:
    """``chestssl predict``: predict every input and write the outputs of the module docstring; returns the report.

    Raises:
        DataError: OUT already holds predictions and ``resume`` is off (nothing is overwritten), or the input
            list cannot be read (a bad CSV, an id given twice).
        CheckpointError: the model file cannot be rebuilt or its preprocessing cannot be reproduced.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    csv_path = out / PREDICTIONS_CSV
    if csv_path.exists() and not resume:
        raise DataError(f"{out} already holds {PREDICTIONS_CSV}: pass --continue to add to it, or choose another folder")
    predictor = load_model(model, device)
    inputs = predictor.inputs(entries)
    if not inputs:
        raise DataError(f"no input found in {entries}")
    dense = predictor.dense
    heatmap = not dense if heatmap is None else heatmap and not dense
    columns = list(Prediction("", "", "").row(predictor.class_names, dense))
    previous = _read_rows(csv_path)
    if previous and list(previous[0]) != columns:
        raise DataError(f"{csv_path} has columns {list(previous[0])}, not this model's {columns}: another model's "
                        "predictions; choose another folder")
    done = {row["id"] for row in previous if row["status"] == "ok"}
    kept = [row for row in previous if row["id"] in done]  # failed inputs are tried again
    todo = [item for item in inputs if item.id not in done]
    out.mkdir(parents=True, exist_ok=True)
    if heatmap:
        (out / HEATMAPS).mkdir(exist_ok=True)
    if dense:
        (out / MASKS).mkdir(exist_ok=True)
    with csv_path.open("w", newline="") as stream:
        csv.DictWriter(stream, columns).writeheader()
        csv.DictWriter(stream, columns).writerows(kept)
    timing = {"prepare_s": 0.0, "model_s": 0.0, "heatmap_s": 0.0}
    failures = []
    progress = tqdm(total=len(todo), desc="predict", unit="input", disable=len(todo) < 2)
    with progress:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            tick = time.perf_counter()
            outcomes = predictor.prepare_all(chunk)
            timing["prepare_s"] += time.perf_counter() - tick
            ready = [p for p in outcomes if isinstance(p, Prepared)]
            predictions = {p.id: p for p in predictor.predict_prepared(ready, heatmap, timing)}
            if heatmap:
                tick = time.perf_counter()
                write = write_xray_heatmap if predictor.recipe.modality == "xray" else write_ct_heatmap
                for prepared in ready:
                    prediction = predictions[prepared.input.id]
                    title = f"{prepared.input.id}: {prediction.label}"
                    files = write(out / HEATMAPS, prepared, prediction.heatmap, title)
                    prediction.files = [str(p.relative_to(out)) for p in files]
                timing["heatmap_s"] += time.perf_counter() - tick
            if dense:
                for prepared in ready:
                    prediction = predictions[prepared.input.id]
                    files = write_xray_mask(out / MASKS, prepared, prediction.mask, predictor.class_names, prepared.input.id)
                    prediction.files = [str(p.relative_to(out)) for p in files]
            rows = []
            for item, outcome in zip(chunk, outcomes):
                prediction = outcome if isinstance(outcome, Prediction) else predictions[item.id]
                if prediction.status == "failed":
                    failures.append({"id": prediction.id, "source": prediction.source, "reason": prediction.reason})
                    log.warning("%s: %s", prediction.source, prediction.reason)
                rows.append(prediction.row(predictor.class_names, dense))
            with csv_path.open("a", newline="") as stream:
                csv.DictWriter(stream, columns).writerows(rows)
            progress.update(len(chunk))
    rows = _read_rows(csv_path)
    (out / PREDICTIONS_JSON).write_text(json.dumps(rows, indent=2))
    meta = predictor.loaded.meta
    report = {
        "model": {"path": str(model), "task": meta.get("task"), "label_kind": meta.get("label_kind"),
                  "class_names": meta.get("class_names"), "threshold": meta.get("threshold"),
                  "encoder": meta["encoder"]["kind"], "init": meta.get("init"), "recipe": predictor.recipe.kind,
                  "preprocessing": meta.get("preprocessing")},
        "inputs": len(inputs), "skipped_done": len(inputs) - len(todo), "predicted": len(todo) - len(failures),
        "failed": len(failures), "failures": failures, "heatmap": heatmap, "device": str(predictor.device),
        "seconds": {**{k: round(v, 3) for k, v in timing.items()}, "total_s": round(time.perf_counter() - started, 3)},
        "code_version": code_version(), "notes": list(predictor.recipe.notes),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    log.info("%d predicted, %d failed, %d already done: %s", report["predicted"], report["failed"],
             report["skipped_done"], csv_path)
    return report
