"""Process settings for CPU inference: how activation buffers get their memory.

One WinCLIP query allocates and frees buffers of up to ~20 MB per layer (2,900 tokens x 3,584 MLP
features in bfloat16). By default glibc serves blocks that large with fresh ``mmap`` pages and
unmaps them on ``free``, so every layer page-faults its output in again (~16,000-22,000 minor
faults per query measured here), in 4 KiB pages. ``configure_process`` fixes that:

- glibc's mmap and trim thresholds are raised, so freed blocks stay in the heap and the next layer
  reuses them (0 faults per query), at the cost of keeping about one query's working set resident;
- the number of malloc arenas is capped (2, ``WINCLIP_MALLOC_ARENAS``; default in ``winclip.settings``):
  a server hands requests to a pool of threads, each would get an arena of its own, and with raised
  thresholds each arena keeps its own query-sized working set, so resident memory grew with every new
  thread under concurrent load;
- torch's ``THP_MEM_ALLOC_ENABLE=1`` is set (unless already set): tensors of 2 MB and more are 2 MB
  aligned and backed by transparent huge pages, fewer TLB misses in the matmuls. torch reads the
  variable at its first CPU allocation (importing torch allocates none), so this must run before
  any tensor is created.

These are process-wide, so the library never applies them on import or while loading: the entry
points do (``app.py``, ``python -m winclip``, the benchmarks). ``WINCLIP_MALLOC_TUNING=0`` turns them
off. Together they measured ~5-8% off a bf16 query on an AMX CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 << 20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD_BYTES = 256 << 20  # free heap kept before memory is handed back to the OS


def malloc_arenas() -> int:
    """WINCLIP_MALLOC_ARENAS overrides the cap; 0 leaves glibc's default (8 per core)."""
    from .settings import env

    return int(env("WINCLIP_MALLOC_ARENAS"))


log = logging.getLogger(__name__)
_state: dict[str, bool] = {}


def tuning_enabled() -> bool:
    """WINCLIP_MALLOC_TUNING=0 leaves the allocator alone."""
    from .settings import switched_on

    return switched_on("WINCLIP_MALLOC_TUNING")


def configure_process(device: str = "cpu") -> bool:
    """Entry points call this once, before creating tensors; True when the allocator settings apply."""
    device = str(device or "auto")
    if device == "auto":
        import torch  # importing torch allocates no CPU tensor, so THP_MEM_ALLOC_ENABLE below still takes effect

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cpu"):
        return False
    request_huge_pages()
    return tune_cpu_allocator()


def request_huge_pages() -> None:
    """Ask torch for 2 MB-aligned, huge-page-backed large tensors (effective before its first allocation)."""
    if tuning_enabled() and sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds and cap its arenas once per process; True when in effect."""
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if tuning_enabled() and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = getattr(libc, "mallopt", None)  # absent on musl
            if mallopt is not None:
                arenas = malloc_arenas()
                tuned = ((arenas == 0 or bool(mallopt(M_ARENA_MAX, arenas)))
                         and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
                         and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
        except OSError as exc:
            log.debug("allocator tuning unavailable: %s", exc)
    _state["tuned"] = tuned
    return tuned
