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
from llmtier.bench.io import Cell, Study, StudyConfig, run_io_study
from llmtier.engine import available_engines

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
    pages = [c for c in cells if c.engine == "uring-pages"]
    if available_engines()["uring"] == "":  # uring works: its pages-API row, random reads at depth 32 only
        assert [(c.op, c.size_bytes, c.queue_depth) for c in pages] == [("randread-qd32", 4096, 32)]
    else:
        assert not pages


def test_records_table_plot(small_study, tmp_path):
    cells, notes = small_study
    io_report.write_json(cells, tmp_path / "r.json")
    records = json.loads((tmp_path / "r.json").read_text())
    assert records and all(FIELDS <= set(r) for r in records)
    table = io_report.format_table(cells, notes)
    assert "randread-qd32" in table and "fio" in table
    if any(c.engine == "uring-pages" for c in cells):
        assert "uring-pages" in table
        if fio_available()[0]:
            assert any(v.startswith("randread 4 KiB qd32: best uring row = ") for v in io_report.verdicts(cells))
    pytest.importorskip("matplotlib")
    io_report.plot(cells, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_and_engines():
    out = subprocess.run([sys.executable, "-m", "llmtier.cli", "engines"], capture_output=True, text=True, check=True)
    assert "auto  ->" in out.stdout
    out = subprocess.run([sys.executable, "-m", "llmtier.cli", "bench", "io", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--quick" in out.stdout and "--json" in out.stdout and "randread" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "llmtier.cli", "bench", "io", "--ops", "randwrite"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown op(s) randwrite" in bad.stderr


def test_ops_randread_alone(tmp_path):
    s = Study(StudyConfig(str(tmp_path), ops=("randread",), random_ios=100))
    s.engines = {"threads": None, "uring": None, "deepnvme": None}  # cells() only looks at the names
    s.file_size = 1 << 20
    cells = list(s.cells())
    assert {wl.op for wl, _, _ in cells} == {"randread"}
    by_qd = {qd: [name for wl, name, _ in cells if wl.queue_depth == qd] for qd in (1, 32)}
    assert by_qd == {1: ["threads", "uring"], 32: ["threads", "uring", "uring-pages"]}
    s.cfg = StudyConfig(str(tmp_path), ops=("read",), sizes=(1 << 20,))
    assert {wl.op for wl, _, _ in s.cells()} == {"read"}


def test_random_verdict_names_the_better_uring_row():
    def cell(engine, iops, cpu):
        return Cell(engine, "randread-qd32", 4096, 4096, 32, runs=5, iops=iops, cpu_us_per_io=cpu, fio_iops=60e3)

    cells = [cell("threads", 27e3, 48.0), cell("uring", 48e3, 10.0), cell("uring-pages", 57e3, 6.0)]
    (line,) = io_report.random_verdict(cells)
    assert line.startswith("randread 4 KiB qd32: best uring row = uring-pages 57.0K IOPS = 0.95x fio (60.0K)")
    assert "uring 48.0K = 0.80x fio" in line and "threads 48.0 us" in line
    (line,) = io_report.random_verdict([cell("uring", 59e3, 5.0), cell("uring-pages", 57e3, 6.0)])
    assert "best uring row = uring 59.0K" in line and "uring-pages 57.0K" in line
    assert io_report.random_verdict([cell("threads", 1.0, 1.0)]) == []
