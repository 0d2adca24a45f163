"""Smoke tests of `llmtier bench io`: it runs, and its records are complete.

No timing assertions: speed is shown by the benchmark itself (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmtier.bench import io_report
from llmtier.bench.fio import fio_available
from llmtier.bench.io import StudyConfig, run_io_study

FIELDS = {"engine", "op", "size_bytes", "block_size", "queue_depth", "gib_per_s", "iops", "cpu_s_per_gib", "runs",
          "fio_gib_per_s"}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    cfg = StudyConfig(str(d), engines=("posix", "threads", "uring", "deepnvme"), sizes=(4096, 1 << 20),
                      rounds=2, volume=4 << 20, random_ios=300)
    return run_io_study(cfg, progress=False)


def test_every_cell_measured(small_study):
    cells, notes = small_study
    ops = {c.op for c in cells}
    assert {"read", "write", "write-fresh", "randread-qd1", "randread-qd32"} <= ops
    for c in cells:
        assert c.runs == 2 and c.gib_per_s > 0 and c.iops > 0 and c.cpu_s_per_gib >= 0
        assert c.block_size > 0 and c.queue_depth >= 1
    fio_ok, _ = fio_available()
    assert all((c.fio_gib_per_s is not None) == fio_ok for c in cells if c.engine != "deepnvme")
    assert any(n.startswith("posix:") for n in notes)  # says whether the cache was dropped


def test_records_table_plot(small_study, tmp_path):
    cells, notes = small_study
    io_report.write_json(cells, tmp_path / "r.json")
    records = json.loads((tmp_path / "r.json").read_text())
    assert records and all(FIELDS <= set(r) for r in records)
    table = io_report.format_table(cells, notes)
    assert "randread-qd32" in table and "fio" in table
    pytest.importorskip("matplotlib")
    io_report.plot(cells, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_and_engines():
    out = subprocess.run([sys.executable, "-m", "llmtier.cli", "engines"], capture_output=True, text=True, check=True)
    assert "auto  ->" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llmtier.cli", "bench", "io", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--quick" in out.stdout and "--json" in out.stdout
