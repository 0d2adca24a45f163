"""Engine API beyond the conformance suite: settings, buffers, backend choice."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from llmtier.engine import (
    PAGE,
    BufferPool,
    Settings,
    alloc,
    as_bytes_view,
    current_settings,
    move_pages,
    open_engine,
    settings,
)
from llmtier.errors import ClosedError, EngineUnavailableError


def test_move_pages_moves_data_without_copy_and_leaves_zeros(tmp_path):
    """mremap of whole pages: the destination holds the source's bytes (and a direct read into it works), the
    source reads zero and stays usable; unaligned ranges, partial pages and foreign buffers change nothing."""
    src, dst = alloc(4 * PAGE), alloc(3 * PAGE)
    src[:] = np.arange(4 * PAGE, dtype=np.uint64).astype(np.uint8)
    want = src[PAGE:3 * PAGE].copy()
    assert move_pages(src, PAGE, dst, PAGE, 2 * PAGE)
    assert np.array_equal(dst[PAGE:3 * PAGE], want) and not dst[:PAGE].any()
    assert not src[PAGE:3 * PAGE].any() and src[0] == 0 and src[3 * PAGE] == want[0]
    src[PAGE:3 * PAGE] = 9  # the source range is ordinary memory again
    assert (src[PAGE:3 * PAGE] == 9).all()
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * (2 * PAGE // 256))
    with open_engine() as eng, eng.open(p) as f:  # a direct read lands in the moved pages
        f.pread_many([dst[PAGE:3 * PAGE]], [0]).result()
    assert dst[PAGE:3 * PAGE].tobytes() == p.read_bytes()
    before = dst.copy()
    assert not move_pages(src, 1, dst, 0, PAGE)  # unaligned offset
    assert not move_pages(src, 0, dst, 0, PAGE + 1)  # not whole pages
    assert not move_pages(src, 3 * PAGE, dst, 0, 2 * PAGE)  # past the end
    assert np.array_equal(dst, before)
    with pytest.raises(ValueError, match="alloc"):
        move_pages(np.zeros(2 * PAGE, dtype=np.uint8), 0, dst, 0, PAGE)


def test_alloc_is_page_aligned_and_zeroed():
    for n in (1, 4096, 5000, 3 << 20):
        buf = alloc(n)
        assert buf.nbytes == n and buf.dtype == np.uint8
        assert buf.ctypes.data % 4096 == 0
        assert not buf.any()
    assert alloc(0).nbytes == 0
    with pytest.raises(ValueError):
        alloc(-1)


def test_torch_view_of_alloc_shares_memory():
    torch = pytest.importorskip("torch")
    buf = alloc(4096)
    t = torch.from_numpy(buf)
    t[0] = 42
    assert buf[0] == 42


def test_as_bytes_view_rejects_bad_buffers():
    with pytest.raises(TypeError, match="read-only"):
        as_bytes_view(b"abc", writable=True)
    with pytest.raises(TypeError, match="contiguous"):
        as_bytes_view(np.zeros((4, 4), np.uint8)[:, ::2], writable=False)
    with pytest.raises(TypeError, match="buffer"):
        as_bytes_view(12, writable=False)
    assert as_bytes_view(np.zeros(3, np.float64), writable=True).nbytes == 24


def test_buffer_pool_reuses_and_blocks():
    with BufferPool(8192, 2) as pool:
        a = pool.acquire()
        b = pool.acquire()
        got = []
        t = threading.Thread(target=lambda: got.append(pool.acquire()))
        t.start()
        t.join(0.05)
        assert t.is_alive()  # third acquire waits
        pool.release(a)
        t.join(2)
        assert got and got[0] is a
        pool.release(b)
        with pool.get() as c:
            assert c is b
    with pytest.raises(ValueError):
        pool.acquire()


def test_settings_scope_and_overrides():
    base = current_settings()
    with settings(chunk_size=8 << 20, queue_depth=64) as s:
        assert s.chunk_size == 8 << 20 and current_settings().queue_depth == 64
        with open_engine("threads", threads=3) as eng:
            assert (eng.settings.chunk_size, eng.settings.queue_depth, eng.settings.threads) == (8 << 20, 64, 3)
    assert current_settings() == base
    with pytest.raises(ValueError, match="multiple of alignment"):
        Settings(chunk_size=1000)
    with pytest.raises(TypeError, match="unknown engine setting"):
        open_engine("threads", chunk=1)


def test_unknown_engine_name():
    with pytest.raises(ValueError, match="unknown engine"):
        open_engine("nvme-of")


def test_auto_names_its_choice_and_reason():
    with open_engine("auto") as eng:
        assert eng.name in ("uring", "threads")
        assert eng.reason.startswith("auto:")


def test_auto_falls_back_when_uring_is_off(tmp_path):
    code = ("from llmtier.engine import open_engine\n"
            "e = open_engine('auto'); print(e.name, '|', e.reason); e.close()\n"
            "try:\n    open_engine('uring')\nexcept Exception as x:\n    print(type(x).__name__, x)\n")
    env = dict(os.environ, LLMTIER_NO_URING="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("threads | auto: fell back")
    assert "LLMTIER_NO_URING" in out
    assert EngineUnavailableError.__name__ in out


def test_posix_is_buffered_and_threads_direct(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 8192)
    with open_engine("posix") as eng, eng.open(p) as f:
        assert not f.direct
    with open_engine("threads") as eng, eng.open(p) as f:
        assert f.direct and f.direct_reason is None
    with open_engine("threads", direct=False) as eng, eng.open(p) as f:
        assert not f.direct


def test_file_metadata_calls(tmp_path, backend):
    with open_engine(backend) as eng, eng.open(tmp_path / "f", "w") as f:
        f.allocate(1 << 20)
        assert f.size == 1 << 20
        f.truncate(5000)
        assert f.size == 5000
        f.sync()
    f2 = open_engine(backend)
    fh = f2.open(tmp_path / "f")
    f2.close()
    with pytest.raises(ClosedError):
        _ = fh.size
