"""Training data read at the device's speed: :class:`TokenDataset` (random windows of a flat or
Megatron-indexed token file, one batched engine read per batch, prefetched, deterministic, resumable)
and the Megatron ``.idx`` reader/writer (:mod:`.indexed`)."""
from __future__ import annotations

from .indexed import IndexedInfo, read_index, write_indexed
from .tokens import BatchReader, DataError, TokenDataset

__all__ = ["BatchReader", "DataError", "IndexedInfo", "TokenDataset", "read_index", "write_indexed"]
