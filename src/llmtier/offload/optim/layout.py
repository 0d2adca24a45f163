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

DRAM: the chunk length and the DRAM it takes (:data:`BYTES_PER_ELEM` = 44
bytes per chunk element) are the planner's (:mod:`llmtier.plan.optim`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...plan import optim as _plan
from ...plan.optim import ALIGN, BYTES_PER_ELEM, MIN_CHUNK, SLOTS, OptimizerBudgetError, round_up

LOW_PRECISION = ("torch.bfloat16", "torch.float16")


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


def least_budget(groups: list[list[Any]]) -> int:
    """The smallest DRAM budget (bytes) with which ``groups`` of parameters can be stepped (the planner's rule)."""
    return _plan.least_budget([_flat_len(ps) for ps in groups])


def chunk_elems_for(budget: int, groups: list[list[Any]], chunk_elems: int | None = None) -> int:
    """Chunk length in elements for ``budget`` bytes, as the planner decides it (:func:`llmtier.plan.optim.chunk_elems_for`)."""
    return _plan.chunk_elems_for(budget, [_flat_len(ps) for ps in groups], chunk_elems)


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
