"""The CPU ops' cache of large blocks (csrc/cpu/huge_pages.h): what it holds, and giving it back.

Results and large temporaries of the CPU ops from 1 MiB on come from 2 MiB-aligned blocks on transparent
huge pages, and up to 16 freed blocks (512 MiB in all) are kept for the next call of the same size, so a
loop of steps pages its memory in once. That memory stays with the process after the loop: as
`torch.cuda.empty_cache()` does for torch's CUDA cache, `empty_cache()` gives the cached blocks back to the
OS, and `memory_stats()` says how much is live and cached. (GPU results come from torch's CUDA caching
allocator: `torch.cuda.memory_stats` and `torch.cuda.empty_cache` cover them.)
"""

from __future__ import annotations

from ._extension import CPU


def memory_stats() -> dict[str, int]:
    """{"live_bytes": blocks handed out and not freed yet, "cached_bytes": freed blocks kept for reuse,
    "cached_blocks": their number}; all 0 without the compiled CPU extension."""
    if not CPU.loaded:
        return {"live_bytes": 0, "cached_bytes": 0, "cached_blocks": 0}
    return dict(CPU.module.huge_page_stats())


def empty_cache() -> None:
    """Give the CPU ops' cached blocks back to the OS (live tensors are untouched; a block freed later is
    cached again). Nothing to do without the compiled CPU extension."""
    if CPU.loaded:
        CPU.module.empty_huge_page_cache()
