"""How bytes move: one engine interface, several backends.

>>> from llmtier.engine import open_engine, alloc
>>> with open_engine() as eng, eng.open("model.bin") as f:   # doctest: +SKIP
...     buf = alloc(1 << 30)
...     f.pread(buf, 0).result()
...     print(eng.name, "-", eng.reason)

Backends: ``posix`` (buffered, the baseline), ``threads`` (O_DIRECT + thread
pool), ``uring`` (O_DIRECT + io_uring C extension) and ``auto``, which picks
the best one that works here and says why in ``engine.reason``.

This package imports nothing of llmtier but :mod:`llmtier.errors`.
"""
from __future__ import annotations

from typing import Any

from ..errors import EngineUnavailableError
from .base import Engine, File, IOEvent, IORequest, Observer, add_global_observer, remove_global_observer
from .buffers import PAGE, BufferPool, alloc, as_bytes_view, discard_pages, move_pages
from .settings import Settings, current_settings, settings
from .sync import PosixEngine, ThreadsEngine
from .uring import UringEngine, load_extension

BACKENDS: dict[str, type[Engine]] = {"posix": PosixEngine, "threads": ThreadsEngine, "uring": UringEngine}


def available_engines() -> dict[str, str]:
    """Map every backend name to ``""`` if it works here, else the reason it does not."""
    _, uring_reason = load_extension()
    return {"posix": "", "threads": "", "uring": uring_reason}


def open_engine(name: str = "auto", **overrides: Any) -> Engine:
    """Open an engine backend; use it as a context manager.

    ``overrides`` are :class:`Settings` fields (``direct``, ``chunk_size``,
    ``queue_depth``, ``threads``, ``alignment``) applied on top of the scoped
    :func:`settings`.  ``auto`` prefers ``uring`` and falls back to
    ``threads``; ``engine.reason`` says which and why.
    """
    conf = current_settings(**overrides)
    if name == "auto":
        _, why_not = load_extension()
        if not why_not:
            return UringEngine(conf, "auto: io_uring works here (fewest system calls and CPU per byte)")
        return ThreadsEngine(conf, f"auto: fell back to O_DIRECT threads because {why_not}")
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose from auto, {', '.join(BACKENDS)}") from None
    return cls(conf)


__all__ = [
    "PAGE", "BACKENDS", "BufferPool", "Engine", "EngineUnavailableError", "File", "IOEvent", "IORequest",
    "Observer", "Settings", "alloc", "as_bytes_view", "discard_pages", "move_pages", "available_engines", "current_settings", "open_engine",
    "settings", "add_global_observer", "remove_global_observer",
]
