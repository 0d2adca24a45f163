"""Nested training state <-> a JSON tree plus a flat list of tensors.

A checkpoint holds arbitrary nested state (model and optimizer state dicts,
scheduler, RNG states, data position, user metadata).  :func:`encode` walks
it once: every tensor (torch or numpy, or a :class:`LazyTensor`) becomes a
leaf ``{"tensor": NAME, ...}`` and is listed for the store; everything else
must be plain data and is written as JSON, which is never executed on load
(no pickle).  Supported non-tensor values: ``None``, ``bool``, ``int``,
``float`` (including nan/inf), ``str``, ``bytes``, ``list``, ``tuple``,
``dict`` (any keys of those scalar types, order kept), numpy scalars,
``torch.dtype``, ``torch.Size``, ``torch.device``.  Anything else raises
:class:`~llmtier.errors.CheckpointError` naming where it was.

The encoded tree uses one-key wrapper objects so that nothing is ambiguous:
``{"d": {...}}`` a dict with string keys, ``{"dk": [[k, v], ...]}`` any other
dict, ``{"tuple": [...]}``, ``{"float": "nan"}``, ``{"bytes": "<hex>"}``,
``{"np": ["float32", 1.5]}``, ``{"dtype": "bfloat16"}``, ``{"size": [...]}``,
``{"device": "cuda:0"}``, ``{"tensor": NAME, "kind": "torch"|"numpy",
"device": "cpu"}``; lists are JSON arrays.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..store import dtypes
from ..store.format import MAX_NAME

_SCALARS = (type(None), bool, int, float, str)


@dataclass
class LazyTensor:
    """A tensor value whose bytes are produced on demand, piece by piece.

    ``chunks()`` must yield bytes-like pieces (``bytes``, numpy arrays, CPU
    torch tensors — anything with the buffer protocol) whose total size is
    exactly ``prod(shape) * itemsize`` bytes of ``dtype``, in row-major
    order.  :func:`llmtier.checkpoint.save` pulls the pieces and streams them
    into the checkpoint without ever holding the whole tensor in memory;
    ``save_async`` copies them into its staging pool before it returns.
    Loading gives back an ordinary tensor (``kind`` ``"torch"`` or
    ``"numpy"``), or fills the tensor ``into`` holds at that place.

    ``readahead`` (default True): the pieces are pulled on a background
    thread, up to 128 MiB ahead of the writer, so the producer's reads
    overlap the checkpoint's writes.  Every piece must then stay unchanged
    after the next one is asked for (a fresh buffer per piece).  A producer
    that refills one buffer passes ``readahead=False``.

    >>> lazy = LazyTensor("float32", (1 << 20,), lambda: (ssd_read(i) for i in range(4)))  # doctest: +SKIP
    """

    dtype: Any  # a torch.dtype, numpy dtype or a store dtype name ("bfloat16")
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[Any]]
    kind: str = "torch"
    readahead: bool = True  # pieces are pulled ahead on a background thread; each must be a fresh buffer

    @property
    def store_dtype(self) -> dtypes.DType:
        name = self.dtype if isinstance(self.dtype, str) else str(self.dtype).removeprefix("torch.")
        if isinstance(self.dtype, np.dtype) or (isinstance(self.dtype, type) and issubclass(self.dtype, np.generic)):
            return dtypes.of(np.empty(0, dtype=self.dtype))
        return dtypes.lookup(name)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.store_dtype.itemsize


@dataclass
class Leaf:
    """One tensor found in the state: its store name and the value to write."""

    name: str
    value: Any  # torch.Tensor, np.ndarray or LazyTensor

    @property
    def nbytes(self) -> int:
        return int(self.value.nbytes) if not _is_torch(self.value) else self.value.numel() * self.value.element_size()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "untyped_storage")


def _torch_mod(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def encode(state: Any) -> tuple[Any, list[Leaf]]:
    """Encode ``state``; returns ``(json_tree, tensors)`` (tensors in walk order)."""
    leaves: list[Leaf] = []
    used: set[str] = set()

    def name_for(path: list[str]) -> str:
        base = ".".join(_escape(p) for p in path) or "value"
        base = base[: MAX_NAME // 4 - 16]
        name, k = base, 1
        while name in used:
            name, k = f"{base}~{k}", k + 1
        used.add(name)
        return name

    def walk(x: Any, path: list[str]) -> Any:
        t = type(x)
        if t in _SCALARS:
            if t is float and not math.isfinite(x):
                return {"float": repr(x)}
            return x
        if isinstance(x, LazyTensor):
            name = name_for(path)
            leaves.append(Leaf(name, x))
            return {"tensor": name, "kind": x.kind, "device": "cpu"}
        if _is_torch(x):
            if x.is_sparse or x.layout.__repr__() != "torch.strided":
                raise CheckpointError(f"{_where(path)}: only dense (strided) tensors can be saved, got {x.layout}")
            name = name_for(path)
            leaves.append(Leaf(name, x))
            return {"tensor": name, "kind": "torch", "device": str(x.device)}
        if isinstance(x, np.ndarray):
            name = name_for(path)
            leaves.append(Leaf(name, x))
            return {"tensor": name, "kind": "numpy", "device": "cpu"}
        if isinstance(x, np.generic):
            v = x.item()
            return {"np": [x.dtype.name, walk(v, path) if not isinstance(v, bytes) else {"bytes": v.hex()}]}
        if isinstance(x, dict):
            if all(type(k) is str for k in x):
                return {"d": {k: walk(v, [*path, k]) for k, v in x.items()}}
            items = []
            for k, v in x.items():
                if type(k) not in _SCALARS and not isinstance(k, tuple):
                    raise CheckpointError(f"{_where(path)}: dict key {k!r} of type {type(k).__name__} cannot be saved "
                                          "(keys must be str, int, float, bool, None or tuples of them)")
                items.append([walk(k, [*path, "key"]), walk(v, [*path, str(k)])])
            return {"dk": items}
        if t is list:
            return [walk(v, [*path, str(i)]) for i, v in enumerate(x)]
        if t is tuple:
            return {"tuple": [walk(v, [*path, str(i)]) for i, v in enumerate(x)]}
        if isinstance(x, (bytes, bytearray)):
            return {"bytes": bytes(x).hex()}
        mod = _torch_mod(x)
        if mod == "torch":
            kind = type(x).__name__
            if kind == "dtype":
                return {"dtype": str(x).removeprefix("torch.")}
            if kind == "Size":
                return {"size": list(x)}
            if kind == "device":
                return {"device": str(x)}
        raise CheckpointError(f"{_where(path)}: a value of type {type(x).__module__}.{type(x).__qualname__} cannot be "
                              "saved without pickle; convert it to tensors and plain data (dict, list, str, numbers)")

    return walk(state, []), leaves


def decode(tree: Any, tensors: Callable[[dict[str, Any], list[str]], Any]) -> Any:
    """Rebuild the state from ``tree``; ``tensors(leaf, path)`` returns the value of a tensor leaf."""

    def walk(x: Any, path: list[str]) -> Any:
        if x is None or type(x) in (bool, int, float, str):
            return x
        if type(x) is list:
            return [walk(v, [*path, str(i)]) for i, v in enumerate(x)]
        if type(x) is not dict or len(x) not in (1, 3):
            raise CheckpointError(f"{_where(path)}: malformed tree node {str(x)[:80]}")
        (key, val), *_ = x.items()
        if key == "tensor":
            return tensors(x, path)
        if key == "d":
            return {k: walk(v, [*path, k]) for k, v in val.items()}
        if key == "dk":
            return {_hashable(walk(k, [*path, "key"])): walk(v, [*path, str(i)]) for i, (k, v) in enumerate(val)}
        if key == "tuple":
            return tuple(walk(v, [*path, str(i)]) for i, v in enumerate(val))
        if key == "float":
            return float(val)
        if key == "bytes":
            return bytes.fromhex(val)
        if key == "np":
            inner = walk(val[1], path)
            return np.array(inner, dtype=val[0])[()]
        if key in ("dtype", "size", "device"):
            import torch  # noqa: PLC0415 - only when the saved state had torch objects

            if key == "dtype":
                return getattr(torch, val)
            return torch.Size(val) if key == "size" else torch.device(val)
        raise CheckpointError(f"{_where(path)}: unknown tree node {key!r}")

    return walk(tree, [])


def lookup(tree: Any, path: list[str]) -> Any:
    """The value at ``path`` in a user state (for ``into=``); ``None`` when absent."""
    x = tree
    for p in path:
        if isinstance(x, dict):
            if p in x:
                x = x[p]
                continue
            hit = [k for k in x if str(k) == p]
            if len(hit) != 1:
                return None
            x = x[hit[0]]
        elif isinstance(x, (list, tuple)):
            try:
                x = x[int(p)]
            except (ValueError, IndexError):
                return None
        else:
            return None
    return x


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _escape(p: str) -> str:
    return p.replace("%", "%25").replace(".", "%2E").replace("/", "%2F").replace("\\", "%5C").replace("\0", "%00")


def _where(path: list[str]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)
