"""The KV tier's counters and settings; its geometry and DRAM budget are :mod:`llmtier.plan.kv`'s.

"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from ...plan.kv import (  # the placement lives in the planner; re-exported for the tier
    DEFAULT_PAGE_TOKENS,
    SLOT_ALIGN,
    Geometry,
    KVConfigError,
    capacity,
    choose_spills,
    keep,
    min_memory,
    need,
    resident_tokens,
    spill_order,
    staging_tokens,
)
from ...units import parse_size


@dataclass
class KVStats:
    """Counters of one :class:`TieredCache` (read with :meth:`TieredCache.stats`)."""

    bytes_read: int = 0  # page groups read for attention
    bytes_written: int = 0  # page groups written (spill, and pages that filled)
    discarded_bytes: int = 0  # read ahead, then not used (the pass after the last one, a crop)
    other_bytes_read: int = 0  # read back for a crop or an export (the prefix store)
    page_reads: int = 0
    page_writes: int = 0
    pages_dropped: int = 0  # pages of sliding-window layers that left the window (slots given back)
    stall_s: float = 0.0  # compute waiting for reads
    write_wait_s: float = 0.0
    forwards: int = 0
    resident_layers: int = 0
    spilled_layers: int = 0
    dram_bytes: int = 0  # what the pool holds now
    peak_dram_bytes: int = 0
    ssd_bytes: int = 0
    reads_by_page: dict[int, int] = field(default_factory=dict)  # page index -> reads (all layers)
    device_bytes: int = 0  # a CUDA model: host -> GPU bytes of the past handed to attention

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_directory() -> str:
    """Where spill files go when no ``path`` is given: ``$LLMTIER_KV_DIR``, else the temporary directory."""
    return os.environ.get("LLMTIER_KV_DIR") or tempfile.gettempdir()


def parse_memory(memory: int | str) -> int:
    m = parse_size(memory) if isinstance(memory, str) else int(memory)
    if m <= 0:
        raise KVConfigError(f"KV memory must be > 0, got {memory!r}")
    return m


__all__ = ["DEFAULT_PAGE_TOKENS", "SLOT_ALIGN", "Geometry", "choose_spills",
           "KVConfigError", "KVStats", "capacity", "default_directory", "keep",
           "min_memory", "need", "parse_memory", "resident_tokens", "spill_order", "staging_tokens"]
