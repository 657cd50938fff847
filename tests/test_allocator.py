"""keep_freed_memory (pipelines/allocator.py): after it, a large block that is freed and
allocated again is served from pages the process already has, not freshly mapped and
zero-filled. Counted in minor page faults, in a fresh interpreter each time so the test
process's own allocator is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from psc.pipelines.allocator import keep_freed_memory

PROBE = """
import resource
import numpy as np
from psc.pipelines.allocator import keep_freed_memory
kept = keep_freed_memory()
def faults_of_one_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(16 * 2**20, dtype=np.uint8) for _ in range(3)]  # 3 x 16 MB, every page touched
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_pass()
print(kept, faults_of_one_pass())
"""


def second_pass_faults(env: dict) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults():
    kept, faults = second_pass_faults({})
    off, faults_off = second_pass_faults({"PSC_KEEP_FREED_MEMORY": "0"})
    assert kept and not off
    assert faults_off > 1000, faults_off  # mapped afresh and faulted in again
    assert faults < 100, faults  # served from the pages of the first pass


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("PSC_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
