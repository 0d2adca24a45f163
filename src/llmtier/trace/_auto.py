"""Recording switched on by the environment (``llmtier trace -o PATH -- COMMAND``).

The command runs with ``LLMTIER_TRACE=PATH``; every process that imports
llmtier records from import to exit.  The first one to claim ``PATH`` writes
it; any other process writes ``PATH`` with ``.<pid>`` before the extension.
``LLMTIER_TRACE_SOURCES=app`` (set by ``llmtier trace``, which captures the
block layer and device counters itself) limits the processes to their
application records.
"""
from __future__ import annotations

import atexit
import contextlib
import os

_active = None


def start_from_env() -> None:
    global _active
    path = os.environ.get("LLMTIER_TRACE", "")
    if not path or _active is not None:
        return
    try:
        fd = os.open(path + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
    except FileExistsError:
        root, ext = os.path.splitext(path)
        path = f"{root}.{os.getpid()}{ext}"
    except OSError:
        return  # cannot write there; the CLI reports the missing trace
    from . import record  # noqa: PLC0415 - only when tracing is switched on

    app_only = os.environ.get("LLMTIER_TRACE_SOURCES", "") == "app"
    _active = record(path, device_path=os.environ.get("LLMTIER_TRACE_DEVICE") or None, block=not app_only,
                     diskstats=not app_only, extents=True)
    _active.__enter__()
    atexit.register(_finish)


def _finish() -> None:
    global _active
    if _active is not None:
        with contextlib.suppress(Exception):
            _active.__exit__(None, None, None)
        _active = None
