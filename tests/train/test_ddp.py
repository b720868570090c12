"""Two CPU processes on gloo train the same model through the shared loop and stay identical."""

import os
import subprocess
import sys
from pathlib import Path

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
