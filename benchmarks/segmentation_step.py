"""A training step of the segmentation models (ResNet U-Net, ViT UNETR-style) against the classification step of
the same encoder, interleaved, so the cost of a label-count budget can be planned from one run.

Every step is the loop's own ``train_step`` (forward with Dice + cross-entropy or the classifier's loss,
backward, AdamW) on one fixed batch of random images and label maps; each round times one step of each model,
the order rotating, and the median with its quartiles and the ratio to the encoder's classification step are
printed.

    python benchmarks/segmentation_step.py                       # 2D 128 px, batch 8, as configs/cxr_lungseg.yaml
    python benchmarks/segmentation_step.py --image-size 64 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from chestssl.data.batch import Batch
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.heads import Classifier
from chestssl.models.resnet import ResNetConfig
from chestssl.models.segmentation import build_segmentation
from chestssl.models.vit import ViTConfig
from chestssl.train.distributed import Context
from chestssl.train.optim import param_groups

from method_step import interleaved, loop_step, spread  # noqa: E402 (the shared timing of benchmarks/)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=2, help="K, background included")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    context = Context(rank=0, world_size=1, device=device)
    torch.manual_seed(0)
    size = args.image_size
    x = torch.randn(args.batch_size, 1, size, size, device=device)
    maps = torch.randint(0, args.classes, (args.batch_size, size, size), device=device)
    classes = torch.randint(0, 2, (args.batch_size,), device=device)
    encoders = {
        "resnet18": architecture("resnet", ResNetConfig(depth=18, small_input=False), 2, size),
        "vit-p16": architecture("vit", ViTConfig(patch_size=16, hidden_size=192, depth=6, num_heads=3), 2, size),
    }
    steps = {}
    for name, record in encoders.items():
        segmenter = build_segmentation(build_encoder(record), args.classes).to(device)
        encoder = build_encoder(record)
        classifier = Classifier(encoder, encoder.feature_size, 1, "binary", feature_norm=encoder.head_norm).to(device)
        steps[f"{name} segmentation"] = loop_step(segmenter, Batch(images=x, labels=maps), context)
        steps[f"{name} classification"] = loop_step(classifier, Batch(images=x, labels=classes), context)
    print(f"{device}, {torch.get_num_threads()} threads, {size} px, batch {args.batch_size}, {args.classes} classes, "
          f"{args.rounds} rounds (cpu count {os.cpu_count()})")
    times = interleaved(steps, device, args.warmup, args.rounds)
    for name, values in times.items():
        median, low, high = spread(values)
        base = name.split()[0] + " classification"
        ratios = [a / b for a, b in zip(values, times[base])]
        print(f"{name:28s} {median:7.3f} s  [{low:.3f}, {high:.3f}]  x{statistics.median(ratios):.2f} of {base}")


if __name__ == "__main__":
    main()
