"""Conformance suite: every engine backend must pass every test here unchanged."""
from __future__ import annotations

import concurrent.futures
import errno
import os
import threading

import numpy as np
import pytest

from llmtier.engine import alloc, open_engine
from llmtier.errors import ClosedError, IOFailure, NotFoundError, PermissionDeniedError, ShortReadError

MiB = 1 << 20
RNG = np.random.default_rng(1234)


def random_bytes(n: int) -> np.ndarray:
    return RNG.integers(0, 256, n, dtype=np.uint8)


def write_file(path, data: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(data.tobytes())


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, MiB + 1, 64 * MiB])
@pytest.mark.parametrize("aligned_buf", [True, False], ids=["aligned", "unaligned"])
def test_round_trip(engine, tmp_path, size, aligned_buf):
    data = random_bytes(size)
    src = alloc(size) if aligned_buf else np.empty(size + 1, np.uint8)[1:]
    src[:] = data
    path = tmp_path / "f.bin"
    with engine.open(path, "w") as f:
        assert f.pwrite(src, 0).result() == size
    assert os.path.getsize(path) == size  # nothing padded
    with engine.open(path, "r") as f:
        out = alloc(size) if aligned_buf else np.zeros(size + 3, np.uint8)[3:]
        assert f.pread(out, 0).result() == size
    assert np.array_equal(out, data)


@pytest.mark.parametrize("offset", [0, 1, 511, 4095, 4097, 12345])
@pytest.mark.parametrize("size", [1, 4095, 4096, 8193, 300_000])
def test_unaligned_reads(engine, tmp_path, offset, size):
    data = random_bytes(400_000)
    write_file(tmp_path / "f", data)
    with engine.open(tmp_path / "f") as f:
        out = np.zeros(size, np.uint8)
        assert f.pread(out, offset).result() == size
    assert np.array_equal(out, data[offset : offset + size])


def test_unaligned_write_into_existing_file(engine, tmp_path):
    data = random_bytes(100_000)
    write_file(tmp_path / "f", data)
    patch = random_bytes(5000)
    with engine.open(tmp_path / "f", "r+") as f:
        assert f.pwrite(patch, 777).result() == 5000
        assert f.pwrite(patch[:4096].copy(), 8192).result() == 4096
    expect = data.copy()
    expect[777:5777] = patch
    expect[8192:12288] = patch[:4096]
    assert np.array_equal(np.fromfile(tmp_path / "f", np.uint8), expect)


def test_torch_tensors_any_dtype(engine, tmp_path):
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        t = (torch.randn(123, 77) * 10).to(dtype)
        with engine.open(tmp_path / "t", "w") as f:
            f.pwrite(t, 0).result()
        back = torch.empty_like(t)
        with engine.open(tmp_path / "t") as f:
            f.pread(back, 0).result()
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_hundreds_of_concurrent_requests(engine, tmp_path):
    data = random_bytes(8 * MiB)
    write_file(tmp_path / "f", data)
    offsets = RNG.integers(0, 8 * MiB - 8192, 400)
    sizes = RNG.integers(1, 8192, 400)
    with engine.open(tmp_path / "f") as f:
        bufs = [np.zeros(int(n), np.uint8) for n in sizes]
        futures = [f.pread(b, int(o)) for b, o in zip(bufs, offsets)]
        assert [fu.result() for fu in futures] == [int(n) for n in sizes]
        batch = [alloc(4096) for _ in range(300)]
        aligned = [int(o) // 4096 * 4096 for o in offsets[:300]]
        assert f.pread_many(batch, aligned).result() == [4096] * 300
    for b, o, n in zip(bufs, offsets, sizes):
        assert np.array_equal(b, data[o : o + n])
    for b, o in zip(batch, aligned):
        assert np.array_equal(b, data[o : o + 4096])


def test_engine_submit_spans_files(engine, tmp_path):
    a, b = random_bytes(10_000), random_bytes(20_000)
    write_file(tmp_path / "a", a)
    with engine.open(tmp_path / "a") as fa, engine.open(tmp_path / "b", "w") as fb:
        out = np.zeros(10_000, np.uint8)
        got = engine.submit([(fa, "read", out, 0, "a"), (fb, "write", b, 0, "b")]).result()
        assert got == [10_000, 20_000]
    assert np.array_equal(out, a)
    assert np.array_equal(np.fromfile(tmp_path / "b", np.uint8), b)


def test_submission_from_several_threads(engine, tmp_path):
    n_threads, per_thread, block = 8, 40, 12_288
    with engine.open(tmp_path / "f", "w") as f:
        f.truncate(n_threads * per_thread * block)
        errors = []

        def worker(t: int) -> None:
            try:
                for i in range(per_thread):
                    off = (t * per_thread + i) * block
                    payload = np.full(block, (t * 31 + i) % 256, np.uint8)
                    f.pwrite(payload, off).result()
                    back = np.zeros(block, np.uint8)
                    f.pread(back, off).result()
                    assert np.array_equal(back, payload)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_read_past_eof_is_reported_not_zero_filled(engine, tmp_path):
    write_file(tmp_path / "f", random_bytes(5000))
    with engine.open(tmp_path / "f") as f:
        buf = np.full(8192, 7, np.uint8)
        with pytest.raises(ShortReadError) as info:
            f.pread(buf, 0).result()
        assert info.value.got == 5000 and info.value.size == 8192 and info.value.offset == 0
        assert str(tmp_path / "f") in str(info.value)
        # exact=False reports the short count. What lies past it is the kernel's
        # business on a direct read into an aligned buffer (ext4 zeroes it), so
        # only the bytes that arrived are checked there; through the bounce
        # buffer (unaligned memory) llmtier copies out exactly the bytes that
        # arrived and the rest is left as it was.
        data = (tmp_path / "f").read_bytes()
        aligned = alloc(8192)
        aligned[:] = 7
        assert f.pread(aligned, 0, exact=False).result() == 5000
        assert aligned[:5000].tobytes() == data
        backing = alloc(8192 + 4096)
        unaligned = backing[16 : 16 + 8192]
        unaligned[:] = 7
        assert f.pread(unaligned, 0, exact=False).result() == 5000
        assert unaligned[:5000].tobytes() == data
        assert (unaligned[5000:] == 7).all()
        assert f.pread(alloc(4096), 1 << 20, exact=False).result() == 0
        with pytest.raises(ShortReadError):
            f.pread_many([alloc(4096), alloc(4096)], [0, 4096]).result()


def test_missing_file(engine, tmp_path):
    with pytest.raises(NotFoundError) as info:
        engine.open(tmp_path / "nope")
    assert info.value.errno == errno.ENOENT and "nope" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_write_to_read_only_file(engine, tmp_path):
    write_file(tmp_path / "f", random_bytes(4096))
    with engine.open(tmp_path / "f", "r") as f:
        with pytest.raises(PermissionDeniedError):
            f.pwrite(alloc(4096), 0).result()


def test_errno_path_offset_size_on_failure(engine):
    # /dev/full fails every write with ENOSPC: the error carries the request.
    with engine.open("/dev/full", "r+") as f:
        with pytest.raises(IOFailure) as info:
            f.pwrite(alloc(8192), 0).result()
    err = info.value
    assert err.errno == errno.ENOSPC
    assert (err.path, err.offset, err.size) == ("/dev/full", 0, 8192)


def test_closed_file_and_engine(backend, tmp_path):
    write_file(tmp_path / "f", random_bytes(4096))
    eng = open_engine(backend)
    f = eng.open(tmp_path / "f")
    f.close()
    f.close()  # idempotent
    with pytest.raises(ClosedError):
        f.pread(alloc(4096), 0)
    eng.close()
    eng.close()
    with pytest.raises(ClosedError):
        eng.open(tmp_path / "f")


def test_close_with_requests_in_flight(backend, tmp_path):
    data = random_bytes(32 * MiB)
    write_file(tmp_path / "f", data)
    eng = open_engine(backend, chunk_size=256 << 10, queue_depth=4, threads=2)
    f = eng.open(tmp_path / "f")
    big = alloc(32 * MiB)
    futures = [f.pread(big, 0)] + [f.pread(alloc(4096), i * 4096) for i in range(100)]
    eng.close()  # must wait for the in-flight work, not hang or crash
    assert all(fu.done() for fu in futures)
    assert futures[0].result() == 32 * MiB
    assert np.array_equal(big, data)
    assert f.closed


def test_file_close_waits_for_its_requests(engine, tmp_path):
    data = random_bytes(16 * MiB)
    write_file(tmp_path / "f", data)
    f = engine.open(tmp_path / "f")
    buf = alloc(16 * MiB)
    fut = f.pread(buf, 0)
    f.close()
    assert fut.done() and fut.result() == 16 * MiB


def test_observer_sees_every_byte(engine, tmp_path):
    events = []
    engine.add_observer(events.extend)
    data = random_bytes(3 * MiB + 100)
    with engine.open(tmp_path / "f", "w") as f:
        f.pwrite(data, 0, tag="weights").result()
    with engine.open(tmp_path / "f") as f:
        f.pread(np.zeros(data.nbytes, np.uint8), 0, tag="weights").result()
    engine.remove_observer(events.extend)
    for op in ("read", "write"):
        evs = [e for e in events if e.op == op]
        assert evs and all(e.tag == "weights" and e.backend == engine.name for e in evs)
        assert all(e.complete_ns >= e.submit_ns > 0 and e.queue_depth >= 1 and e.result >= 0 for e in evs)
    assert sum(e.result for e in events if e.op == "write") == data.nbytes
    # reads may widen the last partial block to the alignment
    assert data.nbytes <= sum(e.result for e in events if e.op == "read") < data.nbytes + 4096


def test_finished_requests_leave_no_reference_cycles(engine, tmp_path):
    """A finished request's bounce buffers and the caller's buffer are freed by reference counting, not at the
    next cyclic GC (a 1 GiB unaligned read would otherwise keep a 1 GiB bounce buffer alive until then)."""
    import gc

    from llmtier.engine.batch import Batch
    from llmtier.engine.plan import Op, Plan

    path = tmp_path / "f"
    write_file(path, random_bytes(MiB * 2))
    f = engine.open(str(path))
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for k in range(4):  # unaligned (bounced) and aligned (fast path) requests
            f.pread(np.empty(MiB + 7, dtype=np.uint8), 4096 * k + 13).result()
            f.pread(alloc(MiB), 4096 * k).result()
        f.pread_many([alloc(4096), np.empty(100, dtype=np.uint8)], [0, 5]).result()
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Op, Plan, Batch))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        f.close()
    assert left == []


def test_waiting_caller_never_runs_younger_work(engine, tmp_path):
    """``result()`` may lend the waiting thread to the engine, but only for work submitted up to the awaited
    batch: a pipeline waiting for read i must not run the read-ahead of i+1 .. i+k inline (it would then wait
    for all of them, and compute would no longer overlap I/O)."""
    path = tmp_path / "f"
    write_file(path, random_bytes(8 * MiB))
    me = threading.get_ident()
    ran: list[tuple[int, str]] = []
    engine.add_observer(lambda events: ran.extend((threading.get_ident(), e.tag) for e in events))
    with engine.open(str(path)) as f:
        for _ in range(5):
            first = f.pread(alloc(MiB), 0, tag="awaited")
            later = [f.pread(alloc(MiB), k * MiB, tag="younger") for k in range(1, 8)]
            first.result()
            for fut in later:
                concurrent.futures.wait([fut])
    assert {t for t, tag in ran if tag == "younger"} - {me} and all(t != me for t, tag in ran if tag == "younger")
