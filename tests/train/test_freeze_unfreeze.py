"""Freeze-then-unfreeze (Wolf et al.): the encoder, batch-norm statistics included, is untouched for the first K
epochs while the head learns; then it trains at the lower rate; a resumed run keeps the schedule."""

import numpy as np
import torch

from chestssl.data.batch import Batches, Normalisation
from chestssl.models.encoders import architecture, build_encoder
from chestssl.models.resnet import ResNetConfig
from chestssl.train.distributed import Context
from chestssl.train.finetune import freeze_then_unfreeze
from chestssl.train.loop import Schedule, fit
from chestssl.train.optim import param_groups
from chestssl.train.tasks import Classification


def _setup():
    torch.manual_seed(0)
    encoder = build_encoder(architecture("resnet", ResNetConfig(widths=(4, 4, 8, 8)), 2, 16))
    model = Classification("binary", ("a", "b")).build_model(encoder, encoder.feature_size, encoder.head_norm)
    groups = param_groups(model, 0.05, 0.75, encoder.num_layers,
                          lambda n: encoder.layer_id(n.removeprefix("encoder.")) if n.startswith("encoder.") else encoder.num_layers + 1,
                          lambda n: "encoder" if n.startswith("encoder.") else "head")
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    rng = np.random.default_rng(0)
    batches = Batches(rng.integers(0, 255, (16, 1, 16, 16), dtype=np.uint8), rng.integers(0, 2, 16), 8, Normalisation(), ())
    return model, optimizer, batches


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_encoder_frozen_then_trained_at_the_lower_rate(tmp_path):
    model, optimizer, batches = _setup()
    hook = freeze_then_unfreeze(model, optimizer, 2, 0.1)
    before, head_before = _snapshot(model.encoder), _snapshot(model.head)
    states, rates = [], []

    def on_epoch_end(epoch):
        states.append(_snapshot(model.encoder))
        rates.append({g["part"]: g["lr_scale"] for g in optimizer.param_groups})
        return {}

    fit(model, optimizer, lambda e: batches.epoch(0, e), Schedule(epochs=3, steps_per_epoch=2, lr=1e-2),
        Context(0, 1, torch.device("cpu")), tmp_path, 0, {"t": 1}, on_epoch_end=on_epoch_end, on_epoch_start=hook)
    for epoch in (0, 1):  # every weight and batch-norm statistic exactly as before
        assert all(torch.equal(states[epoch][k], before[k]) for k in before)
        assert rates[epoch]["encoder"] == 0.0
    assert not all(torch.equal(states[2][k], before[k]) for k in before)
    assert not torch.equal(model.head.weight, head_before["weight"])
    assert 0 < rates[2]["encoder"] < 0.1  # 0.1 x its layer-decayed rate


def test_a_resumed_run_keeps_the_schedule(tmp_path):
    class Stop(Exception):
        pass

    def run(stop: bool):
        model, optimizer, batches = _setup()

        def on_epoch_end(epoch):
            if stop and epoch == 1:
                raise Stop
            return {}

        fit(model, optimizer, lambda e: batches.epoch(0, e), Schedule(epochs=4, steps_per_epoch=2, lr=1e-2),
            Context(0, 1, torch.device("cpu")), tmp_path / "a", 0, {"t": 1},
            checkpoint_every=1, checkpoint_seconds=0, on_epoch_end=on_epoch_end,
            on_epoch_start=freeze_then_unfreeze(model, optimizer, 2, 0.1))
        return model.state_dict()

    try:
        run(stop=True)
    except Stop:
        pass
    resumed = run(stop=False)  # same folder "a": resumes after epoch 1 (saved at epoch 0's end)
    model, optimizer, batches = _setup()
    fit(model, optimizer, lambda e: batches.epoch(0, e), Schedule(epochs=4, steps_per_epoch=2, lr=1e-2),
        Context(0, 1, torch.device("cpu")), tmp_path / "c", 0, {"t": 1}, on_epoch_start=freeze_then_unfreeze(model, optimizer, 2, 0.1))
    straight = model.state_dict()
    assert all(torch.allclose(resumed[k].float(), straight[k].float(), atol=1e-6) for k in straight)
