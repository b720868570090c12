"""Tests that need the real data fail under CI=true when it is missing, instead of skipping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_missing_data_fails_under_ci_and_skips_elsewhere(ci, outcome, tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_needs_data(shared_data):\n    pass\n")
    env = {**os.environ, "CI": ci, "CHESTSSL_DATA": str(tmp_path / "absent"), "PYTHONPATH": str(REPO / "tests")}
    completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                                str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in completed.stdout, completed.stdout[-2000:]
