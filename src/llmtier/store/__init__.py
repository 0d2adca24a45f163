"""The tensor store: one aligned, checksummed, crash-safe on-disk format.

>>> from llmtier.store import StoreWriter, open_store
>>> with StoreWriter("model.lts") as w:                      # doctest: +SKIP
...     w.add("layers.0.wq", tensor, tags={"layer": 0, "kind": "attn"})
>>> with open_store("model.lts") as s:                       # doctest: +SKIP
...     wq = s.get_torch("layers.0.wq")

``open_store`` also reads safetensors files and Hugging Face model
directories in place.  The format is specified in ``docs/FORMAT.md``.
"""
from __future__ import annotations

from ..errors import ChecksumError, FormatError, TensorNotFoundError
from .dtypes import DTYPES, DType
from .format import TensorInfo
from .reader import SafetensorsSource, Store, TensorSource, open_store, read_index, verify_mode
from .safetensors import open_hf_dir, open_safetensors
from .writer import StoreWriter, TensorSink, write_store

__all__ = [
    "DTYPES", "ChecksumError", "DType", "FormatError", "SafetensorsSource", "Store", "StoreWriter", "TensorInfo",
    "TensorNotFoundError", "TensorSink", "TensorSource", "open_hf_dir", "open_safetensors", "open_store",
    "read_index", "verify_mode", "write_store",
]
