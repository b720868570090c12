"""The contract every entry of METHODS keeps, in 2D and 3D: it builds from its config section, its loss is finite
and falls on a fixed batch through the real loop, ``after_step`` is called, and the encoder it hands off loads
strictly into a fine-tuning model of the recorded architecture."""

import dataclasses

import numpy as np
import pytest
import torch

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.methods import METHODS, build_method, method_class
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.resnet import ResNetConfig
from chestssl.models.vit import ViTConfig
from chestssl.train.checkpoint import load_encoder, load_weights, read, save_encoder
from chestssl.train.distributed import Context
from chestssl.train.loop import Schedule, fit
from chestssl.train.optim import param_groups
from chestssl.train.pretrain import method_views
from chestssl.train.tasks import Classification

SMALL_ENCODERS = {"vit": ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2),
                  "resnet": ResNetConfig(widths=(8, 8, 16, 16))}
# the smallest settings of each method's own section that still exercise it
SMALL_SETTINGS = {
    "mae": {"decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "simclr": {"projection_hidden_size": 32, "projection_size": 16},
    "mocov2": {"projection_hidden_size": 32, "projection_size": 16, "queue_size": 32},
    "spark": {"decoder_width": 16, "mask_cell": 4},
    "byol": {"projection_hidden_size": 32, "projection_size": 16},
    "swav": {"projection_hidden_size": 32, "projection_size": 16, "num_prototypes": 16, "local_crops": 2,
             "local_crop_size": 8, "freeze_prototypes_steps": 2},
    "groupmask": {"head_hidden_size": 32},
}


def smooth_images(count, spatial_dims, side=16):
    """uint8 (count, 1, side^dims): random 4^dims grids upsampled, so a hidden region follows from its neighbours
    (independent noise pixels would leave a reconstruction method nothing to learn in a few steps)."""
    coarse = torch.from_numpy(np.random.default_rng(0).random((count, 1) + (4,) * spatial_dims, dtype=np.float32))
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    fine = torch.nn.functional.interpolate(coarse, size=(side,) * spatial_dims, mode=mode, align_corners=False)
    return (fine * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _needs_views(cls, settings):
    return len(method_views(cls, settings, ViewConfig(), 16)) > 1


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'maee'; valid: mae"):
        method_class("maee")


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_method_contract(name, spatial_dims, tmp_path):
    cls = METHODS[name]
    kind = cls.encoders[0]
    settings = dataclasses.replace(cls.Config(), **SMALL_SETTINGS.get(name, {}))
    torch.manual_seed(0)
    encoder = build_encoder(architecture(kind, SMALL_ENCODERS[kind], spatial_dims, 16))
    method = build_method(name, encoder, settings)
    images = smooth_images(8, spatial_dims)
    # one fixed batch; a method that needs several views gets them (its own view configs, as in pretraining)
    views = method_views(cls, settings, ViewConfig(), 16) if _needs_views(cls, settings) else ()
    batches = Batches(images, None, 8, Normalisation(), views, shuffle=False)
    calls = []
    method.after_step = lambda progress, original=getattr(method, "after_step", None): (
        calls.append(progress.step), original and original(progress))
    losses = []

    def record(epoch):
        torch.manual_seed(1234)  # the same masks or views at every evaluation: a fixed problem
        with torch.no_grad():
            output = method(next(iter(batches.epoch(0, 0))))
        losses.append(float((output[0] if isinstance(output, tuple) else output).item()))
        return {}

    optimizer = torch.optim.AdamW(param_groups(method, 0.0), lr=2e-3)
    fit(method, optimizer, lambda epoch: batches.epoch(0, 0), Schedule(epochs=15, steps_per_epoch=1, lr=2e-3), Context(0, 1, torch.device("cpu")),
        tmp_path / "run", 0, {"contract": name}, checkpoint_seconds=1e9, on_epoch_end=record)
    assert calls == list(range(15))
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, method.encoder, {"modality": "test"})
    loaded, meta = load_encoder(path)
    task = Classification("binary", ("a", "b"))
    model = task.build_model(loaded, loaded.feature_size, loaded.head_norm)
    tensors, _ = read(path)
    load_weights(model.encoder, tensors, str(path))  # strict: every key, every shape
    assert model.logits(torch.randn(2, 1, *([16] * spatial_dims))).shape == (2,)
