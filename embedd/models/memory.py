"""The activation-memory budget: how big one forward pass may be, by design.

Why a budget and not "catch the out-of-memory error": on a CPU the kernel's
OOM killer ends the daemon before any allocator error reaches Python, so a
pass that does not fit is not an error to recover from but a crash that takes
every client's work with it. (On CUDA the halving in
:func:`embedd.models.runtime.run_batched` stays, as a last resort for memory
that something else took.)

So every backend knows what one batch item costs -- computed from the loaded
architecture's sizes, with constants measured at real size (see each
backend's ``item_bytes``) -- and puts ``budget // cost`` items in a pass, at
least one and at most the ``batch_size`` cap. Long tracks are cut into
fixed-length items (windows, clips, chunks), so the cost of one item never
depends on the track's length, and a 30-minute track only means more passes.

The default budget is a share of the device: 1/12 of the host's RAM on a CPU
(2 GiB on a 24 GiB host; at most 8 GiB), a quarter of the GPU's memory on
CUDA. An item bigger than the whole budget still runs alone: the budget sets
how many items share a pass, not whether a track can be embedded.
"""

from __future__ import annotations

import os

__all__ = ["MiB", "default_budget_bytes", "items_per_pass"]

MiB = 1 << 20
_CPU_SHARE = 12
_CPU_MAX = 8192 * MiB
_CPU_MIN = 512 * MiB
_GPU_SHARE = 4


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8192 * MiB


def default_budget_bytes(device: str) -> int:
    """The budget when the operator set none, from the device's memory."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory // _GPU_SHARE)
    return int(min(_CPU_MAX, max(_CPU_MIN, _host_ram_bytes() // _CPU_SHARE)))


def items_per_pass(item_bytes: int, budget_bytes: int, cap: int) -> int:
    """How many items of ``item_bytes`` one forward pass takes: ``budget // cost`` in ``[1, cap]``."""
    if item_bytes <= 0:
        return max(1, cap)
    return max(1, min(int(cap), int(budget_bytes // item_bytes)))
