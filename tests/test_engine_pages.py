"""The pages API (``File.pread_pages``/``pwrite_pages``) on every backend.

On ``uring`` aligned calls take the one-call ``Ring.gather`` path; every other
case (and every other backend) goes page by page.  Both must agree exactly.
"""
from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

from llmtier.engine import alloc, open_engine
from llmtier.errors import IOFailure, PermissionDeniedError, ShortReadError

KiB, MiB = 1 << 10, 1 << 20
FILE_SIZE = 4 * MiB
RNG = np.random.default_rng(4321)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return RNG.integers(0, 256, FILE_SIZE, dtype=np.uint8)


@pytest.fixture
def path(tmp_path, data):
    p = tmp_path / "pages.bin"
    p.write_bytes(data.tobytes())
    return p


def gathered(data: np.ndarray, offsets, page: int) -> np.ndarray:
    return np.concatenate([data[o : o + page] for o in offsets]) if len(offsets) else np.empty(0, np.uint8)


class RingSpy:
    """Stands in for a UringEngine's ring and counts the gather() calls."""

    def __init__(self, ring) -> None:
        self.ring = ring
        self.gathers = 0

    def gather(self, *args, **kw):
        self.gathers += 1
        return self.ring.gather(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.ring, name)


def spy(engine) -> RingSpy | None:
    if engine.name != "uring":
        return None
    engine._ring = RingSpy(engine._ring)
    return engine._ring


@pytest.mark.parametrize("page", [4096, 16 * KiB, 192 * KiB, 1000])  # 192 KiB > chunk_size; 1000: unaligned
def test_random_gather_matches_reference(engine, path, data, page):
    ring = spy(engine)
    n = 64
    aligned = page % 4096 == 0
    slots = (FILE_SIZE - page) // (page if aligned else 1)
    offsets = RNG.integers(0, slots, n) * (page if aligned else 1)
    buf = alloc(n * page)
    with engine.open(path) as f:
        assert f.pread_pages(buf, offsets, page, tag="kv").result() == n * page
    assert np.array_equal(buf, gathered(data, offsets, page))
    if ring is not None:
        assert ring.gathers == (1 if aligned else 0)  # one call for all pages, or the per-page fallback


def test_duplicate_unsorted_offsets_and_sequence_input(engine, path, data):
    offsets = [12 * 4096, 0, 12 * 4096, 3 * 4096, 0, 999 * 4096]
    buf = alloc(len(offsets) * 4096)
    with engine.open(path) as f:
        assert f.pread_pages(buf, offsets, 4096).result() == len(offsets) * 4096
    assert np.array_equal(buf, gathered(data, offsets, 4096))


def test_unaligned_buffer_and_unaligned_offsets_fall_back(engine, path, data):
    ring = spy(engine)
    n = 10
    offsets = np.arange(n) * 8192 + 4096
    raw = alloc(n * 4096 + 1)[1:]  # misaligned address: per-page requests with bounce buffers
    odd = np.arange(n) * 5000 + 7  # unaligned offsets with an aligned page size
    buf2 = alloc(n * 4096)
    with engine.open(path) as f:
        assert f.pread_pages(raw, offsets, 4096).result() == n * 4096
        assert f.pread_pages(buf2, odd, 4096).result() == n * 4096
    assert np.array_equal(raw, gathered(data, offsets, 4096))
    assert np.array_equal(buf2, gathered(data, odd, 4096))
    if ring is not None:
        assert ring.gathers == 0


def test_buffered_engine_falls_back(backend, path, data):
    with open_engine(backend, direct=False) as eng, eng.open(path) as f:
        ring = spy(eng)
        offsets = RNG.integers(0, 1000, 20) * 4096
        buf = alloc(20 * 4096)
        assert f.pread_pages(buf, offsets, 4096).result() == 20 * 4096
    assert np.array_equal(buf, gathered(data, offsets, 4096))
    if ring is not None:
        assert ring.gathers == 0


def test_empty_offsets(engine, path):
    with engine.open(path, "r+") as f:
        assert f.pread_pages(alloc(0), [], 4096).result() == 0
        assert f.pread_pages(np.empty(0, np.uint8), np.empty(0, np.int64), 4096).result() == 0
        assert f.pwrite_pages(bytearray(), [], 4096).result() == 0
        assert f.size == FILE_SIZE


@pytest.mark.parametrize("page", [4096, 16 * KiB, 1000])
def test_write_round_trip(engine, tmp_path, page):
    n = 40
    slots = RNG.permutation(200)[:n]  # distinct, unsorted; some past the current end of file
    offsets = slots * page
    src = alloc(n * page)
    src[:] = RNG.integers(0, 256, n * page, dtype=np.uint8)
    p = tmp_path / "w.bin"
    with engine.open(p, "w") as f:
        f.truncate(50 * page)
        assert f.pwrite_pages(src, offsets, page, tag="w").result() == n * page
        assert f.size == max(50 * page, int(offsets.max()) + page)  # extended, never shrunk
        back = alloc(n * page)
        assert f.pread_pages(back, offsets[::-1].copy(), page).result() == n * page
    assert np.array_equal(back, gathered(src, (np.arange(n) * page)[::-1], page))
    on_disk = np.fromfile(p, np.uint8)
    for k, off in enumerate(offsets):
        assert np.array_equal(on_disk[off : off + page], src[k * page : (k + 1) * page])


def test_write_from_read_only_buffer(engine, tmp_path):
    src = np.frombuffer(bytes(range(256)) * 32, np.uint8)  # read-only, 8 KiB
    with engine.open(tmp_path / "ro.bin", "w") as f:
        assert f.pwrite_pages(src, [4096, 0], 4096).result() == 8192
    out = np.fromfile(tmp_path / "ro.bin", np.uint8)
    assert np.array_equal(out[4096:], src[:4096]) and np.array_equal(out[:4096], src[4096:])


def test_short_read_reports_lowest_bad_page(engine, path):
    page = 8192
    with engine.open(path) as f:
        buf = alloc(4 * page)
        # page 1 lies wholly past the end, page 2 is cut short by it: page 1 is reported
        with pytest.raises(ShortReadError) as info:
            f.pread_pages(buf, [0, FILE_SIZE + page, FILE_SIZE - 4096, 0], page).result()
        err = info.value
        assert (err.offset, err.size, err.got) == (FILE_SIZE + page, page, 0)
        assert str(path) in str(err)
        with pytest.raises(ShortReadError) as info:
            f.pread_pages(buf, [0, 8192, FILE_SIZE - 4096, 4096], page).result()
        assert (info.value.offset, info.value.size, info.value.got) == (FILE_SIZE - 4096, page, 4096)
        odd = np.zeros(3 * 1000, np.uint8)  # the per-page path says the same
        with pytest.raises(ShortReadError) as info:
            f.pread_pages(odd, [5, FILE_SIZE - 300, FILE_SIZE + 1], 1000).result()
        assert (info.value.offset, info.value.size, info.value.got) == (FILE_SIZE - 300, 1000, 300)


def test_failed_page_is_typed_with_its_offset(engine):
    # /dev/full fails every write with ENOSPC: the lowest page index (not offset) is reported.
    with engine.open("/dev/full", "r+") as f, pytest.raises(IOFailure) as info:
        f.pwrite_pages(alloc(3 * 4096), [8192, 0, 4096], 4096).result()
    err = info.value
    assert err.errno == errno.ENOSPC
    assert (err.path, err.offset, err.size) == ("/dev/full", 8192, 4096)


def test_bad_arguments(engine, path, tmp_path):
    with engine.open(path) as f:
        with pytest.raises(ValueError, match=">= 0"):
            f.pread_pages(alloc(2 * 4096), [0, -4096], 4096)
        with pytest.raises(ValueError, match="bytes"):
            f.pread_pages(alloc(2 * 4096 + 1), [0, 4096], 4096)
        with pytest.raises(ValueError, match="bytes"):
            f.pread_pages(alloc(4096), [0, 4096], 4096)
        with pytest.raises(ValueError, match="page_size"):
            f.pread_pages(alloc(0), [], 0)
        with pytest.raises(ValueError, match="out of range"):
            f.pread_pages(alloc(4096), np.array([2**64 - 4096], np.uint64), 4096)
        with pytest.raises(TypeError, match="ints"):
            f.pread_pages(alloc(4096), [0.5], 4096)
        with pytest.raises(TypeError, match="read-only"):
            f.pread_pages(bytes(4096), [0], 4096)
        with pytest.raises(TypeError):
            f.pread_pages(np.zeros((4, 4096), np.uint8)[:, ::2], [0, 4096], 4096)
    with engine.open(path, "r") as f:
        with pytest.raises(PermissionDeniedError):
            f.pwrite_pages(alloc(4096), [0], 4096)
        with pytest.raises(PermissionDeniedError):
            f.pwrite_pages(alloc(0), [], 4096)


def test_offsets_are_snapshotted(engine, path, data):
    offsets = np.arange(32, dtype=np.int64) * 4096
    buf = alloc(32 * 4096)
    with engine.open(path) as f:
        fut = f.pread_pages(buf, offsets, 4096)
        offsets[:] = 0  # the caller reuses its array at once
        fut.result()
    assert np.array_equal(buf, data[: 32 * 4096])


def test_observer_sees_one_event_per_page(engine, path):
    events = []
    engine.add_observer(events.extend)
    offsets = RNG.integers(0, 1000, 25) * 4096
    with engine.open(path) as f:
        f.pread_pages(alloc(25 * 4096), offsets, 4096, tag=("kv", 7)).result()
    engine.remove_observer(events.extend)
    assert len(events) == 25
    assert all(e.tag == ("kv", 7) and e.op == "read" and e.backend == engine.name and e.size == 4096
               and e.result == 4096 and e.complete_ns >= e.submit_ns > 0 and e.queue_depth >= 1 for e in events)
    assert sorted(e.offset for e in events) == sorted(int(o) for o in offsets)


def test_torch_tensor_buffer(engine, path, data):
    torch = pytest.importorskip("torch")
    offsets = RNG.integers(0, 500, 12) * 8192
    t = torch.empty(12, 4096, dtype=torch.bfloat16)  # 8 KiB per row: one page per row
    with engine.open(path) as f:
        assert f.pread_pages(t, offsets, 8192).result() == 12 * 8192
    assert np.array_equal(t.view(torch.uint8).numpy().reshape(-1), gathered(data, offsets, 8192))
    with engine.open(path, "r+") as f:
        assert f.pwrite_pages(t[:2], [FILE_SIZE, FILE_SIZE + 8192], 8192).result() == 2 * 8192
    tail = np.fromfile(path, np.uint8)[FILE_SIZE:]
    assert np.array_equal(tail, gathered(data, offsets[:2], 8192))


def test_pages_from_several_threads(engine, path, data):
    errors = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with engine.open(path) as f:
                for i in range(20):
                    page = (4096, 16 * KiB, 1000)[i % 3]
                    offsets = rng.integers(0, FILE_SIZE // page - 1, 16) * page
                    buf = alloc(16 * page)
                    single = np.zeros(3000, np.uint8)
                    fut = f.pread(single, int(offsets[0]) + 3)  # ordinary requests mixed in
                    assert f.pread_pages(buf, offsets, page).result() == 16 * page
                    assert np.array_equal(buf, gathered(data, offsets, page))
                    assert fut.result() == 3000
                    assert np.array_equal(single, data[offsets[0] + 3 : offsets[0] + 3003])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
