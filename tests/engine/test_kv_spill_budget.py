"""`--kv-spill-gb auto`: a bounded share of the free disk, nothing on RAM filesystems."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from agentcpu.commands.engine_args import add_engine_arguments, engine_options
from agentcpu.kvcache import spill


def test_auto_budget_is_a_bounded_share_of_the_free_space(tmp_path):
    gb = spill.default_spill_gb(str(tmp_path))
    free_gb = shutil.disk_usage(tmp_path).free / 2**30
    if spill._filesystem_type(tmp_path) in spill.RAM_FILESYSTEMS:
        assert gb == 0
    else:
        assert 0 < gb <= spill.DEFAULT_MAX_GB
        assert gb <= spill.DEFAULT_SHARE_OF_FREE * free_gb + 1e-3


def test_auto_budget_is_zero_on_a_ram_filesystem(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "_filesystem_type", lambda path: "tmpfs")
    assert spill.default_spill_gb(str(tmp_path)) == 0


def test_a_directory_still_to_be_made_is_sized_by_its_nearest_parent(tmp_path):
    assert spill.default_spill_gb(str(tmp_path / "a" / "b")) == spill.default_spill_gb(
        str(tmp_path)
    )


@pytest.mark.skipif(not Path("/proc/mounts").exists(), reason="needs Linux /proc/mounts")
def test_filesystem_type_reads_the_deepest_mount():
    assert spill._filesystem_type(Path("/proc/self")) == "proc"


def _options(*argv):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_options(parser.parse_args(["--model", "m", *argv]))


def test_cli_spill_options(tmp_path):
    assert _options("--kv-spill-gb", "0")["spill_gb"] == 0
    opts = _options("--kv-spill-gb", "1.5", "--kv-spill-dir", str(tmp_path))
    assert opts["spill_gb"] == 1.5 and opts["spill_dir"] == str(tmp_path)
    assert _options("--kv-spill-dir", str(tmp_path))["spill_gb"] == spill.default_spill_gb(
        str(tmp_path)
    )
    for bad in ("-1", "lots"):
        with pytest.raises(SystemExit):
            _options("--kv-spill-gb", bad)


def test_store_removes_its_files_and_own_directory_when_it_goes(tmp_path):
    import gc

    import torch

    pool = torch.zeros(2, 2, 32, 1, 4)  # layers, k/v, slots, kv heads, head dim
    made = spill.DiskKVStore(pool, block_size=16, directory=None, max_bytes=1 << 20)
    given = spill.DiskKVStore(pool, block_size=16, directory=str(tmp_path), max_bytes=1 << 20)
    made.spill(0, 123)
    given.spill(1, 456)
    own_dir, files = made.directory, list(tmp_path.iterdir())
    assert own_dir.exists() and len(files) == 1
    del made, given
    gc.collect()
    assert not own_dir.exists()
    assert tmp_path.exists() and not list(tmp_path.iterdir())  # a given directory stays
