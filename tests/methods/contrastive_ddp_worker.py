"""Run by tests/methods/test_contrastive.py under ``torchrun --nproc_per_node=2``: SimCLR's gathered negatives
and gradient on fixed embeddings, then a tiny MoCo v2 through the shared loop; each rank saves what it saw."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.methods.contrastive_losses import nt_xent
from chestssl.methods.moco import MoCoV2, MoCoV2Config
from chestssl.methods.simclr import gather_with_gradient
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train import distributed
from chestssl.train.loop import Schedule, fit
from chestssl.train.pretrain import method_views


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    assert context.world_size == 2 and dist.get_backend() == "gloo"
    rank = context.rank

    full = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(0))  # the same global batch on both ranks
    local1 = full[0, 4 * rank : 4 * rank + 4].clone().requires_grad_(True)
    local2 = full[1, 4 * rank : 4 * rank + 4].clone().requires_grad_(True)
    everyone1, mine = gather_with_gradient(local1)
    everyone2, _ = gather_with_gradient(local2)
    loss = nt_xent(everyone1, everyone2, 0.5, anchors=mine)
    loss.backward()

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(32, 1, 16, 16), dtype=np.uint8)
    config = MoCoV2Config(projection_hidden_size=32, projection_size=16, queue_size=32)
    model = MoCoV2(ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), image_size=16), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = Batches(images, None, 8, Normalisation(), method_views(MoCoV2, config, ViewConfig(), 16), rank=rank,
                      world_size=context.world_size)
    seen = []

    def epoch_batches(epoch):
        for batch in batches.epoch(0, epoch):
            seen.append(batch.index.tolist())
            yield batch

    fit(model, optimizer, epoch_batches, Schedule(epochs=1, steps_per_epoch=len(batches), lr=1e-3), context,
        out_dir / "run", 0, {"contrastive ddp": True})
    torch.save({"loss": loss.item(), "grad1": local1.grad, "grad2": local2.grad, "full": full,
                "queue": model.queue, "queue_samples": model.queue_samples, "queue_pointer": model.queue_pointer,
                "seen": seen, "meta": json.dumps({"world_size": context.world_size})}, out_dir / f"rank{rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
