"""SparK's mask grid at 28 px: short SparK pretraining on PneumoniaMNIST-28 with each grid choice, then a probe.

28 px is not divisible by the small-input ResNet's total stride 8, so the mask grid is a choice:

- ``cell 4``: 4-px cells, a 7 x 7 grid (chestssl's default: the largest stage stride dividing 28); the stride-8
  deepest stage takes every second cell;
- ``cell 2``: 2-px cells, 14 x 14;
- ``cell 7``: 7-px cells, 4 x 4, about the total stride but not aligned with the stage grids;
- ``32 px, cell 8``: the images upsampled to 32 px and masked at the total stride, 4 x 4 (SparK's own rule);
  the probe then also sees 32-px images.

Each choice pretrains the same small ResNet-18 (seeded, same data order) with AdamW; printed per choice: the
cells and visible cells per image, the deepest stage's visible share, the mean loss over the first and the last
20 steps as a share of what predicting zero scores on normalised cells ((P - 1) / P for P values per cell), wall
seconds, and the test AUC of a logistic-regression probe on the frozen encoder's pooled features (a subset of
the official train split -> the official test split), with a randomly initialised encoder as the floor.
A few hundred steps rank the choices roughly at best; they do not replace a full pretraining comparison.

    CHESTSSL_DATA=../shared/data python benchmarks/spark_grid.py [--steps 100] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from chestssl.data.batch import Batch, Normalisation
from chestssl.data.xray.medmnist import load_pneumoniamnist
from chestssl.methods.spark import SparK, SparKConfig
from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.train.optim import param_groups

WIDTHS = (16, 32, 64, 128)  # a quarter-width ResNet-18, so that every choice trains in well under a minute on a core
CHOICES = {"cell 4 (default)": (28, 4), "cell 2": (28, 2), "cell 7": (28, 7), "32 px, cell 8": (32, 8)}


def inputs(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> normalised float (N, 1, size, size), bilinearly upsampled if size is not 28."""
    x = Normalisation().apply(torch.from_numpy(images))
    return x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def probe_auc(encoder: ResNet, train: tuple[torch.Tensor, np.ndarray], test: tuple[torch.Tensor, np.ndarray]) -> float:
    """Test AUC of a logistic regression on the frozen encoder's pooled features (B, F)."""
    encoder.eval()
    features = [torch.cat([encoder(chunk) for chunk in x.split(256)]).numpy() for x, _ in (train, test)]
    scaler = StandardScaler().fit(features[0])
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(features[0]), train[1])
    return float(roc_auc_score(test[1], model.predict_proba(scaler.transform(features[1]))[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CHESTSSL_DATA", "/work/shared/data"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-train", type=int, default=2000, help="train images the probe fits on")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_pneumoniamnist(Path(args.data), 28, "raise", download=False)
    train_images = data.images[data.split == "train"]
    order = np.random.default_rng(0).permutation(len(train_images))
    probe_rows = order[: args.probe_train]
    train_labels, test_labels = data.labels[data.split == "train"][probe_rows], data.labels[data.split == "test"]

    print(f"PneumoniaMNIST-28: {len(train_images)} train images pretrained on, probe {len(probe_rows)} train -> "
          f"{len(test_labels)} test; ResNet-18 widths {WIDTHS}, batch {args.batch_size}, {args.steps} steps, "
          f"AdamW lr {args.lr:g}, mask ratio {SparKConfig.mask_ratio}, {torch.get_num_threads()} threads")
    print(f"{'choice':<18}{'cells':>7}{'visible':>9}{'deepest':>9}{'loss first':>12}{'loss last':>11}"
          f"{'seconds':>9}{'probe AUC':>11}")
    floor_done = set()
    for name, (size, cell) in CHOICES.items():
        pretrain = inputs(train_images, size)
        probe = (pretrain[probe_rows], train_labels), (inputs(data.images[data.split == "test"], size), test_labels)
        torch.manual_seed(0)
        encoder = ResNet(ResNetConfig(widths=WIDTHS), 2, image_size=size)
        if size not in floor_done:  # the floor: the same encoder before any pretraining
            print(f"{f'random init {size} px':<18}{'':>7}{'':>9}{'':>9}{'':>12}{'':>11}{'':>9}"
                  f"{probe_auc(encoder, *probe):>11.3f}")
            encoder.train()
            floor_done.add(size)
        spark = SparK(encoder, SparKConfig(mask_cell=cell, decoder_width=64))
        optimizer = torch.optim.AdamW(param_groups(spark, 0.05), lr=args.lr, betas=(0.9, 0.95))
        generator = torch.Generator().manual_seed(0)
        batches = torch.randperm(len(pretrain), generator=torch.Generator().manual_seed(1))
        losses, deepest, start = [], [], time.perf_counter()
        for step in range(args.steps):
            rows = batches[(step * args.batch_size + torch.arange(args.batch_size)) % len(pretrain)]
            loss, logged = spark(Batch(pretrain[rows]), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            deepest.append(float(logged["deepest_visible"]))
        seconds = time.perf_counter() - start
        cells = (size // cell) ** 2
        zero_loss = (cell * cell - 1) / (cell * cell)  # predicting 0 on cells normalised with the unbiased variance
        visible = max(1, int(cells * (1 - SparKConfig.mask_ratio)))
        print(f"{name:<18}{cells:>7}{visible:>9}{np.mean(deepest):>9.2f}{np.mean(losses[:20]) / zero_loss:>12.3f}"
              f"{np.mean(losses[-20:]) / zero_loss:>11.3f}{seconds:>9.1f}{probe_auc(spark.encoder, *probe):>11.3f}")


if __name__ == "__main__":
    main()
