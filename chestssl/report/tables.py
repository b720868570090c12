"""Benchmark reports from ``results.csv``: mean ± std tables (Markdown and HTML) and metric-vs-budget plots.

Classification grids are keyed by label fraction and report AUC, ACC, balanced accuracy and weighted F1;
segmentation grids by the number of labelled images and report Dice and HD95 (overall and per region).
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chestssl.errors import DataError  # noqa: E402

RESULT_COLUMNS = [
    "init", "label_fraction", "seed", "n_train", "n_val", "selection", "epochs", "best_epoch", "val_auc",
    "test_auc", "test_acc", "test_balanced_accuracy", "test_f1_weighted", "seconds", "run_dir",
    "code_version", "torch", "monai", "device", "threads",
]
METRICS = [("test_auc", "AUC"), ("test_acc", "ACC"), ("test_balanced_accuracy", "Bal. acc"), ("test_f1_weighted", "F1 (w)")]
SEGMENTATION_COLUMNS = [
    "init", "label_fraction", "label_count", "seed", "n_train", "n_val", "selection", "epochs", "best_epoch", "val_dice", "val_hd95",
    "test_dice", "test_hd95", "test_hd95_missed",
]
ENVIRONMENT_COLUMNS = ["seconds", "run_dir", "code_version", "torch", "monai", "device", "threads"]


def result_columns(result: dict) -> list[str]:
    """The ``results.csv`` columns of a grid whose runs give results like ``result``."""
    if result.get("task", "classification") == "classification":
        return RESULT_COLUMNS
    regions = sorted(key for key in result if key.startswith(("test_dice_", "test_hd95_")) and key != "test_hd95_missed")
    return SEGMENTATION_COLUMNS + regions + ENVIRONMENT_COLUMNS


def append_result(path: str | Path, result: dict) -> None:
    """Append one run's row to ``results.csv`` (written with its header when new). A file with other columns
    (another task, or a results.csv of an older chestssl) is refused rather than given misaligned rows."""
    path = Path(path)
    columns = result_columns(result)
    if path.exists():
        with path.open(newline="") as stream:
            header = next(csv.reader(stream), [])
        if header != columns:
            raise DataError(f"{path} has the columns {header}, this run gives {columns}: another grid's results; "
                            "use another run_dir")
    new_file = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerow({key: result.get(key) for key in columns})


def is_segmentation(rows: list[dict]) -> bool:
    return bool(rows) and "test_dice" in rows[0]


def metrics_of(rows: list[dict]) -> list[tuple[str, str]]:
    """(column, name) of the metrics a table reports for these rows."""
    if not is_segmentation(rows):
        return METRICS
    regions = [key for key in rows[0] if key.startswith("test_dice_")]
    named = [(key, "Dice " + key.removeprefix("test_dice_").replace("_", " ")) for key in regions]
    return [("test_dice", "Dice"), ("test_hd95", "HD95 (px)")] + (named if len(regions) > 1 else [])


def _number(value: str) -> float:
    return float(value) if value not in ("", None) else float("nan")


def read_results(path: str | Path) -> list[dict]:
    with Path(path).open() as stream:
        return list(csv.DictReader(stream))


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (init, budget): n seeds, label counts, and mean/std of each test metric, with a Student-t
    95% interval for the first metric (AUC, or Dice). The budget is the label fraction, or for segmentation
    the number of labelled images (``label_fraction`` then holds it too, 0 meaning all, for sorting)."""
    segmentation = is_segmentation(rows)
    # a segmentation grid counts labelled images (every label_fraction 1) or takes fractions of them
    by_count = segmentation and all(float(r["label_fraction"]) == 1.0 for r in rows)
    budget_column = "label_count" if by_count else "label_fraction"
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["init"], float(row[budget_column]))].append(row)
    metrics = metrics_of(rows)
    summary = []
    order = (lambda item: (item[0][1] or math.inf, item[0][0])) if by_count else (lambda item: (item[0][1], item[0][0]))
    for (init, budget), members in sorted(groups.items(), key=order):
        entry = {"init": init, "label_fraction": budget, "seeds": len(members), "by_count": by_count,
                 "n_train": int(np.mean([int(m["n_train"]) for m in members])),
                 "selection": members[0]["selection"]}
        for key, _ in metrics:
            values = np.array([_number(m[key]) for m in members], dtype=np.float64)
            entry[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))
        first = metrics[0][0]
        entry["test_auc_ci"] = confidence_interval([_number(m[first]) for m in members])
        summary.append(entry)
    return summary


def confidence_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean over seeds; (nan, nan) for a single seed."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _cell(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _budget(entry: dict) -> str:
    if entry.get("by_count"):
        return "all" if not entry["label_fraction"] else f"{int(entry['label_fraction'])} images"
    fraction = entry["label_fraction"]
    return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.1%}"


def markdown_table(summary: list[dict], metrics: list[tuple[str, str]] = METRICS) -> str:
    interval_name = metrics[0][1]
    header = "| labels | init | n labelled | seeds | " + " | ".join(name for _, name in metrics) + f" | {interval_name} 95% CI |"
    lines = [header, "|" + "---|" * (5 + len(metrics))]
    for entry in summary:
        cells = [_budget(entry), entry["init"], str(entry["n_train"]), str(entry["seeds"])]
        low, high = entry.get("test_auc_ci", (float("nan"), float("nan")))
        interval = "" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        lines.append("| " + " | ".join(cells + [_cell(entry[key]) for key, _ in metrics] + [interval]) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, metrics: list[tuple[str, str]] = METRICS) -> Path:
    """The first two metrics (mean ± std over seeds) against the label budget, one line per initialisation;
    for segmentation against the number of labelled images (all: the mean size of the training split)."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    segmentation = bool(summary) and summary[0].get("by_count")
    for axis, (key, name) in zip(axes, metrics[:2]):
        for init in sorted({e["init"] for e in summary}):
            entries = [e for e in summary if e["init"] == init]
            fractions = [e["n_train"] if segmentation else e["label_fraction"] for e in entries]
            means = np.array([e[key][0] for e in entries])
            stds = np.nan_to_num(np.array([e[key][1] for e in entries]))
            axis.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=init)
        axis.set_xscale("log")
        axis.set_xlabel("labelled training images" if segmentation else "fraction of training labels")
        axis.set_ylabel(f"test {name}")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``metric_vs_fraction.png`` for a benchmark directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.csv").is_file():
        raise DataError(f"{run_dir} has no results.csv: it is not a benchmark run directory (or no run finished yet)")
    rows = read_results(run_dir / "results.csv")
    summary = summarise(rows)
    metrics = metrics_of(rows)
    figure = plot(summary, run_dir / "metric_vs_fraction.png", metrics)
    selections = sorted({entry["selection"].split(" (")[0] for entry in summary})
    table = markdown_table(summary, metrics)
    if is_segmentation(rows):
        measured = ("Dice (MONAI DiceMetric, per image, mean over images and foreground classes) and HD95 (MONAI "
                    "HausdorffDistanceMetric, 95th percentile, pixels at the model's input size; images where a "
                    "region is predicted empty are counted in test_hd95_missed, not averaged).")
    else:
        measured = "ACC at threshold 0.5 as the MedMNIST evaluator computes it."
    notes = (f"{len(rows)} runs. Test metrics on the test split; mean ± sample std over seeds, and a Student-t "
             f"95% confidence interval for the mean {metrics[0][1]}. {measured} Model selection: {'; '.join(selections)}.")
    (run_dir / "report.md").write_text(f"# Label-efficiency benchmark\n\n{notes}\n\n{table}\n\n![metric vs fraction]({figure.name})\n")
    image = base64.b64encode(figure.read_bytes()).decode()
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in line.strip("|").split("|")) + "</tr>"
        for line in table.splitlines()[2:]
    )
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table.splitlines()[0].strip("|").split("|"))
    (run_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>chestssl benchmark</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Label-efficiency benchmark</h1><p>{html.escape(notes)}</p><table><tr>{head}</tr>{body}</table>"
        f"<p><img alt='metric vs fraction' src='data:image/png;base64,{image}'></p></body></html>"
    )
    return run_dir / "report.md"
