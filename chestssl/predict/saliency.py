"""Saliency maps of a classifier from ``monai.visualize``: where the evidence for the predicted class lies.

Legend: ``B`` batch, ``C`` channels, ``S`` spatial (H, W) or (D, H, W), ``K`` model outputs.

- ResNet: Grad-CAM (Selvaraju et al. 2017) on the last stage, upsampled to the input by MONAI. Its resolution is
  that stage's: 4 x 4 for a 28 px input with the small-input stem, 2 x 2 for 64 px with the ImageNet stem (earlier
  stages were tried on a Kermany model: their maps were near-uniform or empty, the usual finding for Grad-CAM
  below the last block).
- ViT: occlusion sensitivity (Zeiler and Fergus 2014): each patch-sized window is replaced by the image's
  mean in turn, and the map is the drop of the explained output; it works on tokens and needs no gradient.
  (Grad-CAM on a ViT's tokens is ill-defined; attention rollout needs the attention weights, which the encoder
  does not keep.)

Both maps are scaled to [0, 1] per image; 1 is where the evidence is strongest.
"""

from __future__ import annotations

import torch
from monai.visualize import GradCAM, OcclusionSensitivity
from torch import nn

OCCLUSION_BATCH = 64  # occluded copies evaluated at once


class _Logits(nn.Module):
    """A classifier as MONAI's visualisers call it: images -> (B, K) logits; a binary model's one logit ``l``
    becomes the two outputs (-l, l), so either class can be explained (their softmax is the sigmoid of 2l)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(x)
        return torch.stack([-logits, logits], dim=-1) if logits.ndim == 1 else logits


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (maps.ndim - 1)
    return (maps - low.view(shape)) / (high - low).clamp_min(1e-12).view(shape)


def saliency(model: nn.Module, x: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """(B, 1, *S) maps in [0, 1] of the evidence for class ``class_index`` (B,) in ``model`` (a fine-tuned
    classifier) on ``x``; for a binary model class 1 is the positive class, 0 the negative one."""
    wrapped = _Logits(model).eval()
    encoder = model.encoder
    if encoder.kind == "resnet":
        cam = GradCAM(wrapped, target_layers=f"model.encoder.stages.{len(encoder.stages) - 1}")
        maps = torch.empty((len(x), 1) + x.shape[2:])
        with torch.enable_grad():
            for k in torch.unique(class_index).tolist():  # one pass per explained class
                rows = torch.nonzero(class_index == k).flatten()
                maps[rows] = cam(x[rows], class_idx=int(k)).detach().float().cpu()
        return _normalise(maps)
    if encoder.kind == "vit":
        occlusion = OcclusionSensitivity(wrapped, mask_size=encoder.config.patch_size, n_batch=OCCLUSION_BATCH,
                                         verbose=False, mode="mean_img", overlap=0.5, activate=False)
        with torch.no_grad():
            base = wrapped(x)  # (B, K)
            maps = []
            for i in range(len(x)):
                occluded, _ = occlusion(x[i : i + 1])  # (1, K, *S): the outputs with each window occluded
                k = int(class_index[i])
                maps.append((base[i, k] - occluded[:, k : k + 1]).clamp_min(0))
        return _normalise(torch.cat(maps).float())
    raise ValueError(f"no saliency method for encoder kind {encoder.kind!r}")
