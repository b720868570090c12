"""An interrupted run resumed from its last checkpoint ends in the same state as an uninterrupted run."""

from pathlib import Path

import numpy as np
import pytest
import torch

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.methods.mae import MAE, MAEConfig
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train.distributed import Context
from chestssl.train.loop import Schedule, fit


class Interrupted(Exception):
    pass



def run(run_dir: Path, stop_after_epoch: int | None = None) -> dict:
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(40, 1, 16, 16), dtype=np.uint8)
    encoder = ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), image_size=16, drop_path=0.1)
    model = MAE(encoder, MAEConfig(32, 1, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = Batches(images, None, 16, Normalisation(), (ViewConfig(),), shuffle=True, drop_last=True)
    schedule = Schedule(epochs=4, steps_per_epoch=len(batches), lr=1e-3, warmup_epochs=1)

    def on_epoch_end(epoch):
        if stop_after_epoch is not None and epoch == stop_after_epoch:
            raise Interrupted
        return {}

    fit(model, optimizer, lambda e: batches.epoch(5, e), schedule, Context(0, 1, torch.device("cpu")), run_dir, 5,
        {"test": 1}, checkpoint_every=1, checkpoint_seconds=0, on_epoch_end=on_epoch_end)
    return model.state_dict()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", stop_after_epoch=2)  # dies after epoch 1's checkpoint, during epoch 2's end
    resumed = run(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


def test_checkpoint_every_zero_saves_only_the_last_epoch(tmp_path):
    """The configs accept checkpoint_every=0: it means "only the last epoch" (it divided by zero)."""
    from chestssl.train.checkpoint import read
    from chestssl.train.loop import CHECKPOINT_NAME

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(16, 1, 16, 16), dtype=np.uint8)
    model = MAE(ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), image_size=16), MAEConfig(32, 1, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = Batches(images, None, 16, Normalisation(), (), shuffle=False)
    saved = []
    fit(model, optimizer, lambda e: batches.epoch(0, e), Schedule(epochs=3, steps_per_epoch=1, lr=1e-3),
        Context(0, 1, torch.device("cpu")), tmp_path, 0, {"test": 1}, checkpoint_every=0, checkpoint_seconds=0,
        on_epoch_end=lambda epoch: saved.append((tmp_path / CHECKPOINT_NAME).exists()) or {})
    assert saved == [False, False, False]  # nothing before the end...
    assert read(tmp_path / CHECKPOINT_NAME)[1]["progress"]["epoch"] == 3  # ...and the last epoch's state at the end
