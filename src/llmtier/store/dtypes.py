"""Element types a store can hold: torch's names, numpy and safetensors equivalents.

The store records a dtype by torch's name (``"bfloat16"``, ``"float8_e4m3fn"``).
Every dtype torch has can be stored; numpy lacks some of them (bf16, the fp8
family), so :meth:`Store.get` returns those as their raw bits (``uint16`` for
bf16, ``uint8`` for fp8) and :meth:`Store.get_torch` as the real torch dtype.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class DType(NamedTuple):
    name: str  # torch's name, what the index records
    itemsize: int
    numpy: str  # numpy dtype of the value, or of its raw bits when numpy has no such type
    exact_numpy: bool  # False: ``numpy`` holds the raw bits only
    safetensors: str | None  # safetensors' code, None if it has none


_TABLE = [
    DType("bool", 1, "bool", True, "BOOL"),
    DType("uint8", 1, "uint8", True, "U8"),
    DType("int8", 1, "int8", True, "I8"),
    DType("int16", 2, "int16", True, "I16"),
    DType("uint16", 2, "uint16", True, "U16"),
    DType("int32", 4, "int32", True, "I32"),
    DType("uint32", 4, "uint32", True, "U32"),
    DType("int64", 8, "int64", True, "I64"),
    DType("uint64", 8, "uint64", True, "U64"),
    DType("float16", 2, "float16", True, "F16"),
    DType("bfloat16", 2, "uint16", False, "BF16"),
    DType("float32", 4, "float32", True, "F32"),
    DType("float64", 8, "float64", True, "F64"),
    DType("complex64", 8, "complex64", True, "C64"),
    DType("complex128", 16, "complex128", True, None),
    DType("float8_e4m3fn", 1, "uint8", False, "F8_E4M3"),
    DType("float8_e5m2", 1, "uint8", False, "F8_E5M2"),
    DType("float8_e4m3fnuz", 1, "uint8", False, None),
    DType("float8_e5m2fnuz", 1, "uint8", False, None),
    DType("float8_e8m0fnu", 1, "uint8", False, "F8_E8M0"),
]

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
FROM_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _TABLE if d.safetensors}
_FROM_NUMPY: dict[str, DType] = {d.numpy: d for d in _TABLE if d.exact_numpy}
# Short names users type on the command line.
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
           "fp64": "float64", "double": "float64", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
           "fp8_e5m2": "float8_e5m2"}


def lookup(name: str) -> DType:
    """The :class:`DType` called ``name`` (torch name or alias); ``ValueError`` if unknown."""
    name = str(name).strip().removeprefix("torch.")
    key = ALIASES.get(name.lower(), name)
    try:
        return DTYPES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def of(tensor: Any) -> DType:
    """The dtype of a numpy array or torch tensor."""
    if isinstance(tensor, np.ndarray):
        try:
            return _FROM_NUMPY[tensor.dtype.name]
        except KeyError:
            raise TypeError(f"numpy dtype {tensor.dtype} cannot be stored") from None
    name = str(getattr(tensor, "dtype", "")).removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name]
    raise TypeError(f"cannot store an object of type {type(tensor).__name__} with dtype {name or '?'}")


def as_torch(dtype: Any) -> Any:
    """A ``torch.dtype`` from one (returned as is), a name (``"bf16"``, ``"bfloat16"``,
    ``"torch.bfloat16"``) or a :class:`DType`; ``ValueError`` if unknown."""
    import torch  # noqa: PLC0415 - optional dependency

    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype if isinstance(dtype, DType) else lookup(dtype))


def torch_dtype(d: DType) -> Any:
    """The ``torch.dtype`` for ``d`` (needs torch)."""
    import torch  # noqa: PLC0415 - optional dependency

    try:
        return getattr(torch, d.name)
    except AttributeError:
        raise TypeError(f"this torch ({torch.__version__}) has no dtype {d.name}") from None
