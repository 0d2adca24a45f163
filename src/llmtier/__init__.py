"""llmtier: move LLM state between GPU, DRAM and NVMe at the speed of the
hardware, and show exactly what I/O that movement causes."""
from __future__ import annotations

__version__ = "0.1.0"
