"""BYOL and SwAV: losses against loops written from the papers, the EMA target and its schedule, Sinkhorn codes,
prototype normalisation and freezing, multi-crop views, and an exact resume."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chestssl.data.batch import Batch, Batches, Normalisation
from chestssl.data.views import ViewConfig, contrastive_view
from chestssl.methods.byol import BYOL, BYOLConfig, byol_loss, target_momentum
from chestssl.methods.swav import SwAV, SwAVConfig, sinkhorn, swapped_prediction_loss
from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train.distributed import Context
from chestssl.train.loop import Progress, Schedule, fit
from chestssl.train.optim import param_groups
from chestssl.train.pretrain import method_views

REPO = Path(__file__).resolve().parents[2]


def tiny_encoder(kind: str, spatial_dims: int):
    if kind == "vit":
        return ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), spatial_dims=spatial_dims, image_size=16)
    return ResNet(ResNetConfig(widths=(8, 8, 16, 16)), spatial_dims=spatial_dims, image_size=16)


def tiny_byol(spatial_dims: int = 2, kind: str = "resnet") -> BYOL:
    return BYOL(tiny_encoder(kind, spatial_dims), BYOLConfig(projection_hidden_size=32, projection_size=16))


def tiny_swav(spatial_dims: int = 2, kind: str = "resnet", **settings) -> SwAV:
    config = SwAVConfig(projection_hidden_size=32, projection_size=16, num_prototypes=8, local_crops=2,
                        local_crop_size=8, **settings)
    return SwAV(tiny_encoder(kind, spatial_dims), config)


def multi_crop_batch(spatial_dims: int = 2, batch: int = 6, local_crops: int = 2, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 1, *([16] * spatial_dims), generator=generator) for _ in range(2)]
    views += [torch.randn(batch, 1, *([8] * spatial_dims), generator=generator) for _ in range(local_crops)]
    return Batch(images=views[0], views=tuple(views))


# ---------------------------------------------------------------- BYOL


def naive_normalised_mse(predictions, targets):
    """The paper's ``|| p / ||p|| - z' / ||z'|| ||^2``, one sample at a time, averaged."""
    total = 0.0
    for p, z in zip(predictions.tolist(), targets.tolist()):
        p_norm, z_norm = math.sqrt(sum(v * v for v in p)), math.sqrt(sum(v * v for v in z))
        total += sum((a / p_norm - b / z_norm) ** 2 for a, b in zip(p, z))
    return total / len(predictions)


def test_byol_loss_matches_a_per_sample_loop_from_the_paper():
    generator = torch.Generator().manual_seed(0)
    predictions, targets = torch.randn(5, 7, generator=generator), 3 * torch.randn(5, 7, generator=generator)
    assert abs(float(byol_loss(predictions, targets)) - naive_normalised_mse(predictions, targets)) < 1e-5
    assert float(byol_loss(targets, 2 * targets)) < 1e-6  # same direction: no loss whatever the scale
    assert abs(float(byol_loss(targets, -targets)) - 4.0) < 1e-5  # opposite directions: the maximum, 4


def test_byol_forward_is_the_symmetrised_loss_of_the_two_views():
    torch.manual_seed(0)
    method = tiny_byol()
    batch = multi_crop_batch(local_crops=0)
    loss = method(batch).item()
    first, second = batch.views
    expected = (naive_normalised_mse(method.forward_online(first), method.forward_target(second))
                + naive_normalised_mse(method.forward_online(second), method.forward_target(first)))
    assert abs(loss - expected) < 1e-5


def test_target_momentum_follows_the_cosine_schedule():
    assert target_momentum(0, 100, 0.99) == pytest.approx(0.99, abs=1e-12)
    assert target_momentum(50, 100, 0.99) == pytest.approx(0.995, abs=1e-12)  # cos(pi / 2) = 0: half way to 1
    assert target_momentum(100, 100, 0.99) == pytest.approx(1.0, abs=1e-12)
    assert target_momentum(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    values = [target_momentum(step, 100, 0.99) for step in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_after_step_moves_only_the_target_toward_the_online_network():
    torch.manual_seed(0)
    method = tiny_byol()
    with torch.no_grad():  # make the online network differ from its copy
        for parameter in list(method.encoder.parameters()) + list(method.projector.parameters()):
            parameter.add_(torch.randn_like(parameter))
    online_before = {name: value.clone() for name, value in method.state_dict().items() if not name.startswith("target.")}
    target_before = [p.detach().clone() for p in method.target.parameters()]
    target_buffers = [b.clone() for b in method.target.buffers()]
    online = list(method.encoder.parameters()) + list(method.projector.parameters())
    method.after_step(Progress(step=3, total_steps=10, epoch=0))
    tau = 1 - (1 - 0.99) * (math.cos(math.pi * 3 / 10) + 1) / 2
    for name, value in method.state_dict().items():
        if not name.startswith("target."):
            assert torch.equal(value, online_before[name]), name  # online weights untouched
    for before, after, source in zip(target_before, method.target.parameters(), online, strict=True):
        expected = tau * before.double() + (1 - tau) * source.detach().double()
        assert torch.allclose(after.double(), expected, rtol=0, atol=1e-6)
        assert not torch.equal(after, before)
    assert all(torch.equal(a, b) for a, b in zip(target_buffers, method.target.buffers()))


def test_target_gets_no_gradient_is_saved_and_is_not_exported():
    torch.manual_seed(0)
    method = tiny_byol()
    method(multi_crop_batch(local_crops=0)).backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    trained = {id(p) for group in param_groups(method, 0.05) for p in group["params"]}
    assert not trained & {id(p) for p in method.target.parameters()}
    assert any(name.startswith("target.encoder.") for name in method.state_dict())
    assert set(method.encoder.state_dict()) == set(method.target["encoder"].state_dict())  # same keys, no target.*


def test_byol_needs_two_views():
    with pytest.raises(ValueError, match="two augmented views"):
        tiny_byol()(Batch(images=torch.randn(4, 1, 16, 16)))


# ---------------------------------------------------------------- SwAV


def naive_sinkhorn(scores, epsilon, iterations):
    """Sinkhorn-Knopp as written in the paper, one row and one column at a time: (B, K) scores -> (B, K) codes."""
    batch, prototypes = len(scores), len(scores[0])
    plan = [[math.exp(scores[b][k] / epsilon) for b in range(batch)] for k in range(prototypes)]  # K x B
    total = sum(sum(row) for row in plan)
    plan = [[value / total for value in row] for row in plan]
    for _ in range(iterations):
        for k in range(prototypes):  # each prototype gets 1/K of the mass
            row_sum = sum(plan[k])
            plan[k] = [value / row_sum / prototypes for value in plan[k]]
        for b in range(batch):  # each sample 1/B
            column_sum = sum(plan[k][b] for k in range(prototypes))
            for k in range(prototypes):
                plan[k][b] = plan[k][b] / column_sum / batch
    return [[plan[k][b] * batch for k in range(prototypes)] for b in range(batch)]


def naive_swapped_loss(scores, epsilon, iterations, temperature):
    """For each global crop's code, the cross-entropy against every other crop's softmax, averaged (paper, eq. 1)."""
    crops, batch = len(scores), len(scores[0])
    loss = 0.0
    for coded in (0, 1):
        codes = naive_sinkhorn(scores[coded], epsilon, iterations)
        subloss = 0.0
        for other in range(crops):
            if other == coded:
                continue
            for b in range(batch):
                logits = [s / temperature for s in scores[other][b]]
                log_normaliser = math.log(sum(math.exp(v) for v in logits))
                subloss -= sum(q * (v - log_normaliser) for q, v in zip(codes[b], logits)) / batch
        loss += subloss / (crops - 1)
    return loss / 2


def unit_scores(batch, prototypes, generator):
    """Cosine scores of random unit embeddings against random unit prototypes, as SwAV computes them."""
    embedding = F.normalize(torch.randn(batch, 16, generator=generator), dim=1)
    return embedding @ F.normalize(torch.randn(prototypes, 16, generator=generator), dim=1).t()


def test_sinkhorn_matches_a_loop_written_from_the_paper():
    scores = unit_scores(10, 6, torch.Generator().manual_seed(0))
    for iterations in (1, 3, 10):
        expected = torch.tensor(naive_sinkhorn(scores.double().tolist(), 0.05, iterations), dtype=torch.float64)
        assert torch.allclose(sinkhorn(scores, 0.05, iterations).double(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_codes_are_a_transport_plan():
    scores = unit_scores(24, 6, torch.Generator().manual_seed(1)).requires_grad_(True)
    codes = sinkhorn(scores, 0.05, 3)
    assert not codes.requires_grad and (codes >= 0).all()
    # after the final rescale each sample's code is a distribution over the prototypes
    assert torch.allclose(codes.sum(dim=1), torch.ones(24), atol=1e-5)
    # the prototype marginals (share of the batch per prototype) converge to uniform, 1/K each
    converged = sinkhorn(scores, 0.05, 300)
    assert torch.allclose(converged.sum(dim=0) / 24, torch.full((6,), 1 / 6), atol=1e-3)
    # three iterations already spread the batch far more evenly than the raw assignment does
    raw_share = F.softmax(scores.detach() / 0.05, dim=1).mean(dim=0)
    three_share = codes.mean(dim=0)
    assert (three_share - 1 / 6).abs().max() < 0.5 * (raw_share - 1 / 6).abs().max()


def test_uniform_predictions_cost_log_k():
    """A known value: prototypes that all score the same (collapse) leave the loss at ln(K)."""
    scores = [torch.zeros(4, 8) for _ in range(4)]
    codes = [sinkhorn(s) for s in scores[:2]]
    assert abs(float(swapped_prediction_loss(scores, codes, 0.1)) - math.log(8)) < 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_swav_loss_matches_a_naive_multi_crop_loop(spatial_dims):
    torch.manual_seed(0)
    method = tiny_swav(spatial_dims)
    batch = multi_crop_batch(spatial_dims)
    loss = method(batch).item()
    scores = [s.detach().double().tolist() for s in method.forward_scores(batch.views)]  # the forward's own scores
    assert len(scores) == 4 and len(scores[0][0]) == 8
    assert abs(loss - naive_swapped_loss(scores, 0.05, 3, 0.1)) < 1e-4


def test_scores_and_loss_stay_float32_under_autocast():
    """The loop runs the forward under bfloat16 autocast on GPU; Sinkhorn's 1/epsilon must not see bf16 scores."""
    torch.manual_seed(0)
    method, batch = tiny_swav(), multi_crop_batch()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = method.forward_scores(batch.views)
        loss = method(batch)
    assert all(s.dtype == torch.float32 for s in scores) and loss.dtype == torch.float32
    assert abs(loss.item() - method(batch).item()) < 0.05  # the encoder ran in bf16, the loss did not


def test_prototypes_are_normalised_before_the_forward():
    torch.manual_seed(0)
    method, batch = tiny_swav(), multi_crop_batch()
    method.normalise_prototypes()
    unit_loss = method(batch).item()
    with torch.no_grad():
        method.prototypes.weight.mul_(torch.linspace(0.2, 5.0, 8).unsqueeze(1))  # rows of different lengths
    assert abs(method(batch).item() - unit_loss) < 1e-5  # the scores saw unit prototypes again
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(8), atol=1e-6)


def test_prototypes_are_frozen_for_the_first_steps_then_learn():
    torch.manual_seed(0)
    method, batch = tiny_swav(freeze_prototypes_steps=3), multi_crop_batch()
    optimizer = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-2)
    method.normalise_prototypes()
    initial = method.prototypes.weight.detach().clone()
    projector_initial = method.projector[0].weight.detach().clone()
    for step in range(5):
        loss = method(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient = method.prototypes.weight.grad
        if step < 3:
            assert gradient is not None and torch.count_nonzero(gradient) == 0, step
        else:
            assert gradient.abs().sum() > 0, step
        optimizer.step()
        method.after_step(Progress(step, 5, 0))
        directions = F.normalize(method.prototypes.weight.detach(), dim=1)
        if step < 3:  # weight decay may shorten the rows, but their directions stay put
            assert torch.allclose(directions, initial, atol=1e-6), step
            assert not torch.allclose(method.projector[0].weight, projector_initial)  # the rest learns meanwhile
    assert not torch.allclose(directions, initial, atol=1e-3)
    assert int(method.steps_done) == 5


def test_more_prototypes_than_the_global_batch_is_warned(caplog):
    method = tiny_swav()  # 8 prototypes
    with caplog.at_level("WARNING", logger="chestssl.methods.swav"):
        method.check_dataset(100, 8)
        assert not caplog.records
        method.check_dataset(100, 4)
    assert "swav.num_prototypes 8 is more than the global batch of 4" in caplog.text


def test_byol_views_are_contrastive_with_the_papers_asymmetric_blur():
    base = ViewConfig(rotate_degrees=5.0)
    first, second = method_views(BYOL, BYOLConfig(), base, 16)
    assert (first.blur_probability, second.blur_probability) == (1.0, 0.1)
    assert first.crop_scale == contrastive_view(base).crop_scale and first.rotate_degrees == 5.0
    assert method_views(BYOL, BYOLConfig(view_preset="base"), base, 16) == (base, base)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multi_crop_views_are_two_global_and_small_local_crops(spatial_dims):
    settings = SwAVConfig(local_crops=3, local_crop_size=8, local_crop_scale=(0.05, 0.2), view_preset="base")
    base = ViewConfig(crop_scale=(0.5, 1.0))
    views = method_views(SwAV, settings, base, 16)
    assert views[:2] == (base, base) and len(views) == 5
    assert all(v.size == 8 and v.crop_scale == (0.05, 0.2) and v.rotate_degrees == base.rotate_degrees for v in views[2:])
    medical = method_views(SwAV, SwAVConfig(), base, 16)
    assert medical[:2] == (contrastive_view(base),) * 2 and medical[2].blur_probability == medical[0].blur_probability
    images = np.random.default_rng(0).integers(0, 255, size=(4, 1) + (16,) * spatial_dims, dtype=np.uint8)
    batch = next(iter(Batches(images, None, 4, Normalisation(), views, shuffle=False).epoch(0, 0)))
    assert [tuple(v.shape[2:]) for v in batch.views] == [(16,) * spatial_dims] * 2 + [(8,) * spatial_dims] * 3


@pytest.mark.parametrize(("image_size", "side"), [(16, 16), (28, 16), (32, 16), (64, 27), (128, 55), (224, 96)])
def test_default_local_crops_follow_the_papers_96_of_224_with_a_16_px_floor(image_size, side):
    views = method_views(SwAV, SwAVConfig(), ViewConfig(), image_size)
    assert [v.size for v in views[2:]] == [side] * 4 and views[0].size is None
    assert SwAVConfig(local_crop_size=48).local_side(image_size) == 48  # a set side is kept at every input size
    with pytest.raises(ValueError, match="local_crop_size must be at least 1 or null"):
        SwAVConfig(local_crop_size=0)


@pytest.mark.parametrize("name", ["byol", "swav"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vit_encoder_trains(name, spatial_dims):
    """Both methods take a ViT too (its forward pools to (B, D)); SwAV resamples the local crops to its grid."""
    torch.manual_seed(0)
    method = tiny_byol(spatial_dims, "vit") if name == "byol" else tiny_swav(spatial_dims, "vit")
    batch = multi_crop_batch(spatial_dims, local_crops=0 if name == "byol" else 2)
    loss = method(batch)
    loss.backward()
    assert torch.isfinite(loss) and method.encoder.patch_embed.weight.grad.abs().sum() > 0
    method.after_step(Progress(0, 10, 0))


SINKHORN_WORKER = """
import sys
import torch
import torch.distributed as dist
from chestssl.methods.swav import sinkhorn

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
scores = torch.load(out + "/scores.pt")
torch.save(sinkhorn(scores.chunk(2)[rank], 0.05, 3), out + f"/codes{rank}.pt")
dist.destroy_process_group()
"""


def test_sinkhorn_across_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    scores = unit_scores(12, 5, torch.Generator().manual_seed(2))
    torch.save(scores, tmp_path / "scores.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", SINKHORN_WORKER, str(rank), str(tmp_path / "store"),
                                 str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in (0, 1)]
    for worker in workers:
        _, errors = worker.communicate(timeout=120)
        assert worker.returncode == 0, errors[-3000:]
    shared = torch.cat([torch.load(tmp_path / f"codes{rank}.pt") for rank in (0, 1)])
    assert torch.allclose(shared, sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def resumable_run(name: str, run_dir: Path, stop_after_epoch: int | None = None) -> dict:
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(40, 1, 16, 16), dtype=np.uint8)
    if name == "byol":
        method = tiny_byol()
    else:  # the first step after the interruption (step 4) is the first unfrozen one: the step count must come back
        method = tiny_swav(freeze_prototypes_steps=4)
    views = method_views(type(method), method.config, ViewConfig(), 16)
    optimizer = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-3)
    batches = Batches(images, None, 16, Normalisation(), views, shuffle=True, drop_last=True)
    schedule = Schedule(epochs=4, steps_per_epoch=len(batches), lr=1e-3, warmup_epochs=1)

    def on_epoch_end(epoch):
        if stop_after_epoch is not None and epoch == stop_after_epoch:
            raise Interrupted
        return {}

    fit(method, optimizer, lambda e: batches.epoch(5, e), schedule, Context(0, 1, torch.device("cpu")), run_dir, 5,
        {"test": name}, checkpoint_every=1, checkpoint_seconds=0, on_epoch_end=on_epoch_end)
    return method.state_dict()


@pytest.mark.parametrize("name", ["byol", "swav"])
def test_resume_is_exact(name, tmp_path):
    straight = resumable_run(name, tmp_path / "straight")
    with pytest.raises(Interrupted):
        resumable_run(name, tmp_path / "resumed", stop_after_epoch=2)  # dies after epoch 1's checkpoint
    resumed = resumable_run(name, tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    if name == "byol":  # the target is part of the state, and it has moved away from the online network
        target = {k[len("target."):]: v for k, v in straight.items() if k.startswith("target.")}
        assert target and not torch.equal(target["encoder.stem.0.weight"], straight["encoder.stem.0.weight"])
    else:
        assert int(straight["steps_done"]) == 8
