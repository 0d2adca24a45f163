"""The offloaded optimizer's placement: how large a chunk of AdamW state one DRAM budget steps at a time.

:class:`llmtier.offload.optim.OffloadedAdamW` keeps its state on SSD as one
flat fp32 run per parameter group, cut into chunks; the step keeps three
record buffers in flight (chunk i+1 being read, i being updated, i-1 being
written), each ``3 * 4 * chunk_elems`` bytes, plus a gradient buffer and a
scratch buffer of ``4 * chunk_elems`` each: :data:`BYTES_PER_ELEM` = 44 bytes
per chunk element.  The chunk length is decided here, from the groups' flat
lengths (elements, each parameter padded to :data:`ALIGN`).  Pure arithmetic.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import BudgetError
from ..units import human

ALIGN = 1024  # elements: 4 KiB of fp32
MIN_CHUNK = 16 * ALIGN  # the smallest chunk a budget may force (64 KiB per state region)
SLOTS = 3  # record buffers in flight: read i+1, update i, write i-1
BYTES_PER_ELEM = SLOTS * 3 * 4 + 4 + 4  # three record buffers + gradient + scratch


class OptimizerBudgetError(BudgetError):
    """The DRAM budget cannot hold the optimizer's pipeline; ``least`` is the smallest budget that works."""

    def __init__(self, budget: int, least: int, detail: str) -> None:
        super().__init__(f"an optimizer memory budget of {human(budget)} is below the least that works, "
                         f"{human(least)} ({least} bytes): {detail}")
        self.budget = budget
        self.least = least


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def least_budget(flat_lens: Sequence[int]) -> int:
    """The smallest DRAM budget (bytes) that steps groups of ``flat_lens`` elements."""
    largest = max((round_up(n, ALIGN) for n in flat_lens), default=ALIGN)
    return BYTES_PER_ELEM * max(ALIGN, min(MIN_CHUNK, largest))


def chunk_elems_for(budget: int, flat_lens: Sequence[int], chunk_elems: int | None = None) -> int:
    """Chunk length in elements for ``budget`` bytes (or the ``chunk_elems`` asked for, checked against it)."""
    least = least_budget(flat_lens)
    largest = max((round_up(n, ALIGN) for n in flat_lens), default=ALIGN)
    if budget < least:
        raise OptimizerBudgetError(budget, least, f"{SLOTS} record buffers in flight of 12 bytes per element plus "
                                   f"gradient and scratch buffers make {BYTES_PER_ELEM} bytes per chunk element, and "
                                   f"a chunk is at least {min(MIN_CHUNK, largest)} elements")
    if chunk_elems is not None:
        if chunk_elems <= 0 or chunk_elems % ALIGN:
            raise ValueError(f"chunk_elems must be a positive multiple of {ALIGN}, got {chunk_elems}")
        if BYTES_PER_ELEM * chunk_elems > budget:
            raise OptimizerBudgetError(budget, BYTES_PER_ELEM * chunk_elems,
                                       f"chunks of {chunk_elems} elements need {BYTES_PER_ELEM} bytes per element")
        return min(chunk_elems, largest)
    return max(ALIGN, min(largest, (budget // BYTES_PER_ELEM) // ALIGN * ALIGN))


def state_bytes(flat_lens: Sequence[int], low_precision: bool, chunk_elems: int) -> int:
    """Bytes of the state file: per element two fp32 moments, and an fp32 master when the weights are bf16/fp16
    (chunks padded to :data:`ALIGN`)."""
    regions = 3 if low_precision else 2
    return sum(regions * 4 * round_up(n, ALIGN) for n in flat_lens) if chunk_elems else 0


__all__ = ["ALIGN", "BYTES_PER_ELEM", "MIN_CHUNK", "SLOTS", "OptimizerBudgetError", "chunk_elems_for", "least_budget",
           "round_up", "state_bytes"]
