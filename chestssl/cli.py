"""The ``chestssl`` command: pretrain, finetune, benchmark, report.

Every subcommand takes ``--config FILE.yaml`` and ``key=value`` overrides (``section.key=value`` for nested
sections); unknown keys are errors. The resolved config is saved in the run directory.
"""

from __future__ import annotations

import argparse
import logging
import sys

from chestssl.config import load_config
from chestssl.errors import ChestSSLError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the run's settings")
    parser.add_argument("--data-dir", help="data directory (else $CHESTSSL_DATA, else the user cache directory)")
    parser.add_argument("--run-dir", help="where the run writes its files")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")


def _overrides(args: argparse.Namespace, data_dir_key: str = "data_dir") -> list[str]:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"{data_dir_key}={args.data_dir}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chestssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "masked-autoencoder pretraining on unlabelled images"),
        ("finetune", "fine-tune (or linear-probe) a classifier on a labelled fraction"),
        ("benchmark", "label-fraction x seed x initialisation grid with a report"),
    ):
        _add_common(commands.add_parser(name, help=help_text))
    report = commands.add_parser("report", help="rebuild the report of a benchmark run directory")
    report.add_argument("run_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "pretrain":
            from chestssl.train.pretrain import PretrainConfig, pretrain

            path = pretrain(load_config(PretrainConfig, args.config, _overrides(args)))
            print(f"encoder: {path}")
        elif args.command == "finetune":
            from chestssl.train.finetune import FinetuneConfig, finetune

            result = finetune(load_config(FinetuneConfig, args.config, _overrides(args)))
            print(f"results: {result['run_dir']}/results.json  test AUC {result['test_auc']:.4f}  ACC {result['test_acc']:.4f}")
        elif args.command == "benchmark":
            from chestssl.train.protocol import BenchmarkConfig, benchmark

            report_path = benchmark(load_config(BenchmarkConfig, args.config, _overrides(args)))
            print(f"report: {report_path}")
        elif args.command == "report":
            from chestssl.report.tables import write_report

            print(f"report: {write_report(args.run_dir)}")
    except ChestSSLError as error:
        logging.getLogger("chestssl").error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
