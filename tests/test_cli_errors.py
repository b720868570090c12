"""User mistakes end in one line naming the mistake and exit code 2: no traceback, nothing written."""

import json

import pytest

from chestssl.cli import main
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.vit import ViTConfig
from chestssl.train.checkpoint import atomic_save, read, save_encoder


@pytest.mark.parametrize("arguments, message", [
    (["finetune", "dataset=nope"], "unknown dataset 'nope'"),
    (["pretrain", "sources=[pneumoniamnist, nope]"], "unknown or no unlabelled source(s) ['nope']"),
    (["finetune", "image_size=0"], "image_size must be at least 1"),
    (["pretrain", "mae.mask_ratio=1.5"], "mae.mask_ratio must be in (0, 1)"),
    (["pretrain", "image_size=30", "vit.patch_size=4"], "not divisible by patch size"),
    (["finetune", "lr=-0.1"], "lr must be positive"),
    (["pretrain", "epochs=0"], "epochs must be at least 1"),
    (["pretrain", "epochs=-1"], "epochs must be at least 1"),
    (["finetune", "batch_size=0"], "batch_size must be at least 1"),
    (["pretrain", "method=simsiam"], "unknown method 'simsiam'"),
    (["finetune", "encoder=resnet50"], "encoder must be one of"),
    (["report", "no/such/folder"], "no results.csv"),
])
def test_one_line_errors(arguments, message, tmp_path, caplog, capsys):
    run_dir = tmp_path / "run"
    extra = [] if arguments[0] == "report" else ["--run-dir", str(run_dir)]
    assert main(arguments + extra) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage() and "\n" not in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err
    assert not run_dir.exists()  # nothing written before the config is known to be valid


def _encoder_file(tmp_path):
    path = tmp_path / "encoder.safetensors"
    encoder = build_encoder(architecture("vit", ViTConfig(patch_size=4, hidden_size=16, depth=1, num_heads=2), 2, 28))
    save_encoder(path, encoder, {"modality": "xray", "spatial_dims": 2, "image_size": 28, "channels": 1,
                                 "pixels": "uint8 grayscale", "normalisation": {"mean": 0.5, "std": 0.25}})
    return path


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta["architecture"].update(image_size=32), "made for other inputs"),
    (lambda meta: (meta["architecture"].update(image_size=32), meta["preprocessing"].update(image_size=32)),
     "image_size: encoder 32 vs data 28"),
    (lambda meta: meta["architecture"].update(colour="red"), "unknown key(s) ['colour']"),
    (lambda meta: meta["architecture"].update(hidden_size=10_000_000, num_heads=1), "implausibly large"),
    (lambda meta: meta["architecture"].update(hidden_size=32), "shape mismatch"),
])
def test_edited_encoder_records_are_refused(change, message, shared_data, tmp_path, caplog):
    path = _encoder_file(tmp_path)
    tensors, meta = read(path)
    change(meta)
    atomic_save(tensors, meta, path)
    arguments = ["finetune", "--data-dir", str(shared_data), "--run-dir", str(tmp_path / "ft"), f"pretrained={path}",
                 "epochs=1"]
    assert main(arguments) == 2
    assert message in caplog.text


def test_a_refused_pretraining_rerun_keeps_its_config(tmp_path, shared_data):
    run = ["pretrain", "--data-dir", str(shared_data), "--run-dir", str(tmp_path / "p"), "sources=[cxr-lungseg-all]",
           "vit.hidden_size=16", "vit.depth=1", "vit.num_heads=2", "mae.decoder_hidden_size=16", "mae.decoder_depth=1",
           "mae.decoder_num_heads=2", "epochs=1", "batch_size=32", "grid_every=0"]
    assert main(run) == 0
    saved = (tmp_path / "p" / "config.yaml").read_text()
    assert main(run + ["base_lr=0.5"]) == 2  # a checkpoint of other settings is not resumed...
    assert (tmp_path / "p" / "config.yaml").read_text() == saved  # ...and its record is not overwritten
    assert json.loads((tmp_path / "p" / "encoder.json").read_text())["architecture"]["hidden_size"] == 16


def test_a_small_folder_dataset_says_how_many_images_each_split_got(tmp_path, caplog):
    from PIL import Image
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["path,label"]
    for index in range(4):
        Image.fromarray(np.full((32, 32), 40 * index, np.uint8)).save(folder / f"{index}.png")
        lines.append(f"{index}.png,{'a' if index % 2 else 'b'}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    arguments = ["finetune", "--run-dir", str(tmp_path / "ft"), "dataset=folder", f"dataset_root={folder}",
                 "image_size=32", "vit.patch_size=8", "epochs=1"]
    assert main(arguments) == 2
    assert "split(s) are empty" in caplog.text and "'train':" in caplog.text  # counts per split, not a traceback
