"""Benchmark reports from ``results.csv``: mean ± std tables (Markdown and HTML) and metric-vs-fraction plots."""

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


def read_results(path: str | Path) -> list[dict]:
    with Path(path).open() as stream:
        return list(csv.DictReader(stream))


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (init, fraction): n seeds, label counts, and mean/std of each test metric."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["init"], float(row["label_fraction"]))].append(row)
    summary = []
    for (init, fraction), members in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        entry = {"init": init, "label_fraction": fraction, "seeds": len(members),
                 "n_train": int(np.mean([int(m["n_train"]) for m in members])),
                 "selection": members[0]["selection"]}
        for key, _ in METRICS:
            values = np.array([float(m[key]) for m in members], dtype=np.float64)
            entry[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))
        entry["test_auc_ci"] = confidence_interval([float(m["test_auc"]) for m in members])
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


def markdown_table(summary: list[dict]) -> str:
    header = "| labels | init | n labelled | seeds | " + " | ".join(name for _, name in METRICS) + " | AUC 95% CI |"
    lines = [header, "|" + "---|" * (5 + len(METRICS))]
    for entry in summary:
        cells = [f"{entry['label_fraction']:.0%}" if entry["label_fraction"] >= 0.01 else f"{entry['label_fraction']:.1%}",
                 entry["init"], str(entry["n_train"]), str(entry["seeds"])]
        low, high = entry.get("test_auc_ci", (float("nan"), float("nan")))
        interval = "" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        lines.append("| " + " | ".join(cells + [_cell(entry[key]) for key, _ in METRICS] + [interval]) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> Path:
    """AUC and ACC (mean ± std over seeds) against the label fraction, one line per initialisation."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, (key, name) in zip(axes, METRICS[:2]):
        for init in sorted({e["init"] for e in summary}):
            entries = [e for e in summary if e["init"] == init]
            fractions = [e["label_fraction"] for e in entries]
            means = np.array([e[key][0] for e in entries])
            stds = np.nan_to_num(np.array([e[key][1] for e in entries]))
            axis.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=init)
        axis.set_xscale("log")
        axis.set_xlabel("fraction of training labels")
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
    figure = plot(summary, run_dir / "metric_vs_fraction.png")
    selections = sorted({entry["selection"].split(" (")[0] for entry in summary})
    table = markdown_table(summary)
    notes = (f"{len(rows)} runs. Test metrics on the test split; mean ± sample std over seeds, and a Student-t "
             "95% confidence interval for the mean AUC. "
             f"ACC at threshold 0.5 as the MedMNIST evaluator computes it. Model selection: {'; '.join(selections)}.")
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
