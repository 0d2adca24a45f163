"""``llmtier bench plan``: the planner's predictions against measurements (filled below)."""
from __future__ import annotations

from typing import Any


def add_cli(bench: Any) -> None:
    """``llmtier bench plan``."""
