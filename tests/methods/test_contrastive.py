"""SimCLR and MoCo v2: their losses against loops written from the papers, known values, the momentum update,
the queue (its bookkeeping, its checkpoint and resume, its keys from every process) and the batch-norm groups."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import ContrastiveLoss

from chestssl.data.batch import Batch, Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.errors import ConfigError
from chestssl.methods.contrastive_losses import info_nce, nt_xent
from chestssl.methods.moco import MoCoV2, MoCoV2Config
from chestssl.methods.simclr import SimCLR, SimCLRConfig
from chestssl.models.resnet import ResNet, ResNetConfig
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train.distributed import Context
from chestssl.train.loop import Progress, Schedule, fit
from chestssl.train.pretrain import method_views

WORKER = Path(__file__).with_name("contrastive_ddp_worker.py")


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def naive_nt_xent(view1, view2, temperature, anchor_samples=None):
    """Chen et al. 2020, Algorithm 1: l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)), averaged over
    every anchor (both views of each anchor sample)."""
    embeddings = list(view1) + list(view2)
    count = len(view1)
    samples = range(count) if anchor_samples is None else anchor_samples
    terms = []
    for sample in samples:
        for i, j in ((sample, sample + count), (sample + count, sample)):
            denominator = sum(math.exp(cosine(embeddings[i], embeddings[k]) / temperature)
                              for k in range(2 * count) if k != i)
            terms.append(-math.log(math.exp(cosine(embeddings[i], embeddings[j]) / temperature) / denominator))
    return sum(terms) / len(terms)


def naive_info_nce(query, key, queue, temperature, excluded=None):
    """He et al. 2020, eq. 1: -log(exp(q.k+ / t) / (exp(q.k+ / t) + sum_j exp(q.k_j / t))), mean over queries."""
    terms = []
    for i, (q, k) in enumerate(zip(query, key)):
        positive = math.exp(cosine(q, k) / temperature)
        negatives = sum(math.exp(cosine(q, n) / temperature) for j, n in enumerate(queue)
                        if excluded is None or not excluded[i, j])
        terms.append(-math.log(positive / (positive + negatives)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_the_paper_loop_and_monai(temperature):
    generator = torch.Generator().manual_seed(0)
    view1, view2 = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64)
    loss = nt_xent(view1, view2, temperature)
    assert math.isclose(loss.item(), naive_nt_xent(view1, view2, temperature), rel_tol=1e-5)
    assert math.isclose(loss.item(), ContrastiveLoss(temperature)(view1, view2).item(), rel_tol=1e-5)


def test_nt_xent_of_identical_embeddings_is_log_2n_minus_1():
    for count in (1, 4, 16):
        same = torch.ones(count, 8)
        assert math.isclose(nt_xent(same, same, 0.2).item(), math.log(2 * count - 1), abs_tol=1e-5)


def test_nt_xent_of_a_share_of_the_anchors_is_their_mean():
    generator = torch.Generator().manual_seed(1)
    view1, view2 = torch.randn(2, 8, 5, generator=generator)
    share = nt_xent(view1, view2, 0.3, anchors=slice(4, 8))
    assert math.isclose(share.item(), naive_nt_xent(view1, view2, 0.3, range(4, 8)), rel_tol=1e-5)
    halves = (nt_xent(view1, view2, 0.3, anchors=slice(0, 4)) + share) / 2
    assert torch.isclose(halves, nt_xent(view1, view2, 0.3))


def test_info_nce_matches_the_paper_loop():
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    queue = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    assert math.isclose(info_nce(query, key, queue, 0.2).item(), naive_info_nce(query, key, queue, 0.2), rel_tol=1e-5)
    excluded = torch.rand(5, 7, generator=generator) < 0.3
    assert math.isclose(info_nce(query, key, queue, 0.2, excluded).item(),
                        naive_info_nce(query, key, queue, 0.2, excluded), rel_tol=1e-5)
    assert not math.isclose(info_nce(query, key, queue, 0.2, excluded).item(), info_nce(query, key, queue, 0.2).item())


def tiny_resnet(spatial_dims=2, side=16):
    return ResNet(ResNetConfig(widths=(8, 8, 16, 16)), spatial_dims=spatial_dims, image_size=side)


def tiny_vit(spatial_dims=2, side=16):
    config = ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2)
    return ViT(config, spatial_dims=spatial_dims, image_size=side)


SMALL_MOCO = dict(projection_hidden_size=32, projection_size=16, queue_size=24)


def two_view_batch(count=8, side=16, seed=0, spatial_dims=2):
    generator = torch.Generator().manual_seed(seed)
    views = tuple(torch.randn(count, 1, *([side] * spatial_dims), generator=generator) for _ in range(2))
    return Batch(images=views[0], views=views, index=torch.arange(count))


def test_the_momentum_update_changes_only_the_key_networks():
    torch.manual_seed(0)
    moco = MoCoV2(tiny_resnet(), MoCoV2Config(**SMALL_MOCO, momentum=0.9))
    assert moco.encoder is not moco.key_encoder
    optimizer = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    moco(two_view_batch()).backward()
    assert all(p.grad is None for p in [*moco.key_encoder.parameters(), *moco.key_projection.parameters()])
    optimizer.step()
    query = {name: p.clone() for name, p in [*moco.encoder.named_parameters(), *moco.projection.named_parameters()]}
    key_before = [p.clone() for p in [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]]
    moco.after_step(Progress(0, 10, 0))
    for name, p in [*moco.encoder.named_parameters(), *moco.projection.named_parameters()]:
        assert torch.equal(p, query[name]), name  # the query networks are only the optimiser's
    online = [*moco.encoder.parameters(), *moco.projection.parameters()]
    key_after = [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(key_after, key_before))
    for after, before, q in zip(key_after, key_before, online):
        assert torch.allclose(after, 0.9 * before + 0.1 * q, atol=1e-6)


def test_the_queue_takes_the_newest_keys_and_wraps_around():
    torch.manual_seed(0)
    moco = MoCoV2(tiny_vit(), MoCoV2Config(**{**SMALL_MOCO, "queue_size": 5}))
    keys = torch.nn.functional.normalize(torch.randn(7, 16), dim=1)
    moco.enqueue(keys[:3], torch.tensor([10, 11, 12]))
    moco.enqueue(keys[3:], torch.tensor([13, 14, 15, 16]))
    assert moco.queue_pointer.item() == 2
    assert moco.queue_samples.tolist() == [15, 16, 12, 13, 14]
    assert torch.equal(moco.queue, keys[[5, 6, 2, 3, 4]])
    assert {"queue", "queue_samples", "queue_pointer"} <= set(moco.state_dict())  # in every checkpoint


def test_a_sample_is_not_its_own_negative():
    torch.manual_seed(0)
    moco = MoCoV2(tiny_vit(), MoCoV2Config(**{**SMALL_MOCO, "queue_size": 4})).eval()  # eval: a batch of one
    batch = two_view_batch(count=1)
    moco.enqueue(moco.forward_key(batch.views[1]).repeat(4, 1), torch.zeros(4, dtype=torch.long))
    assert moco(batch).item() == 0.0  # every queued key is sample 0's own: no negative left
    other = MoCoV2(tiny_vit(), MoCoV2Config(**{**SMALL_MOCO, "queue_size": 4}, exclude_own_keys=False)).eval()
    other.load_state_dict(moco.state_dict())
    assert other(batch).item() > 1.0  # log(5) when they count


def test_bn_splits_keep_a_query_out_of_the_other_groups_statistics():
    torch.manual_seed(0)
    batch = two_view_batch(count=8)
    changed = two_view_batch(count=8)
    changed.views[0][7] += 3.0  # a sample of the second group
    for groups, independent in ((1, False), (2, True)):
        moco = MoCoV2(tiny_resnet(), MoCoV2Config(**SMALL_MOCO, bn_splits=groups))
        same = torch.allclose(moco.forward_query(batch.views[0])[0], moco.forward_query(changed.views[0])[0])
        assert same is independent
    keys = MoCoV2(tiny_resnet(), MoCoV2Config(**SMALL_MOCO, bn_splits=2)).forward_key(batch.views[1])
    assert keys.shape == (8, 16) and torch.allclose(keys.norm(dim=1), torch.ones(8))
    with pytest.raises(ValueError, match="bn_splits 3"):
        MoCoV2(tiny_resnet(), MoCoV2Config(**SMALL_MOCO, bn_splits=3)).forward_query(batch.views[0])


def test_a_queue_larger_than_the_data_is_refused():
    moco = MoCoV2(tiny_vit(), MoCoV2Config(**{**SMALL_MOCO, "queue_size": 100}))
    moco.check_dataset(120, 16)
    with pytest.raises(ConfigError, match="mocov2.queue_size 100 is more than the 84 keys"):
        moco.check_dataset(100, 16)


def test_the_two_views_are_the_medical_preset_or_the_base():
    base = ViewConfig(rotate_degrees=3)
    for cls, config in ((SimCLR, SimCLRConfig()), (MoCoV2, MoCoV2Config())):
        first, second = method_views(cls, config, base, 16)
        assert first == second and first.grayscale and first.rotate_degrees == 3
        assert method_views(cls, type(config)(view_preset="base"), base, 16) == (base, base)
    with pytest.raises(ValueError, match="view_preset"):
        SimCLRConfig(view_preset="strong")


@pytest.mark.parametrize("encoder", [tiny_resnet, tiny_vit])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_simclr_and_moco_take_both_encoders_in_2d_and_3d(encoder, spatial_dims):
    torch.manual_seed(0)
    batch = two_view_batch(count=4, spatial_dims=spatial_dims)
    for method in (SimCLR(encoder(spatial_dims), SimCLRConfig(32, 16)),
                   MoCoV2(encoder(spatial_dims), MoCoV2Config(**SMALL_MOCO))):
        loss = method(batch)
        loss.backward()
        assert torch.isfinite(loss) and method.encoder.kind == encoder(spatial_dims).kind


class Interrupted(Exception):
    pass


def run_moco(run_dir, stop_after_epoch=None):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(40, 1, 16, 16), dtype=np.uint8)
    config = MoCoV2Config(**{**SMALL_MOCO, "queue_size": 28}, bn_splits=2)
    model = MoCoV2(tiny_resnet(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = Batches(images, None, 8, Normalisation(), method_views(MoCoV2, config, ViewConfig(), 16), shuffle=True)
    schedule = Schedule(epochs=3, steps_per_epoch=len(batches), lr=1e-3, warmup_epochs=1)

    def on_epoch_end(epoch):
        if stop_after_epoch is not None and epoch == stop_after_epoch:
            raise Interrupted
        return {}

    fit(model, optimizer, lambda e: batches.epoch(5, e), schedule, Context(0, 1, torch.device("cpu")), run_dir, 5,
        {"test": 1}, checkpoint_every=1, checkpoint_seconds=0, on_epoch_end=on_epoch_end)
    return model.state_dict()


def test_the_moco_queue_survives_a_resume(tmp_path):
    straight = run_moco(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run_moco(tmp_path / "resumed", stop_after_epoch=1)  # dies after epoch 0's checkpoint
    resumed = run_moco(tmp_path / "resumed")
    assert (straight["queue_samples"] >= 0).all() and straight["queue_pointer"].item() == 15 * 8 % 28
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_the_queue_gets_the_keys_of_every_process_and_simclr_the_global_gradient(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # MoCo: one queue on both processes, holding the keys of both, in rank order step by step
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert torch.equal(ranks[0]["queue_samples"], ranks[1]["queue_samples"])
    expected = [i for step in zip(ranks[0]["seen"], ranks[1]["seen"]) for shard in step for i in shard]
    assert ranks[0]["queue_samples"].tolist() == expected and sorted(expected) == list(range(32))
    assert ranks[0]["queue_pointer"].item() == 0
    # SimCLR: the mean of the two processes' losses is NT-Xent over the global batch, and so is the gradient
    full1, full2 = (part.clone().requires_grad_(True) for part in ranks[0]["full"])
    loss = nt_xent(full1, full2, 0.5)
    loss.backward()
    assert math.isclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.item(), rel_tol=1e-5)
    for rank in (0, 1):
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.allclose(ranks[rank]["grad1"] / 2, full1.grad[rows], atol=1e-6)
        assert torch.allclose(ranks[rank]["grad2"] / 2, full2.grad[rows], atol=1e-6)
    assert json.loads(ranks[0]["meta"])["world_size"] == 2
