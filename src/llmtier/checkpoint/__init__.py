"""Training checkpoints: durable, crash-safe, asynchronous, sharded across ranks.

>>> from llmtier import checkpoint
>>> checkpoint.save({"model": model.state_dict(), "step": 100}, "ckpt", step=100)   # doctest: +SKIP
>>> state = checkpoint.load("ckpt")                   # the newest complete checkpoint  # doctest: +SKIP
>>> with checkpoint.Checkpointer("ckpt", keep_last=3) as ck:                         # doctest: +SKIP
...     ck.save_async(state, step=200)                # returns after the snapshot
...     ck.wait()

Tensors go through the engine with direct I/O into llmtier stores (one per
rank); everything else is JSON.  ``DCPWriter`` / ``DCPReader`` are a storage
layer for ``torch.distributed.checkpoint``.  Format and guarantees:
``docs/CHECKPOINT.md``.
"""
from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .core import AsyncSave, Checkpointer, CheckpointInfo, CheckpointWarning, latest_step, load, save
from .tree import LazyTensor


def __getattr__(name: str) -> Any:  # DCP classes import torch.distributed: only on demand
    if name in ("DCPWriter", "DCPReader"):
        from . import dcp  # noqa: PLC0415

        return getattr(dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AsyncSave", "CheckpointError", "CheckpointInfo", "CheckpointWarning", "Checkpointer", "DCPReader",
           "DCPWriter", "LazyTensor", "latest_step", "load", "save"]
