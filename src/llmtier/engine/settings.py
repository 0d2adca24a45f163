"""Engine settings: defaults, a scoped override, and per-engine overrides.

Precedence, lowest to highest: the defaults below, the innermost
``with llmtier.engine.settings(...)`` block, then keyword arguments given to
``open_engine``.  The scope is a ``contextvars.ContextVar``, so it follows
threads and asyncio tasks the way one expects and is never a module global
that one caller can change under another.

The defaults (1 MiB pieces, depth 32, 16 threads) are the usual settings
of fio and DeepNVMe studies; with them ``llmtier bench io`` reached 2.0-2.6
GiB/s reads and 4.2-4.6 GiB/s writes on the development machine
(docs/BENCHMARKS.md).  A sweep over other values has not been done yet.
"""
from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """How an engine moves bytes.

    Attributes:
        direct: open files with ``O_DIRECT`` (bypass the page cache). Ignored
            by the ``posix`` backend, which is buffered by definition.
        chunk_size: large requests are split into pieces of at most this many
            bytes (a multiple of ``alignment``).
        queue_depth: requests in flight at once (``uring``: SQEs per ring).
        threads: worker threads of the ``threads`` backend.
        alignment: the ``O_DIRECT`` alignment of offsets, sizes and buffers.
    """

    direct: bool = True
    chunk_size: int = 1 * MiB
    queue_depth: int = 32
    threads: int = 16
    alignment: int = 4096

    def __post_init__(self) -> None:
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {self.alignment}")
        if self.chunk_size <= 0 or self.chunk_size % self.alignment:
            raise ValueError(f"chunk_size must be a positive multiple of alignment ({self.alignment}), got {self.chunk_size}")
        if not 1 <= self.queue_depth <= 4096:
            raise ValueError(f"queue_depth must be in 1..4096, got {self.queue_depth}")
        if not 1 <= self.threads <= 1024:
            raise ValueError(f"threads must be in 1..1024, got {self.threads}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown engine setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


_SCOPED: contextvars.ContextVar[Settings] = contextvars.ContextVar("llmtier_engine_settings", default=Settings())


def current_settings(**overrides: Any) -> Settings:
    """The settings in force here, with ``overrides`` applied on top."""
    return _SCOPED.get().replace(**overrides) if overrides else _SCOPED.get()


@contextmanager
def settings(**overrides: Any) -> Iterator[Settings]:
    """Override engine settings for engines opened inside the ``with`` block.

    >>> with settings(chunk_size=8 << 20, queue_depth=64):
    ...     eng = open_engine("threads")  # doctest: +SKIP
    """
    token = _SCOPED.set(current_settings(**overrides))
    try:
        yield _SCOPED.get()
    finally:
        _SCOPED.reset(token)
