"""MAE pretraining throughput: chestssl's MAE step against MONAI's MaskedAutoEncoderViT at the same configuration.

Prints images (or volumes) per second of a full training step (forward, backward, AdamW), the achieved FLOP/s
counted by ``torch.utils.flop_counter`` on that step, and its fraction of the fp32 matmul peak measured in the
same run. Default: ViT-Tiny (width 192, depth 12, 3 heads) MAE on 64x64 images with 8x8 patches.

    python benchmarks/mae_throughput.py                      # 2D, 64x64, patch 8
    python benchmarks/mae_throughput.py --spatial-dims 3 --image-size 64 --patch-size 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch.utils.flop_counter import FlopCounterMode

from chestssl.methods.losses import masked_patch_loss
from chestssl.methods.mae import MAE
from chestssl.models.patches import patchify
from chestssl.models.vit import ViT, ViTConfig


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a square matrix product on this device."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def time_steps(step, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one training step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def make_step(model: torch.nn.Module, loss_of, x: torch.Tensor, autocast: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


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
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, *([args.image_size] * args.spatial_dims), device=device)

    config = ViTConfig(spatial_dims=args.spatial_dims, image_size=args.image_size, patch_size=args.patch_size,
                       hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads)
    ours = MAE(ViT(config), args.decoder_hidden_size, args.decoder_depth, args.decoder_num_heads, norm_pix_loss=False).to(device)
    monai = MaskedAutoEncoderViT(
        in_channels=1, img_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
        mlp_dim=4 * args.hidden_size, num_layers=args.depth, num_heads=args.num_heads, masking_ratio=0.75,
        decoder_hidden_size=args.decoder_hidden_size, decoder_mlp_dim=4 * args.decoder_hidden_size,
        decoder_num_layers=args.decoder_depth, decoder_num_heads=args.decoder_num_heads, spatial_dims=args.spatial_dims,
        qkv_bias=True,
    ).to(device)

    def monai_loss(model, batch):
        prediction, mask = model(batch)  # MONAI: mask 1 = hidden, (B, L)
        return masked_patch_loss(prediction.float(), patchify(batch, args.patch_size), mask.bool())

    peak = matmul_peak(device)
    unit = "images" if args.spatial_dims == 2 else "volumes"
    print(f"device {device}, threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{args.spatial_dims}D {args.image_size}^{args.spatial_dims}, patch {args.patch_size}, width {args.hidden_size}, "
          f"depth {args.depth}, batch {args.batch_size}, mask ratio 0.75")
    print(f"{'implementation':<28}{unit + '/s':>12}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}")
    for name, model, loss_of in (("chestssl MAE", ours, lambda m, b: m(b)),
                                 ("MONAI MaskedAutoEncoderViT", monai, monai_loss)):
        step = make_step(model, loss_of, x, autocast)
        flops = count_flops(step)
        seconds = time_steps(step, device, args.warmup, args.repeats)
        print(f"{name:<28}{args.batch_size / seconds:>12.1f}{flops / 1e9:>12.1f}{flops / seconds / 1e9:>10.1f}"
              f"{flops / seconds / peak:>9.0%}")


if __name__ == "__main__":
    main()
