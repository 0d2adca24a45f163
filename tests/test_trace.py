"""Recording: the application-level recorder, device counters, the trace CLI."""
from __future__ import annotations

import os

import numpy as np

import llmtier.trace as trace
from llmtier.engine import alloc, open_engine
from llmtier.trace.diskstats import FIELDS, device_of


def test_record_counts_and_bytes_are_exact(tmp_path, backend):
    data = tmp_path / "data.bin"
    out = tmp_path / "run.trace.npz"
    buf = alloc(1 << 20)
    rng = np.random.default_rng(0)
    with open_engine(backend) as eng:
        with eng.open(data, "w") as f:  # before recording: not in the trace
            f.pwrite(alloc(100 << 20), 0).result()
        with trace.record(out, device_path=tmp_path):
            with eng.open(data, "r") as f:
                for i in range(100):
                    f.pread(buf, i << 20, tag="weights").result()
                small = alloc(4096)
                for off in rng.integers(0, (100 << 20) // 4096, 1000) * 4096:
                    f.pread(small, int(off), tag="kv").result()
            with eng.open(data, "r+") as f:
                for i in range(50):
                    f.pwrite(buf[:65536], i * 65536, tag="checkpoint").result()
    t = trace.load(out)
    app = t.app
    tags = np.array(t.tags)[app["tag"]]
    reads, writes = app["op"] == 0, app["op"] == 1
    # The engine may split a request into pieces (chunk_size); bytes are exact either way.
    assert app["size"][reads & (tags == "weights")].sum() == 100 << 20
    assert app["size"][reads & (tags == "kv")].sum() == 1000 * 4096
    assert ((tags == "kv") & reads).sum() == 1000
    assert app["size"][writes].sum() == 50 * 65536 and writes.sum() == 50
    assert (app["result"] == app["size"]).all()
    assert (app["complete_ns"] >= app["submit_ns"]).all() and (app["queue_depth"] >= 1).all()
    assert t.files == [str(data)] and t.backends == [backend]
    # block capture: recorded (root, tracefs) or said why not
    assert t.has_block or any(m.startswith("block layer: ") for m in t.missing)


def test_nothing_recorded_outside_the_block(tmp_path):
    with open_engine("threads") as eng, eng.open(tmp_path / "f", "w") as f:
        with trace.record(tmp_path / "t.npz") as rec:
            assert len(rec) == 0  # nothing happens inside the block
        f.pwrite(alloc(4096), 0).result()
        assert len(rec) == 0
    assert len(trace.load(tmp_path / "t.npz")) == 0


def test_device_counters_sampled(tmp_path):
    name, why = device_of(tmp_path)
    with trace.record(tmp_path / "t.npz", device_path=tmp_path, interval=0.01):
        with open_engine() as eng, eng.open(tmp_path / "f", "w") as f:
            f.pwrite(alloc(8 << 20), 0).result()
            f.sync()
    t = trace.load(tmp_path / "t.npz")
    if not name:  # e.g. tmp on tmpfs or overlay: the trace says why
        assert any("device counters" in m for m in t.meta["missing"]) and why
        return
    ds = t.extra["diskstats"]
    assert ds.shape[1] == 1 + len(FIELDS) and len(ds) >= 2
    assert (np.diff(ds[:, 0]) >= 0).all()
    sectors = ds[-1, 1 + FIELDS.index("write_sectors")] - ds[0, 1 + FIELDS.index("write_sectors")]
    assert sectors * 512 >= 8 << 20  # our write reached the device (others may add more)


def test_trace_cli_runs_a_program(tmp_path):
    import subprocess
    import sys

    prog = tmp_path / "prog.py"
    prog.write_text(
        "from llmtier.engine import open_engine, alloc\n"
        f"with open_engine() as e, e.open({str(tmp_path / 'd.bin')!r}, 'w') as f:\n"
        "    f.pwrite(alloc(1 << 20), 0, tag='checkpoint').result()\n"
        "    f.pread(alloc(1 << 20), 0, tag='weights').result()\n")
    out = tmp_path / "run.npz"
    cli = [sys.executable, "-m", "llmtier.cli", "trace", "-o", str(out), "--", sys.executable, str(prog)]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "block requests on" in r.stderr or "not recorded: block layer" in r.stderr
    t = trace.load(out)
    app = t.app
    tags = np.array(t.tags)[app["tag"]]
    assert app["size"][tags == "checkpoint"].sum() == 1 << 20 and app["size"][tags == "weights"].sum() == 1 << 20
    assert not [p for p in os.listdir(tmp_path) if ".app-" in p or p.endswith(".claim")]  # no leftovers


def test_trace_cli_merges_every_process(tmp_path):
    import subprocess
    import sys

    child = tmp_path / "child.py"
    child.write_text(
        "import sys\nfrom llmtier.engine import open_engine, alloc\n"
        "with open_engine('threads') as e, e.open(sys.argv[1], 'w') as f:\n"
        "    f.pwrite(alloc(1 << 20), 0, tag=sys.argv[2]).result()\n")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys\nimport llmtier\n"
        f"subprocess.check_call([sys.executable, {str(child)!r}, {str(tmp_path / 'a.bin')!r}, 'kv'])\n"
        f"subprocess.check_call([sys.executable, {str(child)!r}, {str(tmp_path / 'b.bin')!r}, 'checkpoint'])\n")
    out = tmp_path / "run.npz"
    r = subprocess.run([sys.executable, "-m", "llmtier.cli", "trace", "--no-block", "-o", str(out), "--",
                        sys.executable, str(parent)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t = trace.load(out)
    tags = np.array(t.tags)[t.app["tag"]]
    assert t.app["size"][tags == "kv"].sum() == 1 << 20 and t.app["size"][tags == "checkpoint"].sum() == 1 << 20
    assert sorted(t.files) == [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    assert len(t.meta["children"]) == 3  # the parent (no operations) and both children
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin", "child.py", "parent.py", "run.npz"]
