"""Benchmark reports from ``results.csv``: mean ± std tables (Markdown and HTML) and metric-vs-budget plots.

Classification grids are keyed by label fraction and report AUC, ACC, balanced accuracy and weighted F1;
segmentation grids by the number of labelled images and report Dice and HD95 (overall and per region).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from chestssl.data.datasets import CT_CACHE  # noqa: E402
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


def metrics_of(rows: list[dict], unit: str = "px") -> list[tuple[str, str]]:
    """(column, name) of the metrics a table reports for these rows; ``unit`` is HD95's ("px", or "voxels" for 3D)."""
    if not is_segmentation(rows):
        return METRICS
    regions = [key for key in rows[0] if key.startswith("test_dice_")]
    named = [(key, "Dice " + key.removeprefix("test_dice_").replace("_", " ")) for key in regions]
    return [("test_dice", "Dice"), ("test_hd95", f"HD95 ({unit})")] + (named if len(regions) > 1 else [])


def paired_metrics(rows: list[dict], unit: str = "px") -> list[tuple[str, str]]:
    """The metrics a seed-by-seed comparison reports: AUC, ACC and balanced accuracy (the last is what a class-
    imbalanced test set needs); Dice and HD95 for segmentation."""
    return metrics_of(rows, unit)[:2] if is_segmentation(rows) else metrics_of(rows)[:3]


def distance_unit(run_dir: Path) -> str:
    """HD95's unit in a benchmark directory: "voxels" where its saved config fine-tunes on a volume cache (3D),
    else "px"."""
    path = run_dir / "config.yaml"
    settings = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return "voxels" if (settings.get("finetune") or {}).get("dataset") == CT_CACHE else "px"


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


BASELINE = "resnet18-scratch"  # what each initialisation is paired with, seed by seed
BASELINES = (BASELINE, "vit-scratch")  # each, where the grid has it (the ViT's own scratch twin for the pretrained ViTs)
LOWER_IS_BETTER = frozenset({"test_hd95"})


def paired_differences(rows: list[dict], summary: list[dict], baseline: str = BASELINE,
                       metrics: list[tuple[str, str]] | None = None,
                       lower_is_better: frozenset[str] | set[str] = LOWER_IS_BETTER) -> list[dict]:
    """Each initialisation minus ``baseline``, seed by seed at the same budget (a seed draws the same labelled
    subset for every initialisation, so the pair differs in the initialisation alone): per metric of ``metrics``
    (by default :func:`paired_metrics`), the mean and sample std of the differences and in how many seeds the
    initialisation did better. ``summary`` is ``summarise(rows)``, or any entries with ``init``,
    ``label_fraction`` and ``by_count``: they give the budgets and how they are counted."""
    metrics = paired_metrics(rows) if metrics is None else metrics
    by_count = bool(summary) and summary[0]["by_count"]
    seeds: dict[tuple[str, float], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        seeds[(row["init"], float(row["label_count" if by_count else "label_fraction"]))][int(row["seed"])] = row
    paired = []
    for entry in summary:
        init, budget = entry["init"], entry["label_fraction"]
        ours, theirs = seeds[(init, budget)], seeds.get((baseline, budget), {})
        common = sorted(ours.keys() & theirs.keys())
        if init == baseline or not common:
            continue
        item = {"init": init, "label_fraction": budget, "by_count": by_count, "seeds": len(common)}
        for key, _ in metrics:
            differences = np.array([_number(ours[s][key]) - _number(theirs[s][key]) for s in common])
            better = differences < 0 if key in lower_is_better else differences > 0
            item[key] = (float(differences.mean()), float(differences.std(ddof=1)) if len(common) > 1 else float("nan"))
            item[key + "_better"] = int(better.sum())
        paired.append(item)
    return paired


def paired_table(paired: list[dict], metrics: list[tuple[str, str]], baseline: str = BASELINE) -> str:
    """Markdown table of ``paired_differences`` made with the same ``metrics``."""
    names = " | ".join(f"{name} minus {baseline} | better in" for _, name in metrics)
    lines = [f"| labels | init | paired seeds | {names} |", "|" + "---|" * (3 + 2 * len(metrics))]
    for item in paired:
        cells = [_budget(item), item["init"], str(item["seeds"])]
        for key, _ in metrics:
            mean, std = item[key]
            difference = f"{mean:+.3f}" if math.isnan(std) else f"{mean:+.3f} ± {std:.3f}"
            cells += [difference, f"{item[key + '_better']} of {item['seeds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_interval(values: np.ndarray, level: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0),
                        ) -> tuple[float, float]:
    """Student-t interval for the mean over seeds, cut to the metric's ``bounds`` (AUC and Dice lie in [0, 1]; with
    3 seeds and a wide spread the raw interval passes 1); (nan, nan) for a single seed."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    low, high = bounds
    return float(max(values.mean() - half, low)), float(min(values.mean() + half, high))


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


def pretraining_costs(run_dir: Path) -> list[dict]:
    """The cost of each pretraining a benchmark ran (its ``pretrain*`` folders): epochs done, median seconds per
    epoch and the peak resident (and GPU) memory its epochs recorded, from ``metrics.jsonl`` and ``config.yaml``."""
    costs = []
    for folder in sorted(run_dir.glob("pretrain*")):
        metrics, settings = folder / "metrics.jsonl", folder / "config.yaml"
        if not (metrics.is_file() and settings.is_file()):
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not records:
            continue
        config = yaml.safe_load(settings.read_text()) or {}
        rss = [r["peak_rss_mib"] for r in records if "peak_rss_mib" in r]
        gpu = [r["peak_gpu_mib"] for r in records if "peak_gpu_mib" in r]
        costs.append({
            "pretraining": folder.name, "method": config.get("method", "?"), "encoder": config.get("encoder", "?"),
            "epochs": f"{len(records)} of {config.get('epochs', '?')}",
            "seconds_per_epoch": float(np.median([r["epoch_seconds"] for r in records])),
            "steps_per_epoch": records[0].get("step", 0) // max(records[0].get("epoch", 0) + 1, 1),
            "peak_rss_gib": max(rss) / 1024 if rss else None, "peak_gpu_gib": max(gpu) / 1024 if gpu else None,
        })
    return costs


def costs_table(costs: list[dict]) -> str:
    """Markdown table of ``pretraining_costs``."""
    lines = ["| pretraining | method | encoder | epochs | steps per epoch | s per epoch (median) | peak RSS "
             "| peak GPU |", "|---|---|---|---|---|---|---|---|"]
    for cost in costs:
        memory = [f"{cost[k]:.2f} GiB" if cost[k] is not None else "not recorded"
                  for k in ("peak_rss_gib", "peak_gpu_gib")]
        lines.append(f"| {cost['pretraining']} | {cost['method']} | {cost['encoder']} | {cost['epochs']} | "
                     f"{cost['steps_per_epoch']} | {cost['seconds_per_epoch']:.1f} | {memory[0]} | {memory[1]} |")
    return "\n".join(lines)


def label_efficiency(summary: list[dict], costs: list[dict], metrics: list[tuple[str, str]]) -> list[dict]:
    """Per initialisation, its first two metrics at the grid's largest and smallest budgets (Wolf et al.'s "which
    method degrades least as labels shrink"), the amount lost between them (positive: worse with fewer labels;
    HD95 counts up), and the cost of the pretraining it starts from (None for one from scratch). Only
    initialisations run at both budgets; ``summary`` is ``summarise(rows)``, ``costs`` ``pretraining_costs``,
    ``metrics`` ``metrics_of(rows)``."""
    from chestssl.train.protocol import init_pretraining  # the benchmark imports this module

    if not summary:
        return []
    size = (lambda entry: entry["label_fraction"] or math.inf) if summary[0]["by_count"] else (lambda entry: entry["label_fraction"])
    largest, smallest = max(map(size, summary)), min(map(size, summary))
    if largest == smallest:
        return []
    by_folder = {cost["pretraining"]: cost for cost in costs}
    rows = []
    for init in dict.fromkeys(entry["init"] for entry in summary):
        ends = {size(e): e for e in summary if e["init"] == init}
        if largest not in ends or smallest not in ends:
            continue
        most, fewest = ends[largest], ends[smallest]
        item = {"init": init, "most": most, "fewest": fewest, "cost": by_folder.get(init_pretraining(init) or "")}
        for key, _ in metrics[:2]:
            lost = most[key][0] - fewest[key][0]
            item[key] = -lost if key in LOWER_IS_BETTER else lost
        rows.append(item)
    return rows


def efficiency_table(rows: list[dict], metrics: list[tuple[str, str]]) -> str:
    """Markdown table of ``label_efficiency``."""
    most, fewest = _budget(rows[0]["most"]), _budget(rows[0]["fewest"])
    names = " | ".join(f"{name} at {most} | at {fewest} | lost" for _, name in metrics[:2])
    lines = [f"| init | {names} | pretraining | s per epoch | epochs | peak RSS |", "|" + "---|" * (5 + 3 * len(metrics[:2]))]
    for row in rows:
        cells = [row["init"]]
        for key, _ in metrics[:2]:
            cells += [f"{row['most'][key][0]:.3f}", f"{row['fewest'][key][0]:.3f}", f"{row[key]:+.3f}"]
        cost = row["cost"]
        if cost is None:
            cells += ["none" if row["init"].endswith("scratch") else "not in this directory", "", "", ""]
        else:
            memory = f"{cost['peak_rss_gib']:.2f} GiB" if cost["peak_rss_gib"] is not None else "not recorded"
            cells += [f"{cost['method']} ({cost['pretraining']})", f"{cost['seconds_per_epoch']:.1f}", cost["epochs"], memory]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(markdown: str) -> str:
    """A Markdown table (header, rule, rows) as an HTML table."""
    lines = markdown.splitlines()
    cells = [[html.escape(cell.strip()) for cell in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{cell}</th>" for cell in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in cells[2:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str | Path, against: tuple[str, ...] = ()) -> Path:
    """Write ``report.md``, ``report.html`` and ``metric_vs_fraction.png`` for a benchmark directory. Every
    initialisation is paired seed by seed with each of ``BASELINES`` the grid has, then with each of ``against``
    (say ``resnet18-mocov2`` to set SparK against MoCo v2 directly)."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.csv").is_file():
        raise DataError(f"{run_dir} has no results.csv: it is not a benchmark run directory (or no run finished yet)")
    rows = read_results(run_dir / "results.csv")
    inits = sorted({row["init"] for row in rows})
    unknown = sorted(set(against) - set(inits))
    if unknown:
        raise DataError(f"--against {', '.join(unknown)}: not in {run_dir / 'results.csv'} (it has {', '.join(inits)})")
    summary = summarise(rows)
    unit = distance_unit(run_dir)
    metrics = metrics_of(rows, unit)
    figure = plot(summary, run_dir / "metric_vs_fraction.png", metrics)
    selections = sorted({entry["selection"].split(" (")[0] for entry in summary})
    table = markdown_table(summary, metrics)
    if is_segmentation(rows):
        measured = ("Dice (MONAI DiceMetric, per image, mean over images and foreground classes) and HD95 (MONAI "
                    f"HausdorffDistanceMetric, 95th percentile, {'voxels' if unit == 'voxels' else 'pixels'} at the "
                    "model's input size; images where a region is predicted empty are counted in test_hd95_missed, "
                    "not averaged).")
    else:
        measured = "ACC at threshold 0.5 as the MedMNIST evaluator computes it."
    notes = (f"{len(rows)} runs. Test metrics on the test split; mean ± sample std over seeds, and a Student-t "
             f"95% confidence interval for the mean {metrics[0][1]}. {measured} Model selection: {'; '.join(selections)}.")
    compared = paired_metrics(rows, unit)
    paired = {baseline: paired_differences(rows, summary, baseline, compared) for baseline in dict.fromkeys((*BASELINES, *against))}
    paired = {baseline: items for baseline, items in paired.items() if items}
    paired_section = "".join(
        f"\n## Against {baseline}, seed by seed\n\nThe same seed draws the same labelled images for every "
        f"initialisation, so each pair differs in the initialisation alone.\n\n{paired_table(items, compared, baseline)}\n"
        for baseline, items in paired.items())
    costs = pretraining_costs(run_dir)
    cost_section = (f"\n## Pretraining cost\n\nFrom each pretraining's metrics.jsonl (peak memory of the process "
                    f"as its epochs recorded it).\n\n{costs_table(costs)}\n" if costs else "")
    efficiency = label_efficiency(summary, costs, metrics)
    efficiency_section = (f"\n## From the most labels to the fewest\n\nWhat each initialisation loses (means over "
                          f"seeds; positive: worse with fewer labels), beside the cost of its pretraining.\n\n"
                          f"{efficiency_table(efficiency, metrics)}\n" if efficiency else "")
    (run_dir / "report.md").write_text(
        f"# Label-efficiency benchmark\n\n{notes}\n\n{table}\n\n![metric vs fraction]({figure.name})\n"
        f"{paired_section}{efficiency_section}{cost_section}")
    image = base64.b64encode(figure.read_bytes()).decode()
    cost_html = f"<h2>Pretraining cost</h2>{_html_table(costs_table(costs))}" if costs else ""
    efficiency_html = (f"<h2>From the most labels to the fewest</h2>{_html_table(efficiency_table(efficiency, metrics))}"
                       if efficiency else "")
    paired_html = "".join(f"<h2>Against {baseline}, seed by seed</h2>{_html_table(paired_table(items, compared, baseline))}"
                          for baseline, items in paired.items())
    (run_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>chestssl benchmark</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Label-efficiency benchmark</h1><p>{html.escape(notes)}</p>{_html_table(table)}"
        f"<p><img alt='metric vs fraction' src='data:image/png;base64,{image}'></p>{paired_html}{efficiency_html}{cost_html}"
        "</body></html>"
    )
    return run_dir / "report.md"
