from __future__ import annotations

import os

import pytest

from llmtier.engine import BACKENDS, available_engines, open_engine


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` each worker (and each CLI it starts) gets its share of the cores.

    Without this every worker's torch starts one spinning compute thread per core: 14 workers
    on 16 cores ran ~200 threads that starve the I/O threads the streamed tests wait on, and
    the suite stopped making visible progress.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, share)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(int(share))


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
