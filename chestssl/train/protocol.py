"""``chestssl benchmark``: the label-efficiency protocol, label budgets x seeds x initialisations.

A budget is a label fraction (``fractions``, stratified by class) or, for segmentation, a number of labelled
images (``label_counts``; 0 means all of them).

One pretraining (or a given encoder), then one fine-tuning run per cell; each finished run appends a row to
``results.csv``, so an interrupted benchmark resumes where it stopped. The report compares every initialisation
at every fraction as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from chestssl.config import apply_overrides, from_dict, save_config, to_dict
from chestssl.data.xray.unlabelled import LUNGSEG_ALL
from chestssl.report.tables import append_result, write_report
from chestssl.train.finetune import FinetuneConfig, check_label_subsets, finetune
from chestssl.train.loop import resume_identity
from chestssl.train.pretrain import ENCODER_NAME, PretrainConfig, pretrain
from chestssl.train.reuse import check_reusable

log = logging.getLogger(__name__)

# Each initialisation is a set of fine-tuning settings. "{pretrained}" is the pretrained encoder file and
# "{pretrained_lung}" the one pretrained with the lung-weighted loss (Dack et al.). "{pretrained?}" is optional:
# the ViT from scratch is built from the pretrained encoder's own architecture record when there is one (its
# twin), else from the finetune section's vit settings.
INITS = {
    "resnet18-scratch": ("encoder=resnet", "resnet.depth=18", "pretrained=null", "architecture_of=null", "mode=full",
                         "layer_decay=1.0", "drop_path=0.0"),
    "vit-scratch": ("encoder=vit", "pretrained=null", "architecture_of={pretrained?}", "mode=full", "layer_decay=1.0"),
    "vit-mae": ("pretrained={pretrained}", "architecture_of=null", "mode=full"),
    "vit-mae-linear": ("pretrained={pretrained}", "architecture_of=null", "mode=linear"),
    "vit-mae-lung": ("pretrained={pretrained_lung}", "architecture_of=null", "mode=full"),
    "vit-mae-lung-linear": ("pretrained={pretrained_lung}", "architecture_of=null", "mode=linear"),
}
# The ResNet-18 pretrained by each CNN method (Wolf et al.'s comparison), with "{pretrained:METHOD}" its encoder
# file: full fine-tuning, a linear probe, and freeze-then-unfreeze (the encoder frozen for the first epochs, then
# trained at a tenth of the rate; change freeze_epochs per grid with init_overrides).
RESNET_METHODS = ("spark", "simclr", "mocov2", "byol", "swav")
for _method in RESNET_METHODS:
    _file = "pretrained={pretrained:" + _method + "}"
    INITS[f"resnet18-{_method}"] = (_file, "architecture_of=null", "mode=full", "layer_decay=1.0", "drop_path=0.0")
    INITS[f"resnet18-{_method}-linear"] = (_file, "architecture_of=null", "mode=linear")
    INITS[f"resnet18-{_method}-ft"] = (_file, "architecture_of=null", "mode=full", "layer_decay=1.0", "drop_path=0.0",
                                       "freeze_epochs=5", "unfreeze_lr_scale=0.1")
# The ViT pretrained by a method other than the pretrain section's own (SPCXR's group masking beside MAE): the
# pretrain section with method=METHOD, so the two ViTs differ in the method alone.
VIT_METHODS = ("groupmask",)
for _method in VIT_METHODS:
    _file = "pretrained={pretrained:" + _method + "}"
    INITS[f"vit-{_method}"] = (_file, "architecture_of=null", "mode=full")
    INITS[f"vit-{_method}-linear"] = (_file, "architecture_of=null", "mode=linear")


@dataclass(frozen=True)
class BenchmarkConfig:
    """The grid and the settings of its runs.

    ``finetune`` holds the settings shared by every run; ``init_overrides`` adds ``key=value`` settings per
    initialisation (for example a higher learning rate for the ResNet); ``pretrained`` skips pretraining.
    The ``vit-mae-lung`` initialisations use a second pretraining, ``pretrain`` with ``mae.lung_weight`` set to
    ``lung_weight`` (or the given ``pretrained_lung``), so the two encoders differ in the loss alone.
    """

    run_dir: str = "runs/benchmark"  # where the grid writes results.csv, the report and every run
    data_dir: str | None = None  # data folder (else $CHESTSSL_DATA, else the user cache directory)
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # label fractions of the grid
    label_counts: tuple[int, ...] = ()  # instead of fractions: numbers of labelled training images (0: all)
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds of every fraction
    inits: tuple[str, ...] = ("resnet18-scratch", "vit-scratch", "vit-mae")  # initialisations compared (see chestssl.train.protocol.INITS)
    pretrained: str | None = None  # an encoder file to use instead of pretraining
    pretrained_lung: str | None = None  # an encoder file pretrained with the lung-weighted loss
    lung_weight: float = 0.01  # lung_weight of the vit-mae-lung pretraining
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the pretraining settings
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the settings every fine-tuning run shares
    init_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key=value settings per initialisation
    fraction_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key=value settings per label fraction
    fraction_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # seeds for a fraction instead of seeds (more where runs are cheap and noisy)
    method_pretrained: dict[str, str] = field(default_factory=dict)  # METHOD: an encoder file for the resnet18-METHOD inits instead of pretraining it
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # METHOD: key=value pretraining settings of that method's encoder (mae: the vit-mae ones)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.inits) - set(INITS))
        if unknown:
            raise ValueError(f"unknown initialisation(s) {unknown}; valid: {sorted(INITS)}")
        unknown = sorted(set(self.init_overrides) - set(INITS))
        if unknown:
            raise ValueError(f"init_overrides names unknown initialisation(s) {unknown}; valid: {sorted(INITS)}")
        if not self.fractions or not self.seeds or not self.inits:
            raise ValueError("fractions, seeds and inits must each name at least one value")
        unknown = sorted(k for k in self.fraction_seeds if float(k) not in self.fractions)
        if unknown:
            raise ValueError(f"fraction_seeds names fraction(s) {unknown} that are not in fractions {list(self.fractions)}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        if (self.finetune.task == "segmentation" and self.pretrain.spatial_dims == 2
                and LUNGSEG_ALL in self.pretrain.sources):
            raise ValueError(f"pretrain.sources holds {LUNGSEG_ALL}, every lung segmentation image with the test "
                             "images; a segmentation benchmark pretrains on cxr-lungseg / cxr-lungseg-covid, which "
                             "leave their test splits out")
        if any(n < 0 for n in self.label_counts):
            raise ValueError(f"label_counts must be >= 0 (0: all labelled images), got {list(self.label_counts)}")
        if self.label_counts and (self.fraction_seeds or self.fraction_overrides):
            raise ValueError("fraction_seeds and fraction_overrides apply to a grid of fractions, not of label_counts")
        unknown = sorted(set(self.method_pretrained) - set(RESNET_METHODS + VIT_METHODS))
        unknown += sorted(set(self.method_overrides) - {"mae", *RESNET_METHODS, *VIT_METHODS})
        if unknown:
            raise ValueError(f"method_pretrained / method_overrides name unknown method(s) {unknown}; valid: "
                             f"{list(RESNET_METHODS + VIT_METHODS)} (and mae for method_overrides)")
        pretrained_resnets = [i for i in self.inits if i.startswith("resnet18-") and i != "resnet18-scratch"]
        if "resnet18-scratch" in self.inits and pretrained_resnets and self.pretrain.resnet != self.finetune.resnet:
            raise ValueError(f"resnet18-scratch is built from finetune.resnet {self.finetune.resnet} but {pretrained_resnets} "
                             f"from pretrain.resnet {self.pretrain.resnet}: set both alike, or the comparison is not "
                             "between twins")
        lung_weight = self.pretrain.mae.lung_weight
        if lung_weight is not None and any("{pretrained_lung}" in " ".join(INITS[i]) for i in self.inits):
            raise ValueError(f"pretrain.mae.lung_weight={lung_weight} would make the vit-mae encoder "
                             "lung-weighted too; leave it unset and set lung_weight for the vit-mae-lung encoder")


def _substitute(overrides: list[str], encoders: dict[str, str]) -> list[str]:
    out = []
    for override in overrides:
        for name, path in encoders.items():
            override = override.replace("{" + name + "}", str(path)).replace("{" + name + "?}", str(path))
        if "?}" in override:  # an optional placeholder with no encoder: leave the setting at its default
            continue
        out.append(override)
    return out


def run_config(config: BenchmarkConfig, init: str, budget: float, seed: int, encoders: dict[str, str]) -> FinetuneConfig:
    """The fine-tuning settings of one cell of the grid (``budget`` a fraction, or a label count when the grid has
    ``label_counts``); ``encoders`` maps "pretrained"/"pretrained_lung"/"pretrained:METHOD" to files."""
    base = to_dict(config.finetune)
    overrides = _substitute(list(INITS[init]), encoders)
    overrides += list(config.init_overrides.get(init, ()))
    for key, values in config.fraction_overrides.items():
        if float(key) == float(budget):
            overrides += list(values)
    if config.label_counts:
        run_dir = Path(config.run_dir) / "runs" / f"{init}_n{'all' if not budget else int(budget)}_s{seed}"
        overrides += ["label_fraction=1.0", f"label_count={int(budget)}"]
    else:
        run_dir = Path(config.run_dir) / "runs" / f"{init}_f{budget:g}_s{seed}"
        overrides += [f"label_fraction={budget}"]
    overrides += [f"seed={seed}", f"run_dir={run_dir}"]
    if config.data_dir is not None:
        overrides.append(f"data_dir={config.data_dir}")
    return from_dict(FinetuneConfig, apply_overrides(base, overrides), where=f"benchmark run {init} budget={budget:g} seed={seed}")


def _finished(results_path: Path, by_count: bool) -> set[tuple[str, float, int]]:
    if not results_path.exists():
        return set()
    column = "label_count" if by_count else "label_fraction"
    with results_path.open() as stream:
        return {(row["init"], float(row[column]), int(row["seed"])) for row in csv.DictReader(stream)}


def pretraining_folder(name: str) -> str:
    """The folder in a benchmark's run_dir of the pretraining behind encoder placeholder ``name``:
    "pretrained" -> "pretrain", "pretrained_lung" -> "pretrain_lung", "pretrained:spark" -> "pretrain_spark"."""
    return "pretrain" + name.removeprefix("pretrained").replace(":", "_")


def init_pretraining(init: str) -> str | None:
    """The pretraining folder whose encoder initialisation ``init`` starts from; None for one from scratch."""
    found = re.search(r"pretrained=\{([^}?]+)\}", " ".join(INITS.get(init, ())))
    return pretraining_folder(found.group(1)) if found else None


def _encoders(config: BenchmarkConfig) -> tuple[dict[str, str], list[tuple[str, PretrainConfig]]]:
    """The encoder files the grid uses, and the pretrainings still to run for them (paths known beforehand)."""
    run_dir = Path(config.run_dir)
    encoders, pretrainings = {}, []
    for name, given, lung_weight in (("pretrained", config.pretrained, config.pretrain.mae.lung_weight),
                                     ("pretrained_lung", config.pretrained_lung, config.lung_weight)):
        needed = any("{" + name + "}" in " ".join(INITS[i]) for i in config.inits)
        folder = pretraining_folder(name)
        if given is not None:
            encoders[name] = given
        elif needed:
            base = to_dict(dataclasses.replace(
                config.pretrain, run_dir=str(run_dir / folder), data_dir=config.data_dir or config.pretrain.data_dir,
                mae=dataclasses.replace(config.pretrain.mae, lung_weight=lung_weight)))
            pretrain_config = from_dict(PretrainConfig, apply_overrides(base, list(config.method_overrides.get("mae", ()))),
                                        where=f"pretraining {folder}")
            encoders[name] = str(run_dir / folder / ENCODER_NAME)
            pretrainings.append((name, pretrain_config))
    for method in RESNET_METHODS + VIT_METHODS:
        name = f"pretrained:{method}"
        if method in config.method_pretrained:
            encoders[name] = config.method_pretrained[method]
        elif any("{" + name + "}" in " ".join(INITS[i]) for i in config.inits):
            base = to_dict(dataclasses.replace(config.pretrain, run_dir=str(run_dir / pretraining_folder(name)),
                                               data_dir=config.data_dir or config.pretrain.data_dir))
            kind = "resnet" if method in RESNET_METHODS else "vit"
            overrides = [f"method={method}", f"encoder={kind}", *config.method_overrides.get(method, ())]
            pretrain_config = from_dict(PretrainConfig, apply_overrides(base, overrides), where=f"pretraining {method}")
            encoders[name] = str(run_dir / pretraining_folder(name) / ENCODER_NAME)
            pretrainings.append((name, pretrain_config))
    return encoders, pretrainings


def budgets(config: BenchmarkConfig) -> tuple[float, ...]:
    """The grid's budgets: its label counts where it has them, else its fractions."""
    return tuple(config.label_counts) if config.label_counts else tuple(config.fractions)


def seeds_of(config: BenchmarkConfig, fraction: float) -> tuple[int, ...]:
    """The seeds run at ``fraction``: ``fraction_seeds`` where it names the fraction (more seeds where runs are
    cheap and noisy, such as 1% of the labels), else ``seeds``."""
    for key, seeds in config.fraction_seeds.items():
        if float(key) == float(fraction):
            return tuple(seeds)
    return tuple(config.seeds)


def grid_cells(config: BenchmarkConfig) -> list[tuple[str, float, int]]:
    """(init, fraction, seed) in run order: seed by seed, so a stopped benchmark has whole seeds to report."""
    seeds = sorted({s for f in budgets(config) for s in seeds_of(config, f)})
    return [(i, f, s) for s in seeds for f in budgets(config) if s in seeds_of(config, f) for i in config.inits]


def grid_runs(config: BenchmarkConfig) -> list[FinetuneConfig]:
    """The fine-tuning settings of every cell in run order, with the encoder files where the grid's pretrainings
    write them (nothing is run)."""
    encoders, _ = _encoders(config)
    return [run_config(config, init, budget, seed, encoders) for init, budget, seed in grid_cells(config)]


def benchmark(config: BenchmarkConfig) -> Path:
    """Run the whole grid (resuming a partial one) and write ``results.csv`` and the report; returns its path.

    A cell already in ``results.csv`` is reused only if its run was made with the settings asked for now; a
    changed setting stops the benchmark, naming it, before anything is written. So does a label budget that a
    pending cell cannot draw from the data (before any pretraining).
    """
    run_dir = Path(config.run_dir)
    results_path = run_dir / "results.csv"
    encoders, pretrainings = _encoders(config)
    cells = grid_cells(config)
    done = _finished(results_path, bool(config.label_counts))
    pending = []
    for init, fraction, seed in cells:
        cell = run_config(config, init, fraction, seed, encoders)
        if (init, float(fraction), seed) in done:
            check_reusable(Path(cell.run_dir), resume_identity(cell, cell.unused_sections()), cell.overwrite)
        else:
            pending.append(cell)
    check_label_subsets(pending)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    for name, pretrain_config in pretrainings:
        encoders[name] = str(pretrain(pretrain_config))
    for number, (init, fraction, seed) in enumerate(cells, start=1):
        amount = (f"{int(fraction) or 'all'} labelled images" if config.label_counts else f"{fraction:g} of the labels")
        log.info("benchmark run %d/%d: %s, %s, seed %d", number, len(cells), init, amount, seed)
        result = finetune(run_config(config, init, fraction, seed, encoders))
        if (init, float(fraction), seed) in done:
            continue
        append_result(results_path, {**result, "init": init})
        write_report(run_dir)
    return write_report(run_dir)
