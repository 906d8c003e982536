"""Device and thread choices, made deliberately in one place.

On small machines torch's default intra-op thread pool thrashes as soon as another process (the
Neo4j JVM, the writer thread, a second test) wants a core, so every entry point sets the count, and
with it keeps freed memory in the process (keep_freed_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

DEFAULT_THREADS_ENV = "CIRCUIT_CATALOG_TORCH_THREADS"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: explicit value, else $CIRCUIT_CATALOG_TORCH_THREADS, else 1."""
    n = threads or int(os.environ.get(DEFAULT_THREADS_ENV, "1"))
    torch.set_num_threads(max(1, n))
    keep_freed_memory()
    return torch.get_num_threads()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_MEMORY_ENV = "CIRCUIT_CATALOG_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel: no mmap for
    large blocks, no trimming of the heap. A CPU batch allocates gigabytes of short-lived tensors, each
    above glibc's mmap threshold, so every one was fresh pages; first touches cost ~2.5 ms a MB on the
    VMs measured, and keeping the memory made a GPT-2 batch's attribution 23% faster and its forward
    pass with encodes 25% (bench/rdfa.py), for the same peak RSS. (Compaction and merge gained nothing:
    numpy asks for huge pages.) False where the C library is not glibc, or where
    $CIRCUIT_CATALOG_KEEP_FREED_MEMORY is 0."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), CPU otherwise; a CUDA request without CUDA is an error."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ingest.errors import UserFacingError

    try:
        device = torch.device(requested)
    except RuntimeError:  # torch's message lists every backend it was built with
        raise UserFacingError(f"--device {requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(f"--device {requested} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserFacingError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserFacingError(f"--device {requested!r}: the catalog runs on cpu or cuda (or mps)")
    return device
