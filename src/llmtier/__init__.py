"""llmtier: move LLM state between GPU, DRAM and NVMe at the speed of the
hardware, and show exactly what I/O that movement causes."""
from __future__ import annotations

__version__ = "0.1.0"

import os as _os

if _os.environ.get("LLMTIER_TRACE"):  # set by `llmtier trace -o PATH -- COMMAND`
    from .trace import _auto

    _auto.start_from_env()
