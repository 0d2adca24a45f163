"""The engine's GPU side: the capability check, pinned buffers and the SSD <-> device pipe
(on its CPU stand-in here; the CUDA tests run where a GPU is)."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmtier.engine import open_engine  # noqa: E402
from llmtier.engine.cuda import DeviceOps, DevicePipe, alloc_pinned, cuda_reason  # noqa: E402
from llmtier.errors import EngineUnavailableError, ShortReadError  # noqa: E402

NO_CUDA = cuda_reason()
cuda = pytest.mark.skipif(bool(NO_CUDA), reason=f"needs a CUDA GPU: {NO_CUDA}")
DEVICES = ["cpu"] if NO_CUDA else ["cpu", "cuda"]


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, 3 * 65536 + 777, dtype=np.uint8)
    path = tmp_path / "data.bin"
    data.tofile(path)
    return str(path), data


def test_the_capability_check_says_why():
    assert isinstance(NO_CUDA, str)
    if NO_CUDA:
        with pytest.raises(EngineUnavailableError, match="needs a CUDA GPU"):
            alloc_pinned(4096)
        with pytest.raises(EngineUnavailableError):
            DeviceOps("cuda")
    with pytest.raises(EngineUnavailableError, match="only 'cuda'"):
        DeviceOps("meta")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slot", [4096, 16384, 1 << 20])
def test_pipe_reads_many_tensors_exactly(data_file, device, slot):
    path, data = data_file
    # small tensors share a slot, large ones span several; offsets not aligned
    spans = [(0, 5000), (5000, 1), (12345, 70000), (100, 4096), (len(data) - 999, 999)]
    with open_engine("auto") as eng, eng.open(path) as f, DevicePipe(eng, device, slot_bytes=slot, slots=2) as pipe:
        dsts = [torch.empty(n, dtype=torch.uint8, device=device) for _, n in spans]
        ev = pipe.read_many(f, [o for o, _ in spans], dsts)
        pipe.ops.wait(ev)
        for (o, n), d in zip(spans, dsts):
            assert np.array_equal(d.cpu().numpy(), data[o:o + n])


@pytest.mark.parametrize("device", DEVICES)
def test_pipe_writes_then_reads_back(tmp_path, device):
    src = [torch.randint(0, 256, (n,), dtype=torch.uint8, device=device) for n in (8192, 3 * 4096, 20480)]
    offsets = [0, 8192, 8192 + 3 * 4096]
    path = str(tmp_path / "out.bin")
    with open_engine("auto") as eng, DevicePipe(eng, device, slot_bytes=8192, slots=3) as pipe:
        with eng.open(path, "w") as f:
            assert pipe.write_many(f, offsets, src) == sum(t.numel() for t in src)
            f.sync()
        back = np.fromfile(path, dtype=np.uint8)
        assert np.array_equal(back, torch.cat(src).cpu().numpy())


def test_a_read_past_the_end_is_an_error_and_the_pipe_goes_on(data_file):
    path, data = data_file
    with open_engine("auto") as eng, eng.open(path) as f, DevicePipe(eng, "cpu", slot_bytes=4096, slots=2) as pipe:
        with pytest.raises(ShortReadError):
            pipe.read(f, len(data) - 10, torch.empty(5000, dtype=torch.uint8))
        d = torch.empty(3000, dtype=torch.uint8)
        pipe.read(f, 7, d)
        assert np.array_equal(d.numpy(), data[7:3007])


def test_pipe_refuses_bad_geometry():
    with open_engine("auto") as eng:
        for kw in ({"slot_bytes": 1000}, {"slots": 1}, {"slot_bytes": 0}):
            with pytest.raises(ValueError):
                DevicePipe(eng, "cpu", **kw)


def test_device_study_runs_on_the_stand_in(tmp_path):
    from llmtier.bench.io_cuda import format_table, run_device_study

    cells, notes = run_device_study(str(tmp_path), device="cpu", sizes=(64 << 10, 1 << 20), rounds=1,
                                    volume=2 << 20, slot_bytes=1 << 20, paths=("llmtier", "host", "naive", "kvikio"),
                                    progress=False)
    got = {(c.path, c.op, c.size_bytes) for c in cells}
    assert got == {(p, op, s) for p in ("llmtier", "host", "naive") for op in ("read", "write")
                   for s in (64 << 10, 1 << 20)}
    assert all(c.runs == 1 and c.gib_per_s > 0 for c in cells)
    assert any("kvikio: not run" in n for n in notes)
    table = format_table(cells, notes)
    assert "llmtier/host" in table and "| read | 1 MiB |" in table
    assert os.path.getsize(tmp_path / "llmtier-io-cuda.bin") >= 2 << 20


@cuda
def test_pinned_buffers_are_registered_and_copy_asynchronously():
    buf = alloc_pinned(1 << 20)
    assert buf.ctypes.data % 4096 == 0
    host = torch.from_numpy(buf)
    assert host.is_pinned()  # CUDA sees the engine's own memory as page-locked: no copy was made
    buf[:] = 7
    dev = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    assert int(dev.sum()) == 7 << 20
    del host, buf  # unregistered with the mapping: no error, nothing leaks into the next test
