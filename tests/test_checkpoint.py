"""llmtier.checkpoint in one process: round trips, into=, retention, async saves, lazy tensors,
kill trials, a full disk and flipped bytes.  Multi-rank tests are in test_checkpoint_dist.py."""
from __future__ import annotations

import errno
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmtier import checkpoint as ck
from llmtier.bench.checkpoint_kill import make_state, run_kill_trials, same
from llmtier.checkpoint import Checkpointer, CheckpointError, CheckpointWarning, LazyTensor
from llmtier.errors import DiskFullError
from llmtier.store import read_index

torch = pytest.importorskip("torch")

from test_store_hardening import small_fs  # noqa: E402,F401 - the full-disk fixture (tmpfs / loop ext4)


def training_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    for _ in range(2):
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        sched.step()
    return {"model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
            "sched": sched.state_dict(), "rng": {"torch": torch.get_rng_state(), "py": random.getstate(),
                                                  "np": np.random.get_state()},
            "data": {"epoch": 1, "offset": 4096, "order": np.arange(10, dtype=np.int64)},
            "meta": {"name": "run", "loss": float("nan"), "inf": float("-inf"), "tag": b"\x00\xff", 3: (1, 2.5, None),
                     "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "npf": np.float32(1.5)}}


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            a.contiguous().view(-1).view(torch.uint8).equal(b.contiguous().view(-1).view(torch.uint8))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return same(a, b)


def test_round_trip_rich_state(tmp_path: Path) -> None:
    state = training_state()
    info = ck.save(state, tmp_path, step=7, metadata={"note": "first"})
    assert info.step == 7 and info.bytes > 0
    got = ck.load(tmp_path)
    assert equal(got, state)
    assert got["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert 3 in got["meta"] and isinstance(got["meta"][3], tuple)
    # the restored optimizer and RNG states are usable
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    torch.optim.AdamW(model.parameters()).load_state_dict(got["optim"])
    random.setstate(got["rng"]["py"])
    np.random.set_state(got["rng"]["np"])
    torch.set_rng_state(got["rng"]["torch"])
    man = json.loads((tmp_path / "step-000000007" / "manifest.json").read_text())["manifest"]
    assert man["user"] == {"note": "first"} and man["world_size"] == 1
    assert (tmp_path / "latest").read_text() == "step-000000007\n"
    # the tensors are in the store format, the tree is JSON in its index (no pickle anywhere)
    infos, meta = read_index(str(tmp_path / "step-000000007" / "rank-00000.lts"))
    assert all(t.offset % 4096 == 0 and t.crc32c is not None for t in infos)
    assert "tree" in meta["llmtier_checkpoint"]


def test_unsupported_value_and_existing_step(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"state\['bad'\].*cannot be saved without pickle"):
        ck.save({"bad": object()}, tmp_path, step=1)
    assert not (tmp_path / "step-000000001").exists()
    ck.save({"x": torch.ones(3)}, tmp_path, step=1)
    with pytest.raises(CheckpointError, match="already exists"):
        ck.save({"x": torch.zeros(3)}, tmp_path, step=1)
    assert equal(ck.load(tmp_path)["x"], torch.ones(3))


def test_load_into_existing_tensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(300, 70), "h": torch.randn(5).to(torch.bfloat16), "a": np.arange(9.0), "n": 5}
    ck.save(state, tmp_path, step=1)
    into = {"w": torch.empty(300, 70), "h": torch.empty(5, dtype=torch.bfloat16), "a": np.zeros(9)}
    ptr = into["w"].data_ptr()
    got = ck.load(tmp_path, into=into)
    assert got["w"] is into["w"] and into["w"].data_ptr() == ptr and got["a"] is into["a"]
    assert equal(got, state)
    with pytest.raises(CheckpointError, match="into"):
        ck.load(tmp_path, step=1, into={"w": torch.empty(3)})


def test_retention_keeps_newest_and_cleans_incomplete(tmp_path: Path) -> None:
    (tmp_path / "step-000000000").mkdir()  # a dead save's leftovers
    with Checkpointer(tmp_path, keep_last=2) as c:
        for s in range(1, 6):
            info = c.save({"s": torch.full((4,), float(s))}, step=s)
        assert info.deleted == [3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == ["step-000000004",
                                                                                        "step-000000005"]
    assert ck.latest_step(tmp_path) == 5
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path, keep_last=0)


def test_async_snapshot_staging_bound_and_errors(tmp_path: Path) -> None:
    chunk = 1 << 20
    state = {f"t{i}": torch.randn(3 << 18) for i in range(8)}  # 8 x 3 MiB, pool bound 4 MiB
    want = {k: v.clone() for k, v in state.items()}
    with Checkpointer(tmp_path, staging_bytes=4 * chunk, chunk_bytes=chunk) as c:
        h = c.save_async(state, step=1)
        for v in state.values():
            v.zero_()  # after the call returns the caller may change the state
        info = h.wait()
        assert c.staging_bytes <= 4 * chunk and info.staging_bytes >= c.staging_bytes
        assert info.stall_seconds <= info.seconds
        assert equal(c.load(), want)
        # the second save waits for the first; both land
        c.save_async(want, step=2)
        c.save_async(want, step=3)
        c.wait()
        assert ck.latest_step(tmp_path) == 3

        # an error in the background surfaces on wait() ...
        def boom() -> Any:
            yield np.zeros(10, np.uint8)
            raise OSError(errno.EIO, "simulated producer failure")

        with pytest.raises(OSError, match="simulated"):
            c.save_async({"x": LazyTensor("uint8", (20,), boom)}, step=4)
        assert not (tmp_path / "step-000000004").exists()
        c.save_async({"x": torch.ones(2)}, step=5)
    assert equal(ck.load(tmp_path)["x"], torch.ones(2))


def test_reserve_faults_the_pool_in_before_the_first_save(tmp_path: Path) -> None:
    chunk = 1 << 20
    state = {"a": torch.randn(3 << 18), "b": torch.randn(1 << 18)}  # 4 MiB
    with Checkpointer(tmp_path, chunk_bytes=chunk) as c:
        assert c.staging_bytes == 0
        assert c.reserve(state) == 4 * chunk == c.staging_bytes
        info = c.save_async(state, step=1).wait()
        assert c.staging_bytes == 4 * chunk and info.staging_bytes >= c.staging_bytes  # no chunk added
        assert equal(c.load(), state)
    with Checkpointer(tmp_path / "capped", chunk_bytes=chunk, staging_bytes=2 * chunk) as c:
        assert c.reserve(16 * chunk) == 2 * chunk  # never past the bound
        with pytest.raises(CheckpointError):
            c.reserve(-1)


def test_lazy_tensor_streams_pieces(tmp_path: Path) -> None:
    full = torch.randn(1000, 33)
    raw = full.view(-1).view(torch.uint8)
    pulled = []

    def pieces() -> Any:
        for a in range(0, raw.numel(), 10_000):
            pulled.append(a)
            yield raw[a : a + 10_000]

    lazy = LazyTensor(torch.float32, (1000, 33), pieces)
    ck.save({"exp_avg": lazy, "step": 3}, tmp_path, step=1)
    with Checkpointer(tmp_path) as c:
        c.save_async({"exp_avg": lazy, "step": 3}, step=2).wait()
    for s in (1, 2):
        got = ck.load(tmp_path, step=s)
        assert equal(got["exp_avg"], full) and got["step"] == 3
    assert len(pulled) == 2 * -(-raw.numel() // 10_000)


def _regions(store: Path) -> list[tuple[str, int, int]]:
    """Byte ranges of a store that carry meaning: preamble head, index, each tensor's bytes."""
    infos, _ = read_index(str(store))
    raw = store.read_bytes()
    import struct

    ioff, ilen = struct.unpack_from("<QQ", raw, 16)
    out = [("preamble", 0, 40), ("index", ioff, ilen)]
    out += [(f"tensor {t.name}", t.offset, t.nbytes) for t in infos if t.nbytes]
    return out


def test_flipped_byte_anywhere_is_detected(tmp_path: Path) -> None:
    good = {"w": torch.randn(2000), "b": torch.arange(10), "n": 1}
    ck.save(good, tmp_path, step=1)
    newer = {"w": torch.randn(2000), "b": torch.arange(10) * 2, "n": 2}
    ck.save(newer, tmp_path, step=2)
    d2 = tmp_path / "step-000000002"
    targets = [(d2 / "manifest.json", name, a, n) for name, a, n in [("manifest", 0, (d2 / "manifest.json").stat().st_size)]]
    targets += [(d2 / "rank-00000.lts", name, a, n) for name, a, n in _regions(d2 / "rank-00000.lts")]
    rnd = random.Random(5)
    for path, region, a, n in targets:
        for _ in range(3):
            off = a + rnd.randrange(n)
            orig = path.read_bytes()
            flipped = bytearray(orig)
            flipped[off] ^= 1 << rnd.randrange(8)
            path.write_bytes(bytes(flipped))
            try:
                with pytest.warns(CheckpointWarning, match="step-000000002"):
                    got = ck.load(tmp_path)
                assert equal(got, good), f"flip in {path.name} {region} at {off} was used"
                with pytest.raises(CheckpointError, match="step-000000002"):
                    ck.load(tmp_path, step=2)
            finally:
                path.write_bytes(orig)
    assert equal(ck.load(tmp_path), newer)


def test_incomplete_and_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.load(tmp_path)
    ck.save({"v": torch.ones(1)}, tmp_path, step=1)
    ck.save({"v": torch.ones(1) * 2}, tmp_path, step=2)
    (tmp_path / "step-000000002" / "manifest.json").unlink()  # as if killed before the commit
    with pytest.warns(CheckpointWarning, match="step-000000002 is incomplete"):
        assert equal(ck.load(tmp_path)["v"], torch.ones(1))
    (tmp_path / "step-000000001" / "rank-00000.lts").unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=r"rank-00000\.lts is missing"):
        ck.load(tmp_path)


def test_second_saver_refused(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as a:
        a.save({"x": torch.ones(1)}, step=1)
        with pytest.raises(CheckpointError, match="another process"):
            ck.save({"x": torch.ones(1)}, tmp_path, step=2)


@pytest.mark.parametrize("use_async", [False, True])
def test_disk_full(small_fs: Path, use_async: bool) -> None:  # noqa: F811
    d = small_fs / "ckpt"
    small = {"w": torch.randn(1 << 16)}
    ck.save(small, d, step=1)
    big = {f"w{i}": torch.randn(5 << 20) for i in range(3)}  # 60 MiB > the file system
    with Checkpointer(d, staging_bytes=8 << 20) as c, pytest.raises(DiskFullError) as ei:
        if use_async:
            c.save_async(big, step=2).wait()
        else:
            c.save(big, step=2)
    assert ei.value.errno == errno.ENOSPC and "no space left" in str(ei.value)
    assert sorted(os.listdir(d)) == [".lock", "latest", "step-000000001"], "temporary files left behind"
    assert sorted(os.listdir(d / "step-000000001")) == ["manifest.json", "rank-00000.lts"]
    assert equal(ck.load(d), small)


def test_kill_trials(tmp_path: Path) -> None:
    res = run_kill_trials(str(tmp_path / "k"), 20, seed=11, size=1 << 20, max_delay=0.25)
    assert res.problems == [] and res.corrupt == 0 and res.lost == 0 and res.trials == 20
    assert res.steps == sorted(res.steps) and res.steps[-1] > 0


def test_numpy_only_state_needs_no_torch_import(tmp_path: Path) -> None:
    state = make_state(3, 1 << 16)
    ck.save(state, tmp_path, step=3)
    assert same(ck.load(tmp_path), state)


@pytest.mark.filterwarnings("ignore::llmtier.checkpoint.CheckpointWarning")  # saves in flight are skipped
def test_concurrent_loads_while_saving(tmp_path: Path) -> None:
    ck.save({"x": torch.ones(4)}, tmp_path, step=1)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                v = ck.load(tmp_path)["x"]
                assert v[0] == v[-1]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    with Checkpointer(tmp_path, keep_last=2) as c:
        for s in range(2, 12):
            c.save({"x": torch.full((4,), float(s))}, step=s)
    th.join()
    assert not errors


def test_bench_checkpoint_quick(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from llmtier.bench.checkpoint import CheckpointBenchConfig, format_result, run_checkpoint_bench

    cfg = CheckpointBenchConfig.quick(str(tmp_path), kill_trials=2)
    res = run_checkpoint_bench(cfg, progress=False)
    assert {"llmtier", "llmtier_async", "torch", "safetensors", "dcp", "dcp_async"} <= set(res.save_s)
    assert {"llmtier", "llmtier_into", "torch", "safetensors", "dcp"} <= set(res.load_s)
    assert res.kill["corrupt"] == 0 and res.kill["lost"] == 0
    text = format_result(res, cfg)
    assert "llmtier save (durable)" in text and "stall" in text
    assert [p.name for p in tmp_path.iterdir()] == [], "the bench left files behind"


def test_loader_pipeline_modes_segments_and_damage(tmp_path: Path) -> None:
    """read_tensors with tiny segments: fresh arenas, aligned and unaligned destinations, tensors spanning
    segments, empty tensors, with and without prefault threads; a flipped byte in a middle segment is caught."""
    from llmtier.checkpoint.readinto import alloc_huge, read_tensors
    from llmtier.store import open_store

    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(5000, generator=g), "b": torch.randn(3, 1024, generator=g),  # b: 12 KiB, aligned size
             "e": torch.empty(0), "c": torch.randint(0, 255, (40_001,), dtype=torch.uint8, generator=g),
             "d": torch.randn(2048, generator=g).to(torch.bfloat16)}
    ck.save(state, tmp_path, step=1)
    path = tmp_path / "step-000000001" / "rank-00000.lts"
    for prefault in (0, 2):
        with open_store(path) as st:
            infos = {i.name: i for i in st.infos()}
            aligned = torch.from_numpy(alloc_huge(3 * 1024 * 4)).view(torch.float32).view(3, 1024)  # direct
            unaligned = torch.empty(2048, dtype=torch.bfloat16)  # bounce window + copy
            pairs = [(infos[n], None) for n in ("a", "c", "e")] + [(infos["b"], aligned), (infos["d"], unaligned)]
            raw = read_tensors(st, pairs, verify=True, segment=8192, depth=3, prefault=prefault)
            assert set(raw) == {"a", "c", "e"} and raw["e"].nbytes == 0
            assert raw["a"].ctypes.data % 4096 == 0  # read in place into aligned memory
            assert equal(torch.from_numpy(raw["a"]).view(torch.float32), state["a"])
            assert equal(torch.from_numpy(raw["c"]), state["c"])
            assert equal(aligned, state["b"]) and equal(unaligned, state["d"])
    # damage one byte in the middle of "a" (its second 8 KiB segment)
    with open_store(path) as st:
        off = st.info("a").offset + 9000
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    from llmtier.errors import ChecksumError

    with open_store(path) as st, pytest.raises(ChecksumError, match="'a'"):
        read_tensors(st, [(i, None) for i in st.infos()], verify=True, segment=8192, depth=3)
    with open_store(path) as st:  # verify off: read, not checked
        read_tensors(st, [(i, None) for i in st.infos()], verify=False, segment=8192, depth=3)


def test_checkpoint_writes_and_reads_are_tagged(tmp_path: Path) -> None:
    from llmtier.engine import open_engine

    events: list[Any] = []
    with open_engine() as eng:
        eng.add_observer(events.extend)
        ck.save({"w": torch.randn(300, 300), "n": 3}, tmp_path, step=7, engine=eng)
        writes = [e for e in events if e.op == "write"]
        assert writes and {e.tag for e in writes} == {"ckpt:step-000000007"}
        events.clear()
        ck.load(tmp_path, engine=eng)
        reads = [e for e in events if e.op == "read"]
        assert reads and all(e.tag for e in reads)


def test_lazy_readahead_runs_ahead_on_a_thread_and_inline_when_off(tmp_path: Path) -> None:
    full = torch.randn(64, 1024)
    raw = full.view(-1).view(torch.uint8)
    where: dict[str, set[str]] = {"on": set(), "off": set()}

    def producer(key: str, reuse: bool) -> Any:
        def pieces() -> Any:
            buf = torch.empty(4096, dtype=torch.uint8)
            for a in range(0, raw.numel(), 4096):
                where[key].add(threading.current_thread().name)
                if reuse:  # refills one buffer: only safe without read-ahead
                    buf.copy_(raw[a : a + 4096])
                    yield buf
                else:
                    yield raw[a : a + 4096].clone()
        return pieces

    state = {"on": LazyTensor(torch.float32, (64, 1024), producer("on", False)),
             "off": LazyTensor(torch.float32, (64, 1024), producer("off", True), readahead=False)}
    ck.save(state, tmp_path, step=1)
    with Checkpointer(tmp_path) as c:
        c.save_async(state, step=2).wait()
    for s in (1, 2):
        got = ck.load(tmp_path, step=s)
        assert equal(got["on"], full) and equal(got["off"], full)
    assert where["on"] == {"llmtier-ckpt-readahead"}
    assert threading.current_thread().name in where["off"] and "llmtier-ckpt-readahead" not in where["off"]

    def failing() -> Any:
        yield raw[:4096].clone()
        raise OSError(errno.EIO, "simulated read failure")

    with pytest.raises(OSError, match="simulated read failure"):
        ck.save({"x": LazyTensor(torch.float32, (64, 1024), failing)}, tmp_path, step=3)
    assert ck.latest_step(tmp_path) == 2


def test_parallel_snapshot_copy_is_exact(tmp_path: Path) -> None:
    from llmtier.checkpoint.staging import ParallelCopy

    cp = ParallelCopy(3)
    try:
        src = np.random.default_rng(0).integers(0, 255, (9 << 20) + 123, dtype=np.uint8)
        dst = np.zeros_like(src)
        cp.copy(dst, src)
        assert np.array_equal(dst, src)
    finally:
        cp.close()
    state = {"big": torch.randn(5 << 20), "small": torch.randn(10)}  # 20 MiB: split across the copy threads
    want = {k: v.clone() for k, v in state.items()}
    with Checkpointer(tmp_path, copy_threads=2) as c:
        h = c.save_async(state, step=1)
        state["big"].zero_()
        h.wait()
        assert equal(c.load(), want)


@pytest.mark.filterwarnings("ignore::llmtier.checkpoint.CheckpointWarning")
def test_load_lists_again_when_its_listing_went_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves with retention beside a load can retire every step the load listed before it reads them: the
    load lists the directory again rather than report that no complete checkpoint exists."""
    from llmtier.checkpoint import layout

    with Checkpointer(tmp_path, keep_last=1) as c:
        c.save({"x": torch.full((4,), 3.0)}, step=3)
    real, calls = layout.list_steps, []

    def listing(directory: str) -> list[int]:
        calls.append(directory)
        return [2, 1] if len(calls) == 1 else real(directory)  # steps 1 and 2, since retired by step 3's save

    monkeypatch.setattr(layout, "list_steps", listing)
    c = Checkpointer(tmp_path)
    assert c.load()["x"].tolist() == [3.0] * 4 and c.loaded.step == 3 and len(calls) == 2
    monkeypatch.setattr(layout, "list_steps", lambda directory: [2, 1])  # the same stale listing every time
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path).load()
