"""The counters every runtime reports, in one shape: a dataclass read by attribute, with ``as_dict()``.

``model.llmtier.stats()`` (:class:`WeightStats`), ``TieredCache.stats()``
(``KVStats``) and ``PrefixStore.metrics()`` (``PrefixMetrics``) all work
this way.  ``stats()["bytes_read"]`` on the weights' counters still works
for now and warns (``DeprecationWarning``): it was a dict before.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any


class _Counters:
    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (for JSON)."""
        return asdict(self)  # type: ignore[call-overload]

    def __getitem__(self, name: str) -> Any:
        warnings.warn(f"stats()[{name!r}] is deprecated: use stats().{name} (or stats().as_dict())",
                      DeprecationWarning, stacklevel=2)
        if name not in self.as_dict():
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class WeightStats(_Counters):
    """A streamed model's counters now (``model.llmtier.stats()``)."""

    bytes_read: int  # streamed layers, after the start
    layer_loads: int
    passes: int  # forward passes through the decoder
    stall_s: float  # time the compute waited for reads
    load_s: float  # reading the resident set at the start
    discarded_bytes: int  # read ahead but never used
    embedding_bytes_read: int  # rows of the input embedding table
    resident_bytes_read: int
    resident_bytes: int  # the plan's resident set
    weights_memory_bytes: int  # resident set + slot buffers
    streamed_bytes_per_pass: int
    resident_share: float
    # on a GPU (``stream_model(device="cuda")``): the tiers below GPU memory
    device: str = "cpu"
    copied_bytes: int = 0  # host -> GPU bytes of streamed layers
    cached_layers: int = 0  # streamed layers held in pinned host memory
    disk_layers: int = 0  # streamed layers read from the disk every pass
    host_memory_bytes: int = 0  # pinned host memory of the plan


__all__ = ["WeightStats"]
