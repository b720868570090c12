"""A training step of every CNN pretraining method against the plain supervised step of the same ResNet, interleaved.

Every step goes through the loop's own ``train_step`` (forward, bf16 autocast on GPU only, non-finite check,
backward, AdamW step) with AdamW over ``param_groups(model, 0.05)``, on one fixed batch:

- ``supervised``: the dense ResNet, global average pool, a linear head and cross-entropy (the fine-tuning step);
- ``spark``: the method as pretraining builds it (``build_method("spark", ...)``), and ``spark (dense)``: the same
  mask, decoder and loss on the dense ``forward_stages`` of the masked image, so ``spark / spark (dense)`` is the
  cost of the sparse computation alone (gathered batch norm, re-masking);
- ``simclr``, ``mocov2``, ``byol``, ``swav``: each method with the views it asks for (``view_configs``: two views,
  SwAV's two global and four local crops), made once beforehand: the batcher makes views outside the step.

After a warm-up of each, every round times one step of each, the order rotating every round, so drift (clock,
load, other users) reaches all alike. Printed: each step's median seconds with its min-max, the per-round ratio
to the supervised step (median and IQR), and the peak memory of each step on a GPU. Issue target: SparK under 1.5x
the supervised step.

    python benchmarks/method_step.py                                  # 2D 64 px, batch 32, ResNet-18 small-input stem
    python benchmarks/method_step.py --spatial-dims 3 --image-size 64 --batch-size 4 --imagenet-stem
    python benchmarks/method_step.py --methods supervised spark "spark (dense)"   # a subset
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chestssl.data.batch import Batch
from chestssl.data.views import ViewConfig, random_view
from chestssl.methods import build_method, method_class
from chestssl.methods.spark import SparK
from chestssl.methods.sparse import visibility_at
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.patches import grid_size
from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.train.distributed import Context
from chestssl.train.loop import train_step
from chestssl.train.optim import param_groups
from chestssl.train.pretrain import method_views

WEIGHT_DECAY = 0.05  # pretraining's default (PretrainConfig.weight_decay)
JOINT_EMBEDDING = ("simclr", "mocov2", "byol", "swav")


class Supervised(nn.Module):
    """The dense ResNet with a linear head: ``forward(batch)`` is the cross-entropy of its logits."""

    def __init__(self, encoder: ResNet, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_size, num_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.head(self.encoder(batch.images)), batch.labels)


class DenseMasked(nn.Module):
    """SparK's mask, decoder and loss around the dense ResNet fed the masked image (no sparse computation)."""

    def __init__(self, spark: SparK) -> None:
        super().__init__()
        self.spark = spark

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        spark, x = self.spark, batch.images
        mask = spark.make_mask(x)
        spatial = x.shape[2:]
        visible_cells = ~mask.reshape(x.shape[0], *grid_size(spatial, spark.mask_cell))

        def visible_at(stride: int) -> torch.Tensor:
            return visibility_at(visible_cells, spark.mask_cell, stride, [-(-side // stride) for side in spatial])

        stages = spark.encoder.forward_stages(x * visible_at(1))
        visibilities = [visible_at(stride) for stride in spark.encoder.stage_strides]
        prediction = spark.forward_decoder(stages, visibilities, spatial)
        return spark.forward_loss(x, prediction, mask), {}


def loop_step(model: nn.Module, batch: Batch, context: Context) -> Callable[[], float]:
    """One call = one step of the training loop (``chestssl.train.loop.train_step``) on ``batch``."""
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=1e-4, betas=(0.9, 0.95))
    return lambda: train_step(model, optimizer, batch, context)[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                rounds: int) -> dict[str, list[float]]:
    """Seconds of one step of each named step in each round; the order rotates by one every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(steps[name], device))
    return times


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of ``values``."""
    low, _, high = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return statistics.median(values), low, high


def views_batch(name: str, x: torch.Tensor, settings) -> Batch:
    """``x`` with the augmented views method ``name`` asks for, made once (the batcher's work, not the step's)."""
    generator = torch.Generator().manual_seed(0)
    asked = method_views(method_class(name), settings, ViewConfig(), x.shape[-1])
    views = tuple(random_view(x, view, generator)[0] for view in asked)
    return Batch(images=views[0], views=views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial-dims", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--imagenet-stem", action="store_true", help="7x7/2 stem + max-pool (total stride 32)")
    parser.add_argument("--methods", nargs="+", default=None, help="steps to time (default: all)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds timed")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--rounds must be at least 1, --warmup and --threads at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    context = Context(rank=0, world_size=1, device=device)
    shape = (args.batch_size, 1, *([args.image_size] * args.spatial_dims))
    x = torch.randn(shape, device=device)  # (B, 1, *S)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)
    record = architecture("resnet", ResNetConfig(depth=args.depth, small_input=not args.imagenet_stem),
                          args.spatial_dims, args.image_size)

    def fresh(name: str) -> nn.Module:
        torch.manual_seed(0)
        settings = method_class(name).Config()
        return build_method(name, build_encoder(record), settings).to(device)

    builders: dict[str, Callable[[], Callable[[], float]]] = {
        "supervised": lambda: loop_step(Supervised(build_encoder(record)).to(device), Batch(images=x, labels=labels), context),
        "spark": lambda: loop_step(fresh("spark"), Batch(images=x), context),
        "spark (dense)": lambda: loop_step(DenseMasked(fresh("spark")), Batch(images=x), context),
        **{name: (lambda name=name: loop_step(fresh(name), views_batch(name, x, method_class(name).Config()), context))
           for name in JOINT_EMBEDDING},
    }
    chosen = args.methods or list(builders)
    unknown = sorted(set(chosen) - set(builders))
    if unknown or "supervised" not in chosen:
        parser.error(f"--methods must include supervised and name only {list(builders)}; unknown {unknown}")
    steps = {name: builders[name]() for name in chosen}

    load_before = os.getloadavg()[0]
    times = interleaved(steps, device, args.warmup, args.rounds)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {device} ({where}); 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{args.spatial_dims}D {args.image_size}^{args.spatial_dims}, batch {args.batch_size}, ResNet-{args.depth} "
          f"{'ImageNet' if args.imagenet_stem else 'small-input'} stem; each method at its default settings; "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up step(s) each")
    print(f"{'step':<16}{'median s':>10}{'min-max s':>16}{'/ supervised (per round)':>34}")
    for name, seconds in times.items():
        ratio = [s / t for s, t in zip(seconds, times["supervised"])]
        median, q1, q3 = spread(ratio)
        print(f"{name:<16}{statistics.median(seconds):>10.3f}{f'{min(seconds):.3f}-{max(seconds):.3f}':>16}"
              f"{f'{median:.2f}x (IQR {q1:.2f}-{q3:.2f}x)':>34}")
    if "spark" in times and "spark (dense)" in times:
        median, q1, q3 = spread([s / d for s, d in zip(times["spark"], times["spark (dense)"])])
        print(f"spark / spark (dense) (the sparse computation's own cost): {median:.2f}x (IQR {q1:.2f}-{q3:.2f}x)")


if __name__ == "__main__":
    main()
