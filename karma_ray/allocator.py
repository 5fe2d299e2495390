"""The memory allocator of processes that do heavy CPU work: tcmalloc where the machine has it.

Standard library only, so that a script can restart itself with it before importing anything heavy.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

MALLOC_ENV = "KARMA_MALLOC"  # "tcmalloc" (the default: used where installed), "system", or a library's path
_REEXEC_MARK = "KARMA_MALLOC_REEXEC"


def fast_allocator_env() -> dict[str, str]:
    """LD_PRELOAD settings for tcmalloc where the machine has it (Debian/Ubuntu: libtcmalloc-minimal4), else {}.

    Why: on CPU, PyTorch frees and re-allocates each step's activations. glibc hands blocks over 32 MiB
    (the vocabulary-sized logits of L_gen and L_recon) back to the kernel and takes them again as fresh
    zero-filled pages: 165,000 page faults in a KARMA step. tcmalloc keeps freed memory (1,700 faults), and
    the step takes 0.83x the time (benchmarks/results/train_step_cost.md; 0.76x in a real ml100k run). GPU memory has its own caching
    allocator, so this is for CPU work: training and evaluation on CPU, the trunk cache, export.
    KARMA_MALLOC=system turns it off.
    """
    choice = os.environ.get(MALLOC_ENV, "tcmalloc")
    if choice == "system" or not sys.platform.startswith("linux"):
        return {}
    if choice == "tcmalloc":
        lib = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    elif Path(choice).is_file():
        lib = choice
    else:
        raise ValueError(f"{MALLOC_ENV}={choice!r}: expected tcmalloc, system or the path of a shared library")
    if not lib:
        return {}
    already = os.environ.get("LD_PRELOAD", "")
    preload = already if lib in already else f"{lib} {already}".strip()
    # tcmalloc prints a line for every allocation over 1 GiB by default (a large batch's vocabulary logits are)
    return {"LD_PRELOAD": preload, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def allocator_in_use() -> str:
    """The preloaded allocator this process runs with ("tcmalloc", "jemalloc", "mimalloc"), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if f"lib{name}" in maps), "system")


def reexec_with_fast_allocator() -> None:
    """Restart this script once with `fast_allocator_env()` set, when it names a library not yet loaded.

    For scripts whose own process does heavy CPU work (a driver evaluates and exports in-process): the
    allocator must be preloaded before the interpreter starts. Call it first under `__main__`, never from a
    library function (a test calling `main()` would restart pytest). Output so far is flushed first.
    """
    env = fast_allocator_env()
    if not env or os.environ.get(_REEXEC_MARK) or allocator_in_use() != "system":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env, _REEXEC_MARK: "1"})
