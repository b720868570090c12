"""One writer per cache: a second prepare-ct (or LIDC build, CT patches) is refused clearly, and no row is lost."""

import subprocess
import sys
import threading
from pathlib import Path

import phantoms
import pytest

from chestssl.data.ct.cache import CacheBusyError, cache_lock, read_manifest, write_manifest
from chestssl.data.ct.lidc import build_lidc_nodules
from chestssl.data.ct.patches import ct_patches
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.ct.prepare import prepare_ct

RUN = """
import sys
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.ct.prepare import prepare_ct
from chestssl.errors import ChestSSLError
try:
    prepare_ct(PrepareCTConfig(inputs=tuple(sys.argv[2:]), cache_dir=sys.argv[1], size=16, spacing_mm=3.0, workers=1))
except ChestSSLError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
"""


def chests(folder: Path, count: int, first_seed: int) -> list[str]:
    folder.mkdir()
    return [str(phantoms.write_image(folder / f"chest{seed}.mha", phantoms.chest(seed)))
            for seed in range(first_seed, first_seed + count)]


def test_two_concurrent_prepare_ct_runs_lose_no_row(tmp_path):
    cache = tmp_path / "cache"
    mine, theirs = chests(tmp_path / "a", 4, 0), chests(tmp_path / "b", 4, 10)
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(cache), *inputs], stderr=subprocess.PIPE, text=True)
            for inputs in (mine, theirs)]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    rows = {row["source"]: row for row in read_manifest(cache)}
    for (code, stderr), inputs in zip(outcomes, (mine, theirs)):
        if code == 0:
            assert all(rows[source]["status"] == "ok" for source in inputs), rows
        else:  # refused before it wrote anything
            assert code == 2 and f"{cache}: another process is writing to this cache" in stderr, stderr
            assert not set(inputs) & set(rows)
    assert 0 in [code for code, _ in outcomes]
    on_disk = sorted(path.name for path in cache.glob("*.npz"))
    assert on_disk == sorted(row["file"] for row in rows.values())  # every volume has its row, and only one
    assert not [path for path in cache.iterdir() if path.name.endswith(".tmp")]
    for code, inputs in zip([code for code, _ in outcomes], (mine, theirs)):  # the refused one, again: both kept
        if code != 0:
            prepare_ct(PrepareCTConfig(inputs=tuple(inputs), cache_dir=str(cache), size=16, spacing_mm=3.0, workers=1))
    assert len(read_manifest(cache)) == 8 and len(list(cache.glob("*.npz"))) == 8


def test_every_writer_is_refused_while_the_lock_is_held(tmp_path, shared_data):
    cache = tmp_path / "cache"
    (source,) = chests(tmp_path / "in", 1, 0)
    with cache_lock(cache):
        with pytest.raises(CacheBusyError, match=rf"{cache}: another process is writing to this cache \(pid \d+"):
            prepare_ct(PrepareCTConfig(inputs=(source,), cache_dir=str(cache), size=16, spacing_mm=3.0))
        with pytest.raises(CacheBusyError, match=str(cache)):
            build_lidc_nodules(shared_data / "lidc-nodules", cache, limit=1)
        (cache / "preprocessing.json").write_text('{"spatial_dims": 3, "size": 16, "spacing_mm": 3.0, '
                                                  '"hu_window": [-1000, 200]}')
        with pytest.raises(CacheBusyError, match=str(cache)):
            ct_patches([source], cache, per_volume=1)
    assert read_manifest(cache) == []  # nothing was written by the refused runs
    prepare_ct(PrepareCTConfig(inputs=(source,), cache_dir=str(tmp_path / "other"), size=16, spacing_mm=3.0))
    with cache_lock(cache):  # released: it can be taken again
        pass


def test_manifest_writes_use_their_own_temporary_files(tmp_path):
    rows = [{"id": f"v{i}", "source": f"v{i}.nii", "status": "failed", "reason": "x"} for i in range(50)]
    errors = []

    def write_many():
        try:
            for _ in range(20):
                write_manifest(tmp_path, rows)
        except Exception as error:  # a shared temporary name: FileNotFoundError on the rename
            errors.append(error)

    threads = [threading.Thread(target=write_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(read_manifest(tmp_path)) == 50
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.csv"]
