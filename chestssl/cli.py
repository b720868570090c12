"""The ``chestssl`` command: pretrain, finetune, benchmark, report, prepare-ct, prepare-lidc, predict, export.

The training subcommands take ``--config FILE.yaml`` and ``key=value`` overrides (``section.key=value`` for nested
sections); unknown keys are errors. The resolved config is saved in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from chestssl.config import load_config
from chestssl.errors import ChestSSLError


def _config_class(command: str) -> type:
    if command == "pretrain":
        from chestssl.train.pretrain import PretrainConfig

        return PretrainConfig
    if command == "finetune":
        from chestssl.train.finetune import FinetuneConfig

        return FinetuneConfig
    if command == "benchmark":
        from chestssl.train.protocol import BenchmarkConfig

        return BenchmarkConfig
    from chestssl.data.ct.preprocess import PrepareCTConfig

    return PrepareCTConfig


def _settings_epilog(command: str, argv: list[str]) -> str | None:
    """The generated settings list, built only when help is asked for (it imports torch)."""
    if not {"-h", "--help"} & set(argv) or command not in argv:
        return None
    from chestssl.config import settings_help

    return settings_help(_config_class(command))


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="chestssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "self-supervised pretraining on unlabelled images or CT volumes"),
        ("finetune", "fine-tune (or linear-probe) a classifier on a labelled fraction"),
        ("benchmark", "label-fraction x seed x initialisation grid with a report"),
    ):
        _add_common(commands.add_parser(name, help=help_text, epilog=_settings_epilog(name, argv),
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
    prepare = commands.add_parser("prepare-ct", help="CT folders, files or a manifest CSV -> a cache of lung-cropped cubes",
                                  epilog=_settings_epilog("prepare-ct", argv),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("inputs", nargs="*", metavar="PATH|key=value",
                         help="CT files or folders (DICOM series, NIfTI, NRRD, MHA), and key=value settings")
    prepare.add_argument("--config", help="YAML file with the settings")
    prepare.add_argument("--cache-dir", help="where the cubes and manifest.csv go")
    lidc = commands.add_parser("prepare-lidc", help="LIDC-IDRI nodule cubes with a patient-level split")
    lidc.add_argument("--data-dir", help="data directory holding lidc-nodules/ (else $CHESTSSL_DATA)")
    lidc.add_argument("--cache-dir", required=True, help="where the cubes and manifest.csv go")
    lidc.add_argument("--size", type=int, default=32, help="cube edge in voxels")
    lidc.add_argument("--spacing-mm", type=float, default=1.0, help="isotropic voxel size")
    lidc.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level 70/10/20 split")
    lidc.add_argument("--workers", type=int, default=2)
    lidc.add_argument("--labels", choices=["malignancy", "max-vote"], default="malignancy",
                      help="malignancy: score < 3 benign, > 3 malignant, 3 left unlabelled (the common protocol); "
                           "max-vote: the index's Diagnosis")
    lidc.add_argument("--patches-from", nargs="+", default=(), metavar="PATH",
                      help="full chest CT files or folders: add random lung crops, made like the cubes, for pretraining")
    lidc.add_argument("--patches-per-volume", type=int, default=32, help="lung crops per full CT")
    report = commands.add_parser("report", help="rebuild the report of a benchmark run directory")
    report.add_argument("run_dir")
    report.add_argument("--against", nargs="+", default=(), metavar="INIT",
                        help="also pair every initialisation seed by seed with these (beside resnet18-scratch and "
                             "vit-scratch), e.g. resnet18-mocov2")
    predict = commands.add_parser("predict", help="apply a fine-tuned model to new X-rays or CTs, with heat maps")
    predict.add_argument("-m", "--model", required=True, help="a fine-tuning run directory or its model.safetensors")
    predict.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                         help="image files, CT files, DICOM folders, folders of them, or a CSV (path[, id, mask])")
    predict.add_argument("-o", "--output", required=True, help="folder for predictions.csv/.json, heatmaps/, report.json")
    predict.add_argument("--heatmap", action=argparse.BooleanOptionalAction, default=None,
                         help="write saliency maps (default: on for classification models)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--continue", dest="resume", action="store_true",
                         help="keep the predictions already in OUT and predict only the other inputs")
    predict.add_argument("--batch-size", type=int, default=16, help="inputs prepared and predicted at once")
    export = commands.add_parser("export", help="export a fine-tuned model (ONNX), checked on real inputs")
    export.add_argument("-m", "--model", required=True, help="a fine-tuning run directory or its model.safetensors")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("-o", "--output", required=True, help="the .onnx file (its metadata goes beside it as FILE.onnx.json)")
    export.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                        help="real inputs the exported model is checked on against PyTorch")
    args, extra = parser.parse_known_args(argv)
    if any(item.startswith("-") for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # positional settings given after an option (``--cache-dir X size=32``) land in ``extra``
    for name in ("overrides", "inputs"):
        if hasattr(args, name):
            setattr(args, name, getattr(args, name) + extra)
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
            shown = ("test_auc", "test_acc") if result["task"] == "classification" else ("test_dice", "test_hd95")
            print(f"results: {result['run_dir']}/results.json  " + "  ".join(f"{key} {result[key]:.4f}" for key in shown))
        elif args.command == "benchmark":
            from chestssl.train.protocol import BenchmarkConfig, benchmark

            report_path = benchmark(load_config(BenchmarkConfig, args.config, _overrides(args)))
            print(f"report: {report_path}")
        elif args.command == "prepare-ct":
            from chestssl.data.ct.preprocess import PrepareCTConfig
            from chestssl.data.ct.prepare import prepare_ct

            overrides = [item for item in args.inputs if "=" in item]
            paths = [item for item in args.inputs if "=" not in item]
            if paths:
                overrides.append("inputs=[" + ", ".join(json.dumps(p) for p in paths) + "]")
            if args.cache_dir:
                overrides.append(f"cache_dir={args.cache_dir}")
            print(f"manifest: {prepare_ct(load_config(PrepareCTConfig, args.config, overrides))}")
        elif args.command == "prepare-lidc":
            from chestssl.data.ct.lidc import build_lidc_nodules

            manifest = build_lidc_nodules(args.data_dir, args.cache_dir, size=args.size, spacing_mm=args.spacing_mm,
                                          split_seed=args.split_seed, workers=args.workers, labels=args.labels)
            if args.patches_from:
                from chestssl.data.ct.patches import ct_patches

                manifest = ct_patches(args.patches_from, args.cache_dir, args.patches_per_volume, seed=args.split_seed)
            print(f"manifest: {manifest}")
        elif args.command == "predict":
            from chestssl.predict import predict_to_folder

            if args.batch_size < 1:
                parser.error("--batch-size must be at least 1")
            report = predict_to_folder(args.model, args.input, args.output, args.heatmap, args.device, args.resume,
                                       args.batch_size)
            print(f"predictions: {args.output}/predictions.csv  ({report['predicted']} predicted, {report['failed']} "
                  f"failed, {report['skipped_done']} already done)")
        elif args.command == "export":
            from chestssl.predict.export import export_onnx

            record = export_onnx(args.model, args.output, args.input)
            print(f"onnx: {args.output}  (checked on {record['check']['inputs']} inputs, max |difference| "
                  f"{record['check']['max_abs_difference']:.2g})")
        elif args.command == "report":
            from chestssl.report.tables import write_report

            print(f"report: {write_report(args.run_dir, tuple(args.against))}")
    except ChestSSLError as error:
        logging.getLogger("chestssl").error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
