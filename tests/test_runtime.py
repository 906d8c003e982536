"""Runtime choices every entry point makes: torch's thread count and glibc keeping freed memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from ingest.runtime import configure_threads

RSS_AFTER_FREE = """
import ctypes, os, sys
from ingest.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is (os.environ.get("CIRCUIT_CATALOG_KEEP_FREED_MEMORY") != "0")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = ctypes.create_string_buffer(512 << 20)  # one malloc, touched through
before = rss()
del block
print((before - rss()) >> 20)
"""


def test_configure_threads_sets_torch_s_count():
    saved = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process_for_reuse():
    """A freed 512 MB block goes back to the kernel by default (glibc mmaps it) and stays in the
    process once keep_freed_memory ran (every entry point that runs torch does), so the next batch's
    tensors reuse touched pages; $CIRCUIT_CATALOG_KEEP_FREED_MEMORY=0 turns it off."""

    def released(mode: str, **env: str) -> int:
        out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return int(out.stdout)

    assert released("default") >= 500
    assert released("keep") < 16
    assert released("keep", CIRCUIT_CATALOG_KEEP_FREED_MEMORY="0") >= 500  # the way to turn it off
