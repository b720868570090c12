"""MAE pretraining throughput: chestssl's MAE training step against MONAI's MaskedAutoEncoderViT, interleaved.

chestssl's side is what pretraining runs: the method built through the registry (``build_method("mae", ...)``
around ``build_encoder(architecture("vit", ...))``), AdamW over ``param_groups(method, 0.05)``, and the loop's own
``train_step`` (forward with the method's mask draw and loss, bf16 autocast on GPU, non-finite check, backward,
AdamW step). MONAI's side is its ``MaskedAutoEncoderViT`` at the same sizes, its own forward (its own mask draw)
and the same masked-patch MSE in an equivalent step with the same optimiser.

The two run in alternating rounds after a warm-up of both: each round times ``--steps-per-round`` steps of one
implementation, then as many of the other, the order flipping every round, so machine drift (clock, load, other
users) reaches both alike instead of reading as a speed difference. Printed: each implementation's median
throughput over the rounds with its min-max, the step's FLOPs (``torch.utils.flop_counter`` on that very step)
and achieved FLOP/s as a fraction of the fp32 matmul peak measured in the same run, and the per-round ratio of
chestssl's throughput to MONAI's as a median with its interquartile range and min-max.
Default: ViT-Tiny (width 192, depth 12, 3 heads) MAE, decoder 128 x 2, on 64x64 images with 8x8 patches.

    python benchmarks/mae_throughput.py                      # 2D, 64x64, patch 8, batch 256, 20 rounds
    python benchmarks/mae_throughput.py --spatial-dims 3 --image-size 64 --patch-size 16 --batch-size 32 \\
        --decoder-hidden-size 96                             # 3D (MONAI's 3D sin-cos needs a width divisible by 6)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chestssl.data.batch import Batch
from chestssl.methods import build_method
from chestssl.methods.losses import masked_patch_loss
from chestssl.methods.mae import MAEConfig
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.patches import patchify
from chestssl.models.vit import ViTConfig
from chestssl.train.distributed import Context
from chestssl.train.loop import train_step
from chestssl.train.optim import param_groups

WEIGHT_DECAY = 0.05  # pretraining's default (PretrainConfig.weight_decay)


def pretraining_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW as pretraining builds it: no decay for biases, norms and tokens; MAE's betas."""
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=1.5e-4, betas=(0.9, 0.95))


def loop_step(method: nn.Module, batch: Batch, context: Context) -> Callable[[], float]:
    """One call = one step of the training loop (``chestssl.train.loop.train_step``) on ``batch``."""
    optimizer = pretraining_optimizer(method)
    return lambda: train_step(method, optimizer, batch, context)[0]


def monai_step(model: MaskedAutoEncoderViT, x: torch.Tensor, patch_size: int) -> Callable[[], float]:
    """MONAI's forward with the masked-patch MSE, in a step doing what ``train_step`` does around a forward."""
    optimizer = pretraining_optimizer(model)

    def step() -> float:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            prediction, mask = model(x)  # (B, L, P); MONAI's mask: 1 = hidden, (B, L)
            loss = masked_patch_loss(prediction.float(), patchify(x, patch_size).float(), mask.bool())
        if not torch.isfinite(loss.detach()):  # train_step's check, the same device sync
            raise RuntimeError(f"MONAI loss is not finite: {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a square matrix product on this device."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def seconds_per_step(step: Callable[[], object], device: torch.device, count: int = 1) -> float:
    """Mean seconds of ``count`` consecutive calls of ``step``, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / count


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one training step, alone (no other implementation to interleave with)."""
    for _ in range(warmup):
        step()
    return statistics.median(seconds_per_step(step, device) for _ in range(repeats))


def interleaved_rounds(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int,
                       steps_per_round: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each named step in each round: every round runs ``steps_per_round`` of each in
    turn, the order reversed every other round (A B, B A, ...), so drift affects all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            times[name].append(seconds_per_step(steps[name], device, steps_per_round))
    return times


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward, backward and optimiser), by ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """Median, quartiles and extremes of ``values``."""
    low, _, high = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return statistics.median(values), low, high, min(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial-dims", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--decoder-hidden-size", type=int, default=128)
    parser.add_argument("--decoder-depth", type=int, default=2)
    parser.add_argument("--decoder-num-heads", type=int, default=4)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each implementation first")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds timed")
    parser.add_argument("--steps-per-round", type=int, default=1, help="steps of each implementation per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps_per_round < 1 or args.warmup < 0:
        parser.error("--repeats and --steps-per-round must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    context = Context(rank=0, world_size=1, device=device)
    x = torch.randn(args.batch_size, 1, *([args.image_size] * args.spatial_dims), device=device)  # (B, 1, *S)

    torch.manual_seed(0)
    vit = ViTConfig(patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth,
                    num_heads=args.num_heads)
    encoder = build_encoder(architecture("vit", vit, args.spatial_dims, args.image_size))
    method = build_method("mae", encoder, MAEConfig(
        decoder_hidden_size=args.decoder_hidden_size, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads, mask_ratio=args.mask_ratio, norm_pix_loss=False, loss="mse",
    )).to(device)
    torch.manual_seed(0)
    monai = MaskedAutoEncoderViT(
        in_channels=1, img_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
        mlp_dim=4 * args.hidden_size, num_layers=args.depth, num_heads=args.num_heads, masking_ratio=args.mask_ratio,
        decoder_hidden_size=args.decoder_hidden_size, decoder_mlp_dim=4 * args.decoder_hidden_size,
        decoder_num_layers=args.decoder_depth, decoder_num_heads=args.decoder_num_heads, spatial_dims=args.spatial_dims,
        qkv_bias=True,
    ).to(device)
    steps = {"chestssl MAE (train_step)": loop_step(method, Batch(images=x), context),
             "MONAI MaskedAutoEncoderViT": monai_step(monai, x, args.patch_size)}

    load_before = os.getloadavg()[0]  # other work on the machine, shown beside the figures
    peak_before = matmul_peak(device)
    flops = {name: count_flops(step) for name, step in steps.items()}  # also a first warm-up step of each
    times = interleaved_rounds(steps, device, args.warmup, args.repeats, args.steps_per_round)
    peak = max(peak_before, matmul_peak(device))  # the better of before and after: drift lowers either

    unit = "images" if args.spatial_dims == 2 else "volumes"
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {device} ({where}), fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (best of before and after), "
          f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this run's own threads count)")
    print(f"{args.spatial_dims}D {args.image_size}^{args.spatial_dims}, patch {args.patch_size}, width "
          f"{args.hidden_size}, depth {args.depth}, heads {args.num_heads}, decoder {args.decoder_hidden_size} x "
          f"{args.decoder_depth}, batch {args.batch_size}, mask ratio {args.mask_ratio:g}; {args.repeats} interleaved "
          f"rounds of {args.steps_per_round} step(s) each after {args.warmup} warm-up step(s)")
    print(f"{'implementation':<28}{'median ' + unit + '/s':>18}{'min-max':>16}{'GFLOP/step':>12}{'GFLOP/s':>10}"
          f"{'of peak':>9}")
    for name, seconds in times.items():
        throughput = [args.batch_size / s for s in seconds]
        median, _, _, low, high = spread(throughput)
        achieved = flops[name] * median / args.batch_size  # FLOP/s at the median throughput
        print(f"{name:<28}{median:>18.1f}{f'{low:.1f}-{high:.1f}':>16}{flops[name] / 1e9:>12.1f}"
              f"{achieved / 1e9:>10.1f}{achieved / peak:>9.0%}")
    ours, theirs = times.values()
    ratios = [monai_seconds / our_seconds for our_seconds, monai_seconds in zip(ours, theirs)]
    median, q1, q3, low, high = spread(ratios)
    print(f"chestssl / MONAI throughput, per round: median {median:.2f}x, interquartile {q1:.2f}-{q3:.2f}x, "
          f"min-max {low:.2f}-{high:.2f}x over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
