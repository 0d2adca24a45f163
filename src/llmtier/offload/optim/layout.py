"""Where AdamW state lies on SSD, and how it is cut into chunks that fit a DRAM budget.

Every parameter group is laid out as one flat run of fp32 elements; each
parameter starts at a multiple of :data:`ALIGN` elements (4 KiB), so every
slice of it is ``O_DIRECT``-aligned.  The flat run is cut into chunks of at
most ``chunk_elems`` elements.  A chunk is one *record* in the state file,
read and written with one request each::

    record of chunk k:  [ master (fp32, only if the chunk holds a bf16/fp16 parameter) | exp_avg | exp_avg_sq ]
                          each region elems * 4 bytes, elems a multiple of ALIGN

A chunk holds *pieces*: the part ``[p_lo, p_hi)`` of parameter ``param``'s
flat elements, at position ``c_lo`` of the chunk.  Padding between pieces
holds zeros and stays zero (its gradient is zero).

DRAM: the step keeps three record buffers in flight (chunk i+1 being read,
i being updated, i-1 being written), each ``3 * 4 * chunk_elems`` bytes, plus a
gradient buffer and a scratch buffer of ``4 * chunk_elems`` each:
:data:`BYTES_PER_ELEM` = 44 bytes per chunk element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...units import human
from ..layout import BudgetError

ALIGN = 1024  # elements: 4 KiB of fp32
MIN_CHUNK = 16 * ALIGN  # the smallest chunk a budget may force (64 KiB per state region)
SLOTS = 3  # record buffers in flight: read i+1, update i, write i-1
BYTES_PER_ELEM = SLOTS * 3 * 4 + 4 + 4  # three record buffers + gradient + scratch
LOW_PRECISION = ("torch.bfloat16", "torch.float16")


class OptimizerBudgetError(BudgetError):
    """The DRAM budget cannot hold the optimizer's pipeline; ``least`` is the smallest budget that works."""

    def __init__(self, budget: int, least: int, detail: str) -> None:
        super().__init__(f"an optimizer memory budget of {human(budget)} is below the least that works, "
                         f"{human(least)} ({least} bytes): {detail}")
        self.budget = budget
        self.least = least


@dataclass
class Piece:
    """Elements ``[p_lo, p_hi)`` of parameter ``index`` (its flat view) at chunk position ``c_lo``."""

    index: int  # the parameter's position over all groups (the state_dict index)
    param: Any  # torch.nn.Parameter
    p_lo: int
    p_hi: int
    c_lo: int

    @property
    def n(self) -> int:
        return self.p_hi - self.p_lo

    @property
    def c_hi(self) -> int:
        return self.c_lo + self.n


@dataclass
class Chunk:
    """One record of the state file."""

    index: int
    group: int
    elems: int  # a multiple of ALIGN
    offset: int  # byte offset of the record in the state file
    master: bool  # the record holds fp32 master weights
    pieces: list[Piece] = field(default_factory=list)

    @property
    def regions(self) -> int:
        return 3 if self.master else 2

    @property
    def nbytes(self) -> int:
        """Bytes of the record on disk (one read and one write per step)."""
        return self.regions * 4 * self.elems

    @property
    def buf_lo(self) -> int:
        """Where the record starts in a slot buffer laid out ``[master | exp_avg | exp_avg_sq]``."""
        return 0 if self.master else 4 * self.elems


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def least_budget(groups: list[list[Any]]) -> int:
    """The smallest DRAM budget (bytes) with which ``groups`` of parameters can be stepped."""
    largest = max((round_up(_flat_len(ps), ALIGN) for ps in groups), default=ALIGN)
    return BYTES_PER_ELEM * max(ALIGN, min(MIN_CHUNK, largest))


def chunk_elems_for(budget: int, groups: list[list[Any]], chunk_elems: int | None = None) -> int:
    """Chunk length in elements for ``budget`` bytes (or the ``chunk_elems`` asked for, checked against it)."""
    least = least_budget(groups)
    largest = max((round_up(_flat_len(ps), ALIGN) for ps in groups), default=ALIGN)
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


def plan_chunks(groups: list[list[Any]], chunk_elems: int) -> list[Chunk]:
    """Cut every group's flat run into chunks of at most ``chunk_elems`` elements."""
    chunks: list[Chunk] = []
    offset = 0
    index = 0
    for g, params in enumerate(groups):
        # positions of the parameters in the group's flat run
        spans = []
        pos = 0
        for p in params:
            spans.append((index, p, pos, pos + p.numel()))
            pos = round_up(pos + p.numel(), ALIGN)
            index += 1
        total = pos
        start = 0
        while start < total:
            elems = min(chunk_elems, total - start)
            end = start + elems
            pieces = [Piece(i, p, max(lo, start) - lo, min(hi, end) - lo, max(lo, start) - start)
                      for i, p, lo, hi in spans if lo < end and hi > start and hi > lo]
            master = any(str(pc.param.dtype) in LOW_PRECISION for pc in pieces)
            chunk = Chunk(len(chunks), g, elems, offset, master, pieces)
            chunks.append(chunk)
            offset += chunk.nbytes
            start = end
    return chunks


def _flat_len(params: list[Any]) -> int:
    pos = 0
    for p in params:
        pos = round_up(pos + p.numel(), ALIGN)
    return pos


__all__ = ["ALIGN", "BYTES_PER_ELEM", "MIN_CHUNK", "SLOTS", "Chunk", "OptimizerBudgetError", "Piece",
           "chunk_elems_for", "least_budget", "plan_chunks"]
