"""Run by tests/train/test_ddp.py under ``torchrun --nproc_per_node=2``: a tiny MAE through the shared loop.

With a second argument ``nan``, rank 1's loss becomes NaN at its third step: both processes must stop.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from chestssl.data.batch import Batches, Normalisation
from chestssl.data.views import ViewConfig
from chestssl.methods.mae import MAE, MAEConfig
from chestssl.models.vit import ViT, ViTConfig
from chestssl.train import distributed
from chestssl.train.loop import NonFiniteLossError, Schedule, fit



def main(out_dir: Path, poison: bool = False) -> None:
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    assert context.world_size == 2 and dist.get_backend() == "gloo"
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    images = np.random.default_rng(0).integers(0, 255, size=(64, 1, 16, 16), dtype=np.uint8)
    model = MAE(ViT(ViTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2), image_size=16), MAEConfig(32, 1, 2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = Batches(images, None, 16, Normalisation(), (ViewConfig(),), rank=context.rank, world_size=context.world_size)
    seen = []
    schedule = Schedule(epochs=2, steps_per_epoch=len(batches), lr=1e-3)

    def epoch_batches(epoch):
        for batch in batches.epoch(0, epoch):
            seen.append(len(batch))
            if poison and context.rank == 1 and len(seen) == 3:
                batch.images = torch.full_like(batch.images, float("nan"))
            yield batch

    try:
        fit(model, optimizer, epoch_batches, schedule, context, out_dir / "run", 0, {"ddp": True})
    except NonFiniteLossError as error:
        (out_dir / f"rank{context.rank}.stopped").write_text(str(error))
        sys.exit(3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    changed = any(not torch.equal(initial[k], state[k]) for k in state)
    save_file(state, str(out_dir / f"rank{context.rank}.safetensors"),
              metadata={"changed": str(changed), "per_rank_batch": str(sorted(set(seen)))})
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), poison=sys.argv[2:] == ["nan"])
