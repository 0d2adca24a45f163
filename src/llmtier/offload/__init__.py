"""Runtimes built on the engine and the store: weight streaming (``weights``)
and the KV-cache tier (``kv``: ``TieredCache``, ``PrefixStore``; import
``llmtier.offload.kv``) and the optimizer state on SSD (``optim``: ``OffloadedAdamW``;
import ``llmtier.offload.optim``)."""
from __future__ import annotations

from .stats import WeightStats
from .weights import BudgetError, Plan, WeightStreamer, stream_model

__all__ = ["BudgetError", "Plan", "WeightStats", "WeightStreamer", "stream_model"]
