"""``chestssl predict`` on real chest CTs: every heat map lies on its source scan's grid, non-chest scans are refused.

A classifier with the ``prepare-ct`` preprocessing (lung crop, HU window, cube) is needed; with ``-m`` one you
fine-tuned is used, otherwise a small untrained 3D ResNet is made for the purpose (its probabilities and heat maps
mean nothing: the pipeline and the geometry are what is checked). For each input the heat map NIfTI is read back
and its size, spacing, origin and direction compared with the scan as SimpleITK reads it (a DICOM series as
chestssl stacks it); and the lung mask of the model's cube is carried back the same way and compared with the
lung mask made on the scan itself (Dice), which shows the cube-to-scan mapping lands on the lungs.

    python benchmarks/predict_ct_check.py runs/ct_predict_check ../shared/data/ct/pyradiomics/lung1_image.nrrd \\
        ../shared/data/ct/lung-pet-ct-dx/Lung_Dx-A0001_series2 ../shared/data/ct/totalsegmentator
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from chestssl.data.ct.dicom_series import read_dicom_folder
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.lung_mask import lung_mask
from chestssl.data.ct.ops import resample
from chestssl.data.ct.preprocess import PrepareCTConfig, cube_to_scan, preprocess_volume, preprocessing_record
from chestssl.models.encoders import architecture, build_encoder, record_of
from chestssl.models.resnet import ResNetConfig
from chestssl.predict import predict_to_folder
from chestssl.predict.inputs import find_inputs
from chestssl.train.checkpoint import save_model
from chestssl.train.tasks import Classification


def untrained_model(folder: Path, config: PrepareCTConfig) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(architecture("resnet", ResNetConfig(widths=(8, 16, 32, 64), small_input=False), 3, config.size))
    task = Classification("binary", ("class0", "class1"))
    model = task.build_model(encoder, encoder.feature_size, encoder.head_norm)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.safetensors", model, {
        **task.describe(), "encoder": record_of(encoder), "head": {"feature_size": encoder.feature_size,
        "feature_norm": encoder.head_norm}, "dataset": "ct-cache", "mode": "full", "init": "untrained (pipeline check)",
        "preprocessing": {**preprocessing_record(config), "normalisation": {"mean": 0.5, "std": 0.25}},
        "label_fraction": 1.0})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for the model made here and predict's outputs")
    parser.add_argument("inputs", nargs="+", help="CT files or folders")
    parser.add_argument("-m", "--model", help="a fine-tuned CT model (default: an untrained one made here)")
    parser.add_argument("--size", type=int, default=64, help="cube side of the model made here")
    args = parser.parse_args()
    out = Path(args.out)
    config = PrepareCTConfig(size=args.size)
    model = args.model or untrained_model(out / "model", config)
    report = predict_to_folder(model, args.inputs, out / "predict", device="cpu")
    rows = {row["source"]: row for row in csv.DictReader(open(out / "predict" / "predictions.csv"))}
    for item in find_inputs(args.inputs, "ct"):
        row = rows[item.source]
        if row["status"] != "ok":
            print(f"{item.source}: refused: {row['reason'][:160]}")
            continue
        source = (read_dicom_folder(item.path, item.series or None, False, "raise", list(item.files) or None)[0]
                  if item.path.is_dir() else sitk.ReadImage(str(item.path)))
        heat = sitk.ReadImage(str(out / "predict" / "heatmaps" / f"{row['id']}_heatmap.nii.gz"))
        same = (heat.GetSize() == source.GetSize() and np.allclose(heat.GetSpacing(), source.GetSpacing(), atol=1e-4)
                and np.allclose(heat.GetOrigin(), source.GetOrigin(), atol=1e-3)
                and np.allclose(heat.GetDirection(), source.GetDirection(), atol=1e-6))
        volume = read_ct(item.path, item.series or None, files=list(item.files) or None)
        _, lung_cube, info = preprocess_volume(volume, config)
        back = cube_to_scan(lung_cube, volume, config.spacing_mm, info["crop_start"], info["crop_shape"],
                            info["resampled_shape"])
        mapped = sitk.GetArrayFromImage(sitk.DICOMOrient(back, "LPS")) > 0
        iso = (config.spacing_mm,) * 3
        hu_iso = resample(volume.hu.astype(np.float32), volume.spacing, iso)
        truth = resample(lung_mask(hu_iso, iso), iso, volume.spacing, shape_out=volume.hu.shape)
        dice = 2 * (mapped & truth).sum() / max(1, mapped.sum() + truth.sum())
        print(f"{item.source}: geometry {'equal to the source' if same else 'DIFFERENT'} "
              f"({heat.GetSize()} at {np.round(heat.GetSpacing(), 3).tolist()} mm); cube lungs mapped back vs the scan's "
              f"own lung mask: Dice {dice:.3f}; overlay {out / 'predict' / 'heatmaps' / (row['id'] + '_overlay.png')}")
    print(f"{report['predicted']} predicted, {report['failed']} refused; seconds {report['seconds']}")


if __name__ == "__main__":
    main()
