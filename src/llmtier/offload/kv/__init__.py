"""The KV-cache tier: ``TieredCache`` (offloaded decode) and ``PrefixStore`` (prefix reuse).

``TieredCache`` is a transformers ``Cache`` whose pages live in a bounded DRAM
pool and spill to SSD; ``PrefixStore`` keeps the KV of processed prompts in
checksummed chunk files keyed by a chained hash of their tokens and the
model's identity, so a later request, or a later process, loads it instead
of recomputing the prefill.  See ``docs/KV.md``.
"""
from __future__ import annotations

from .cache import KVConfigError, KVStats, min_memory, spill_order
from .prefix import PrefixMetrics, PrefixStore, chain_keys, model_identity
from .tiered import TieredCache, TieredLayer

__all__ = ["KVConfigError", "KVStats", "PrefixMetrics", "PrefixStore", "TieredCache", "TieredLayer", "chain_keys",
           "min_memory", "model_identity", "spill_order"]
