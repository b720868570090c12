"""Two CPU processes on gloo train the same model through the shared loop and stay identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp_replicas_stay_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert (rank0[name] == rank1[name]).all(), name
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["changed"] == "True"  # the weights moved: the replicas agree because they were synchronised
    assert metadata["per_rank_batch"] == "[8]"  # each process took half of the global batch of 16
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """Rank 1 alone sees a NaN loss; both ranks must stop with the message instead of rank 0 waiting forever."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path), "nan"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode != 0
    stopped = {rank: (tmp_path / f"rank{rank}.stopped").read_text() for rank in (0, 1)}
    assert "not finite here" in stopped[1] and "not finite on another process" in stopped[0]
    assert all("epoch 0 step 2" in message for message in stopped.values())


def test_3d_lung_weighted_pretraining_under_torchrun(tmp_path):
    """The real command on a CT volume cache, two processes: each reads its half of every batch from disk."""
    from chestssl.data.ct.cache import save_volume, write_manifest

    cache, rng = tmp_path / "cache", np.random.default_rng(0)
    rows = []
    for index in range(24):
        lung = np.zeros((16, 16, 16), bool)
        lung[2:14, 2:8] = True
        save_volume(cache / f"v{index}.npz", rng.random((16, 16, 16), dtype=np.float32), lung)
        rows.append({"id": f"v{index}", "status": "ok", "file": f"v{index}.npz", "split": "train"})
    write_manifest(cache, rows)
    (cache / "preprocessing.json").write_text(json.dumps({"modality": "ct", "spatial_dims": 3, "size": 16}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chestssl.cli",
               "pretrain", "--run-dir", str(tmp_path / "run"), "device=cpu", "spatial_dims=3",
               f"cache_dirs=[{cache}]", "vit.patch_size=8", "vit.hidden_size=32", "vit.depth=1", "vit.num_heads=2",
               "mae.decoder_hidden_size=32", "mae.decoder_depth=1", "mae.decoder_num_heads=2", "mae.loss=l1",
               "mae.lung_weight=0.01", "mae.norm_pix_loss=false", "epochs=2", "batch_size=8", "warmup_epochs=0", "grid_every=0"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("pretraining mae on 24 unlabelled volumes (excluding splits ('test',)) in 2 process") == 1
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 3), (1, 6)]  # 24 volumes / global batch 8
    meta = json.loads((tmp_path / "run" / "encoder.json").read_text())
    assert meta["method"] == "mae" and meta["method_config"]["lung_weight"] == 0.01
    assert meta["architecture"]["spatial_dims"] == 3 and meta["architecture"]["kind"] == "vit"
