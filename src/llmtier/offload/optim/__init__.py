"""Optimizer state on SSD: :class:`OffloadedAdamW` (AdamW moments and fp32 master weights in
chunks on disk, stepped through a DRAM budget by a read / update / write pipeline)."""
from __future__ import annotations

from .adamw import STATE_FILE, OffloadedAdamW, OptimizerError, OptimStats
from .layout import BYTES_PER_ELEM, Chunk, OptimizerBudgetError, Piece, least_budget

__all__ = ["BYTES_PER_ELEM", "STATE_FILE", "Chunk", "OffloadedAdamW", "OptimStats", "OptimizerBudgetError",
           "OptimizerError", "Piece", "least_budget"]
