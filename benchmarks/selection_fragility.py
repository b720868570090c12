"""How fragile is model selection on a tiny validation subset? One benchmark cell, traced epoch by epoch.

Runs one cell of a benchmark grid (an initialisation, a label fraction, a seed) with ``trace_test=true``, which
logs the test metrics of every epoch beside the validation AUC and loss that choose the epoch (the test figures
never influence the choice), once for each torch thread count given. Prints, per run: the chosen epoch and its
test AUC, how many epochs tie at the best validation AUC and the range of their test AUCs, the range of test
AUCs over the second half of training, and how far the chosen epoch's test AUC moves between thread counts
(different threads, different floating-point sums, the same seeds).

    python benchmarks/selection_fragility.py --config configs/pneumoniamnist28.yaml \\
        --init resnet18-scratch --fraction 0.01 --seeds 0 1 2 --threads 1 2 --out runs/fragility
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from chestssl.config import load_config
from chestssl.train.finetune import finetune
from chestssl.train.protocol import BenchmarkConfig, run_config


def trace(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def summarise(records: list[dict], chosen: int) -> dict:
    best = max(r["val_auc"] for r in records)
    tied = [r for r in records if r["val_auc"] == best]
    late = [r["trace_test_auc"] for r in records[len(records) // 2:]]
    return {
        "epochs": len(records), "chosen_epoch": chosen,
        "chosen_test_auc": next(r["trace_test_auc"] for r in records if r["epoch"] == chosen),
        "best_val_auc": best, "epochs_tied_at_best_val_auc": len(tied),
        "tied_test_auc_range": (min(r["trace_test_auc"] for r in tied), max(r["trace_test_auc"] for r in tied)),
        "late_test_auc_range": (min(late), max(late)), "late_test_auc_median": statistics.median(late),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--init", default="resnet18-scratch")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/fragility")
    args = parser.parse_args()
    overrides = [f"data_dir={args.data_dir}"] if args.data_dir else []
    config = load_config(BenchmarkConfig, args.config, overrides)
    encoders = {k: v for k, v in (("pretrained", config.pretrained), ("pretrained_lung", config.pretrained_lung)) if v}
    report = []
    for seed in args.seeds:
        for threads in args.threads:
            torch.set_num_threads(threads)
            cell = run_config(config, args.init, args.fraction, seed, encoders)
            run_dir = Path(args.out) / f"{args.init}_f{args.fraction:g}_s{seed}_threads{threads}"
            result = finetune(dataclasses.replace(cell, run_dir=str(run_dir), trace_test=True))
            entry = {"seed": seed, "threads": threads, "test_auc": result["test_auc"],
                     **summarise(trace(run_dir), result["best_epoch"])}
            report.append(entry)
            print(json.dumps(entry))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fragility.json").write_text(json.dumps(report, indent=2))
    for seed in args.seeds:
        runs = [e for e in report if e["seed"] == seed]
        aucs = [e["chosen_test_auc"] for e in runs]
        print(f"seed {seed}: chosen epochs {[e['chosen_epoch'] for e in runs]} with threads {args.threads}; "
              f"test AUC {[round(a, 3) for a in aucs]} (moves {max(aucs) - min(aucs):.3f}); "
              f"{runs[0]['epochs_tied_at_best_val_auc']} of {runs[0]['epochs']} epochs tie at val AUC "
              f"{runs[0]['best_val_auc']:.3f}, their test AUC {runs[0]['tied_test_auc_range'][0]:.3f}-"
              f"{runs[0]['tied_test_auc_range'][1]:.3f}")


if __name__ == "__main__":
    main()
