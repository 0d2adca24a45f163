from __future__ import annotations

import os

import pytest

from llmtier.engine import BACKENDS, available_engines, open_engine


def _require_uring() -> bool:
    """In CI (or when asked) a missing io_uring backend is a failure, not a skip."""
    return os.environ.get("CI") == "true" or os.environ.get("LLMTIER_REQUIRE_URING") == "1"


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    why_not = available_engines()[name]
    if why_not:
        if _require_uring():
            pytest.fail(f"backend {name} unavailable in CI: {why_not}")
        pytest.skip(f"backend {name} unavailable here: {why_not}")
    return name


@pytest.fixture
def engine(backend: str):
    # Small chunks and a modest queue so splitting and refilling are exercised
    # even by the small files of the tests.
    with open_engine(backend, chunk_size=64 << 10, queue_depth=8, threads=4) as eng:
        yield eng
