"""How long 5,000 chest CTs take at 128^3: prepare-ct, reading the cache, and 3D MAE pretraining, from costs
measured in this run.

Measured here, on this machine:
  1. prepare-ct per volume at ``--size`` (read, 1.5 mm resampling, lung mask, crop, resize, compressed save), one
     worker, on the real 512x512 chest CTs of the shared data, plus a thin-slice stand-in: lung2 interpolated to
     1 mm slices (512x512x~300, what a modern scanner writes) and saved as NIfTI, so reading a large file counts.
  2. Reading one cached volume back (what each DataLoader worker does per volume during pretraining), from a
     compressed cache (the default) and a plain one (``prepare-ct compress=false``).
  3. The FLOPs of one 3D MAE training step per volume (``torch.utils.flop_counter``) and its time on this
     device (the GPU when there is one). The step is the training loop's own (``chestssl.train.loop.train_step``)
     on the method built as pretraining builds it, with the lung-weighted L1 loss of a CT run.

Then the totals: prepare-ct over ``--workers`` CPU processes (volumes are independent: linear in workers up to
the cores), and pretraining for ``--epochs`` on one and on eight GPUs, as the slower of the GPU and the loader
workers reading the cache. Without a GPU here, the GPU time is FLOPs / ``--gpu-tflops`` (an assumption, printed as
such); run this script on a GPU machine to replace it with a measurement. Eight GPUs: DDP at ``--ddp-efficiency``.

    python benchmarks/scale_estimate.py                       # ViT-B/16 MAE at 128^3, 5,000 volumes, 100 epochs
    python benchmarks/scale_estimate.py --size 64 --hidden-size 384 --depth 6 --num-heads 6
    python benchmarks/scale_estimate.py --quick               # a fast check: 64^3, a small ViT, one timed step
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mae_throughput import count_flops, loop_step, time_steps  # the sibling script: the same step, timer, count

from chestssl.data.ct.ops import resample
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.preprocess import PrepareCTConfig, preprocess_volume
from chestssl.data.ct.cache import load_volume, save_volume
from chestssl.data.batch import Batch
from chestssl.methods import build_method
from chestssl.methods.mae import MAEConfig
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.vit import ViTConfig
from chestssl.train.distributed import Context

VOLUMES = {
    "lung1 (NRRD, 512x512x48)": "ct/pyradiomics/lung1_image.nrrd",
    "lung2 (NRRD, 512x512x61)": "ct/pyradiomics/lung2_image.nrrd",
    "Lung_Dx-A0001 (DICOM, 512x512x64)": "ct/lung-pet-ct-dx/Lung_Dx-A0001_series2",
}
# --quick: a 64^3 volume, a small MAE and one timed step, for a fast check that the script runs
QUICK = {"size": 64, "hidden_size": 192, "depth": 4, "num_heads": 3, "decoder_hidden_size": 96, "decoder_depth": 2,
         "decoder_num_heads": 4, "repeats": 1}


def thin_slice_stand_in(data: Path, folder: Path) -> Path:
    """lung2 interpolated along z to 1 mm slices and written as NIfTI: the size of a thin-slice chest CT."""
    volume = read_ct(data / VOLUMES["lung2 (NRRD, 512x512x61)"])
    spacing = (1.0, *volume.spacing[1:])
    hu = resample(volume.hu.astype(np.float32), volume.spacing, spacing, "linear")  # (z, y, x) at 1 mm slices
    image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    image.SetSpacing(spacing[::-1])
    path = folder / "thin_slice.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def prepare_seconds(path: Path, config: PrepareCTConfig, output: Path) -> float:
    start = time.perf_counter()
    volume = read_ct(path)
    image, lung, _ = preprocess_volume(volume, config)
    save_volume(output, image, lung)
    return time.perf_counter() - start


def mae_step(args: argparse.Namespace, device: torch.device):
    """One step of the training loop for the 3D MAE of ``args`` on a random batch of volumes and lung masks."""
    vit = ViTConfig(patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth,
                    num_heads=args.num_heads)
    encoder = build_encoder(architecture("vit", vit, spatial_dims=3, image_size=args.size))
    method = build_method("mae", encoder, MAEConfig(
        decoder_hidden_size=args.decoder_hidden_size, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads, norm_pix_loss=False, loss="l1", lung_weight=0.01,
    )).to(device)
    x = torch.rand(args.batch_size, 1, *(args.size,) * 3, device=device)  # (B, 1, D, H, W)
    batch = Batch(images=x, lung_mask=torch.rand_like(x) > 0.5)
    return loop_step(method, batch, Context(rank=0, world_size=1, device=device))


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CHESTSSL_DATA", "../shared/data")))
    parser.add_argument("--volumes", type=int, default=5000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--decoder-hidden-size", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-num-heads", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per timed step on this device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 16, 64], help="prepare-ct worker counts")
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="ASSUMED sustained bf16 TFLOP/s of one GPU when none is here (H100 dense peak ~990)")
    parser.add_argument("--ddp-efficiency", type=float, default=0.9, help="ASSUMED scaling efficiency on 8 GPUs")
    parser.add_argument("--loader-workers-per-gpu", type=int, default=8, help="DataLoader processes per GPU")
    parser.add_argument("--quick", action="store_true", help=f"a fast check: defaults {QUICK} (flags still win)")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = PrepareCTConfig(size=args.size)

    print(f"1. prepare-ct per volume at {args.size}^3, one worker ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cases = {name: args.data / relative for name, relative in VOLUMES.items()}
        cases["lung2 at 1 mm slices (NIfTI, 512x512x~300)"] = thin_slice_stand_in(args.data, folder)
        costs = {}
        for number, (name, path) in enumerate(cases.items()):
            costs[name] = prepare_seconds(path, config, folder / f"v{number}.npz")
            print(f"   {name:<46}{costs[name]:>7.2f} s")
        prepare = costs["lung2 at 1 mm slices (NIfTI, 512x512x~300)"]

        files = sorted(folder.glob("v*.npz"))
        read, megabytes = {}, {}
        for compress in (True, False):
            copies = []
            for number, path in enumerate(files):
                copies.append(folder / f"copy{number}_{compress}.npz")
                save_volume(copies[-1], *load_volume(path), compress=compress)
            start = time.perf_counter()
            for _ in range(5):
                for path in copies:
                    load_volume(path)
            read[compress] = (time.perf_counter() - start) / (5 * len(copies))
            megabytes[compress] = statistics.mean(path.stat().st_size for path in copies) / 1e6
    for compress, name in ((True, "compressed (default)"), (False, "plain (compress=false)")):
        print(f"2. reading one cached {args.size}^3 volume, {name}: {read[compress] * 1000:.0f} ms, "
              f"{megabytes[compress]:.1f} MB: {1 / read[compress]:.0f} volumes/s per loader worker")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = mae_step(args, device)
    flops = count_flops(step) / args.batch_size
    seconds = time_steps(step, device, warmup=1, repeats=args.repeats) / args.batch_size
    print(f"3. MAE step (ViT {args.hidden_size}x{args.depth}, patch {args.patch_size}, decoder "
          f"{args.decoder_hidden_size}x{args.decoder_depth}, 75% masked): {flops / 1e9:.3g} GFLOP per volume; "
          f"{device.type}: {seconds:.3f} s per volume ({flops / seconds / 1e12:.2f} TFLOP/s)")

    volume_steps = args.volumes * args.epochs
    if device.type == "cuda":
        gpu_seconds, source = seconds, f"measured on {torch.cuda.get_device_name()}"
    else:
        gpu_seconds, source = flops / (args.gpu_tflops * 1e12), f"ASSUMED {args.gpu_tflops:g} TFLOP/s, no GPU here"
    print(f"\n{args.volumes} volumes at {args.size}^3, {args.epochs} epochs ({volume_steps:,} volume-steps)")
    for workers in args.workers:
        print(f"   prepare-ct, {workers:>3} CPU workers:  {hours(args.volumes * prepare / workers):>9}"
              "  (thin-slice stand-in; linear in workers up to the cores)")
    print(f"   pretraining, this {device.type}:      {hours(volume_steps * seconds):>9}  (measured)")
    for gpus in (1, 8):
        compute = gpu_seconds / (gpus * (1.0 if gpus == 1 else args.ddp_efficiency))  # seconds per volume-step
        workers = gpus * args.loader_workers_per_gpu
        for compress, name in ((True, "compressed"), (False, "plain")):
            loader = read[compress] / workers
            bound = "GPU" if compute >= loader else "loader"
            print(f"   pretraining, {gpus} GPU(s), {workers:>3} loader workers, {name:>10} cache: "
                  f"{hours(volume_steps * max(compute, loader)):>9}  ({bound}-bound: GPU {hours(volume_steps * compute)} "
                  f"[{source}{'' if gpus == 1 else f', {args.ddp_efficiency:.0%} DDP scaling ASSUMED'}], "
                  f"loader {hours(volume_steps * loader)})")

if __name__ == "__main__":
    main()
