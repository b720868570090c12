"""``chestssl benchmark``: the label-efficiency protocol, label fractions x seeds x initialisations.

One pretraining (or a given encoder), then one fine-tuning run per cell; each finished run appends a row to
``results.csv``, so an interrupted benchmark resumes where it stopped. The report compares every initialisation
at every fraction as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from chestssl.config import apply_overrides, from_dict, save_config, to_dict
from chestssl.report.tables import RESULT_COLUMNS, write_report
from chestssl.train.finetune import FinetuneConfig, finetune
from chestssl.train.pretrain import PretrainConfig, pretrain

log = logging.getLogger(__name__)

# Each initialisation is a set of fine-tuning settings; "{encoder}" is the pretrained encoder file, and
# "{encoder_lung}" the one pretrained with the lung-weighted loss (Dack et al.).
INITS = {
    "resnet18-scratch": ("model=resnet18", "encoder=null", "mode=full", "layer_decay=1.0", "drop_path=0.0"),
    "vit-scratch": ("model=vit", "encoder=null", "mode=full", "layer_decay=1.0"),
    "vit-mae": ("model=vit", "encoder={encoder}", "mode=full"),
    "vit-mae-linear": ("model=vit", "encoder={encoder}", "mode=linear"),
    "vit-mae-lung": ("model=vit", "encoder={encoder_lung}", "mode=full"),
    "vit-mae-lung-linear": ("model=vit", "encoder={encoder_lung}", "mode=linear"),
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """The grid and the settings of its runs.

    ``finetune`` holds the settings shared by every run; ``init_overrides`` adds ``key=value`` settings per
    initialisation (for example a higher learning rate for the ResNet); ``encoder`` skips pretraining.
    The ``vit-mae-lung`` initialisations use a second pretraining, ``pretrain`` with ``lung_weight`` (or the
    given ``encoder_lung``), so the two encoders differ in the loss alone.
    """

    run_dir: str = "runs/benchmark"
    data_dir: str | None = None
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    inits: tuple[str, ...] = ("resnet18-scratch", "vit-scratch", "vit-mae")
    encoder: str | None = None
    encoder_lung: str | None = None
    lung_weight: float = 0.01
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    init_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fraction_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.inits) - set(INITS))
        if unknown:
            raise ValueError(f"unknown initialisation(s) {unknown}; valid: {sorted(INITS)}")
        unknown = sorted(set(self.init_overrides) - set(INITS))
        if unknown:
            raise ValueError(f"init_overrides names unknown initialisation(s) {unknown}; valid: {sorted(INITS)}")
        if self.pretrain.lung_weight is not None and any("{encoder_lung}" in " ".join(INITS[i]) for i in self.inits):
            raise ValueError(f"pretrain.lung_weight={self.pretrain.lung_weight} would make the vit-mae encoder "
                             "lung-weighted too; leave it unset and set lung_weight for the vit-mae-lung encoder")


def run_config(config: BenchmarkConfig, init: str, fraction: float, seed: int, encoders: dict[str, str]) -> FinetuneConfig:
    """The fine-tuning settings of one cell of the grid; ``encoders`` maps "encoder"/"encoder_lung" to files."""
    base = to_dict(config.finetune)
    overrides = list(INITS[init])
    for name, path in encoders.items():
        overrides = [o.replace("{" + name + "}", str(path)) for o in overrides]
    overrides += list(config.init_overrides.get(init, ()))
    for key, values in config.fraction_overrides.items():
        if float(key) == float(fraction):
            overrides += list(values)
    run_dir = Path(config.run_dir) / "runs" / f"{init}_f{fraction:g}_s{seed}"
    overrides += [f"label_fraction={fraction}", f"seed={seed}", f"run_dir={run_dir}"]
    if config.data_dir is not None:
        overrides.append(f"data_dir={config.data_dir}")
    return from_dict(FinetuneConfig, apply_overrides(base, overrides), where=f"benchmark run {init} f={fraction:g} seed={seed}")


def _finished(results_path: Path) -> set[tuple[str, float, int]]:
    if not results_path.exists():
        return set()
    with results_path.open() as stream:
        return {(row["init"], float(row["label_fraction"]), int(row["seed"])) for row in csv.DictReader(stream)}


def benchmark(config: BenchmarkConfig) -> Path:
    """Run the whole grid (resuming a partial one) and write ``results.csv`` and the report; returns its path."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    encoders = {}
    for name, given, folder, lung_weight in (("encoder", config.encoder, "pretrain", config.pretrain.lung_weight),
                                             ("encoder_lung", config.encoder_lung, "pretrain_lung", config.lung_weight)):
        if given is not None:
            encoders[name] = given
        elif any("{" + name + "}" in " ".join(INITS[i]) for i in config.inits):
            encoders[name] = str(pretrain(dataclasses.replace(
                config.pretrain, run_dir=str(run_dir / folder), lung_weight=lung_weight,
                data_dir=config.data_dir or config.pretrain.data_dir)))
    results_path = run_dir / "results.csv"
    done = _finished(results_path)
    # seed by seed, so a stopped benchmark has whole seeds to report
    cells = [(i, f, s) for s in config.seeds for f in config.fractions for i in config.inits]
    for number, (init, fraction, seed) in enumerate(cells, start=1):
        if (init, float(fraction), seed) in done:
            continue
        log.info("benchmark run %d/%d: %s, %g of the labels, seed %d", number, len(cells), init, fraction, seed)
        result = finetune(run_config(config, init, fraction, seed, encoders))
        row = {"init": init, **{key: result.get(key) for key in RESULT_COLUMNS if key != "init"}}
        new_file = not results_path.exists()
        with results_path.open("a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=RESULT_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        write_report(run_dir)
    return write_report(run_dir)
