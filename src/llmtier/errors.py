"""Typed errors for everything a user (or the machine) can cause.

Every I/O error carries the path, offset, size and errno of the request that
failed, and says in words what was expected and what happened.
"""
from __future__ import annotations

import errno as _errno
import os


class LLMTierError(Exception):
    """Base class of every error llmtier raises on purpose."""


class EngineUnavailableError(LLMTierError, RuntimeError):
    """A requested engine backend cannot run here; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"engine {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


class ClosedError(LLMTierError, ValueError):
    """An operation on an engine or file that was already closed."""


class IOFailure(LLMTierError, OSError):
    """A read or write failed. Carries path, offset, size and errno.

    It is an ``OSError`` so ``except OSError`` keeps working; ``errno`` and
    ``strerror`` are set as usual.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        size: int | None = None,
        errno: int | None = None,
    ) -> None:
        detail = []
        if path is not None:
            detail.append(f"path={path}")
        if offset is not None:
            detail.append(f"offset={offset}")
        if size is not None:
            detail.append(f"size={size}")
        if errno is not None:
            detail.append(f"errno={_errno.errorcode.get(errno, errno)} ({os.strerror(errno)})")
        text = message + (f" [{', '.join(detail)}]" if detail else "")
        if errno is not None:
            super().__init__(errno, text)
        else:
            super().__init__(text)
        self.path = path
        self.offset = offset
        self.size = size
        self.message = text

    def __str__(self) -> str:
        return self.message


class NotFoundError(IOFailure, FileNotFoundError):
    """The file does not exist."""


class PermissionDeniedError(IOFailure, PermissionError):
    """The file cannot be opened or written with the requested mode."""


class ShortReadError(IOFailure):
    """A read ended before the buffer was full: the file is shorter than asked.

    ``got`` is how many bytes were read; the rest of the buffer is untouched
    (never silently zero-filled).
    """

    def __init__(self, *, path: str, offset: int, size: int, got: int) -> None:
        super().__init__(
            f"short read: expected {size} bytes, got {got} (end of file)",
            path=path,
            offset=offset,
            size=size,
        )
        self.got = got


class DiskFullError(IOFailure):
    """A write failed because the file system is full (``ENOSPC``) or over quota."""


class FormatError(LLMTierError, ValueError):
    """A file is not a valid store (or safetensors file): truncated, damaged or hostile.

    ``path`` is the file and ``field`` the part of it that failed the check
    (for example ``"magic"``, ``"index_length"`` or ``"tensors[3].shape"``).
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        where = f"{path}: " if path else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")
        self.path = path
        self.field = field


class ChecksumError(FormatError):
    """A tensor's bytes do not match the CRC-32C recorded when it was written."""


class TensorNotFoundError(LLMTierError, KeyError):
    """A tensor name that the store does not contain."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def io_failure(message: str, *, path: str, offset: int | None, size: int | None, errno: int) -> IOFailure:
    """Build the most specific :class:`IOFailure` subclass for ``errno``."""
    cls: type[IOFailure] = IOFailure
    if errno == _errno.ENOENT:
        cls = NotFoundError
    elif errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cls = PermissionDeniedError
    elif errno in (_errno.ENOSPC, _errno.EDQUOT):
        cls = DiskFullError
    return cls(message, path=path, offset=offset, size=size, errno=errno)


class CheckpointError(LLMTierError):
    """A checkpoint cannot be saved or loaded: unsupported state, no complete checkpoint, a damaged one asked for."""


class BudgetError(LLMTierError, ValueError):
    """A memory budget cannot hold what a runtime needs at the least (weights, KV tier, optimizer)."""
