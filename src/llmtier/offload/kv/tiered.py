"""``TieredCache``: the transformers-facing side of the KV tier (see ``cache.py`` for how it works).

>>> cache = TieredCache(model.config, memory="2GiB", path="/nvme/kv")     # doctest: +SKIP
>>> out = model.generate(ids, cache=cache, max_new_tokens=64)          # doctest: +SKIP (past_key_values= in older transformers)
>>> cache.stats().bytes_read                                            # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any

from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ...engine import Engine
from .cache import DEFAULT_PAGE_TOKENS, KVConfigError, KVStats, Tier, default_directory, parse_memory

ATTENTION = "full_attention"
WINDOWED = ("sliding_attention", "chunked_attention")  # transformers keeps both in a DynamicSlidingWindowLayer
NO_KV = "dummy"  # MoE/MLP-only layers and layers that reuse another layer's KV


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer of ``config``: ``None`` (full attention), the window (sliding or chunked attention), or
    ``0`` (no KV).  Raises :class:`KVConfigError` for what the tier cannot keep."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "use_cache", True) is False:
        raise KVConfigError(f"this {getattr(text, 'model_type', 'model')} config sets use_cache=False, so generate "
                            "would send the whole sequence at every step past the cache; set "
                            "model.config.use_cache = True and model.generation_config.use_cache = True (or pass "
                            "use_cache=True to generate) first")
    types, kwargs = get_layer_types_and_kwargs(text)
    if isinstance(kwargs, dict):  # transformers < 5.2x: one set of kwargs shared by every layer
        kwargs = [kwargs] * len(types)
    odd = sorted({t for t in types if t not in (ATTENTION, NO_KV, *WINDOWED)})
    if odd:
        raise KVConfigError(f"TieredCache keeps attention KV only; this model has layers of type {odd}, which keep "
                            "a recurrent or compressed state the tier does not hold (use transformers' DynamicCache)")
    out: list[int | None] = []
    for t, kw in zip(types, kwargs):
        if t == NO_KV:
            out.append(0)
        elif t == ATTENTION:
            out.append(None)
        else:
            w = kw.get("sliding_window")
            if not isinstance(w, int) or w < 1:
                raise KVConfigError(f"a {t} layer without a window size ({w!r}) in the config")
            out.append(w)
    if not any(w != 0 for w in out):
        raise KVConfigError("this model has no attention layer: nothing for TieredCache to keep")
    return out


def _no_kv_layer() -> Any:
    """transformers' placeholder for a layer that keeps no KV.  Only configs of transformers versions that have
    it name ``dummy`` layers, so it is imported here, not at the top (older supported versions lack it)."""
    from transformers.cache_utils import DummyLayer  # noqa: PLC0415

    return DummyLayer()


class TieredLayer(CacheLayerMixin):
    """One decoder layer's view of the tier; the data lives in the shared :class:`Tier`."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, tier: Tier, index: int, window: int | None = None) -> None:
        super().__init__()
        self.tier, self.index, self.window = tier, index, window
        self.is_sliding = window is not None

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        self.is_initialized = True

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.is_initialized = True
        return self.tier.update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n = self.get_seq_length()
        if self.window is None:
            return n + query_length, 0
        # as transformers' DynamicSlidingWindowLayer: the last window - 1 tokens and the new ones
        return min(n, self.window - 1) + query_length, max(n - self.window + 1, 0)

    def get_seq_length(self) -> int:
        return self.tier.length(self.index)

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.tier.reset(self.index)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        self.tier.crop(self.index, tokens_to_remove)

    def held_from(self) -> int:
        """The first token this layer still holds (a sliding layer drops what left its window)."""
        return self.tier.held_from(self.index)

    def _refuse(self, what: str) -> None:
        raise KVConfigError(f"TieredCache does not support {what} (beam search and batch expansion rewrite "
                            "every page; use greedy or sampled decoding)")

    def reorder_cache(self, beam_idx: Any) -> None:
        self._refuse("reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() or repeats != 1:
            self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: Any) -> None:
        self._refuse("batch_select_indices")

    def offload(self) -> None:  # the tier decides what lives where
        return None

    def prefetch(self) -> None:
        return None


class TieredCache(Cache):
    """A KV cache for ``generate(cache=...)`` whose pages live in ``memory`` bytes of DRAM and on SSD.

    (Older transformers name the argument ``past_key_values``; ``llmtier.offload.hfcompat.cache_kwargs``
    picks the name the installed one prefers.)

    ``memory`` is the DRAM pool (``"2GiB"`` or bytes); ``path`` is the directory
    of the spill file (``$LLMTIER_KV_DIR`` or the temporary directory when
    omitted; it must accept direct I/O).  ``page_tokens`` tokens make a page;
    ``prefetch`` spilled layers are read ahead; ``spill_all`` puts every layer
    on SSD from the first forward (tests, benchmarks of the SSD path) instead
    of only as many as the budget needs.  Outputs are those of
    transformers' ``DynamicCache``: the same K and V reach attention.
    Sliding-window and chunked-attention layers keep only their window; layers
    without KV (``"dummy"``) hold nothing; K and V may differ in head size
    (MLA).  Models whose layers keep a recurrent state (mamba, linear
    attention, conv) are refused.  Use it as a context manager, or call :meth:`close`.
    ``plan``: a :class:`llmtier.plan.planner.KVPlan` (``plan_inference(...).kv``) instead
    of ``memory``: the pool, page size and read-ahead the planner chose.
    """

    def __init__(self, config: Any, *, memory: int | str | None = None, path: str | os.PathLike[str] | None = None,
                 page_tokens: int = DEFAULT_PAGE_TOKENS, prefetch: int = 2, engine: Engine | None = None,
                 io_nice: int | None = -10, spill_all: bool = False, plan: Any = None) -> None:
        if (memory is None) == (plan is None):
            raise KVConfigError("give TieredCache either memory= (the DRAM pool) or plan= (the planner's KV plan, "
                                "llmtier.plan.plan_inference(...).kv)")
        if plan is not None:  # the planner's KV part: its pool, page size and read-ahead
            memory, page_tokens, prefetch = plan.memory, plan.page_tokens, plan.prefetch
        windows = layer_windows(config)
        directory = os.fspath(path) if path is not None else default_directory()
        self.tier = Tier(windows, parse_memory(memory), directory, page_tokens, prefetch, engine, io_nice, spill_all)
        super().__init__(layers=[_no_kv_layer() if w == 0 else TieredLayer(self.tier, i, w)
                                 for i, w in enumerate(windows)])

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self.layers[layer_idx].update(key_states, value_states)

    def export(self, layer_idx: int, start: int, stop: int) -> tuple[Any, Any]:
        """Copies of one layer's K and V for tokens ``[start, stop)``, read back from SSD where spilled."""
        return self.tier.export(layer_idx, start, stop)

    def stats(self) -> KVStats:
        """The tier's counters now (bytes read and written, stalls, residency, DRAM held)."""
        return self.tier.sync_stats()

    @property
    def memory(self) -> int:
        return self.tier.memory

    def close(self) -> None:
        """Wait for I/O in flight, drop the spill file, free the pool."""
        self.tier.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.tier.stats
        return (f"TieredCache(layers={len(self.tier.attn)}, memory={self.tier.memory}, resident={s.resident_layers}, "
                f"spilled={s.spilled_layers})")
