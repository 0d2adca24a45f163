"""Runtimes built on the engine and the store: weight streaming (``weights``);
the KV-cache tier and optimizer offload come next."""
from __future__ import annotations

from .weights import BudgetError, Plan, WeightStreamer, stream_model

__all__ = ["BudgetError", "Plan", "WeightStreamer", "stream_model"]
