"""TokenDataset: windows equal to the file's tokens, deterministic, resumable, sharded by DataLoader workers;
the Megatron .idx reader and writer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmtier.data import DataError, TokenDataset, read_index, write_indexed  # noqa: E402
from llmtier.errors import FormatError  # noqa: E402


def _flat(tmp_path, n=300_000, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 50_000, size=n).astype(dtype)
    path = tmp_path / "train.bin"
    data.tofile(path)
    return path, data


def _take(ds, n):
    return list(itertools.islice(iter(ds), n))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_are_the_files_tokens(tmp_path, dtype):
    path, data = _flat(tmp_path, dtype=dtype)
    ds = TokenDataset(path, seq_len=100, batch_size=8, seed=3, dtype=dtype, prefetch=3)
    batches = _take(ds, 6)
    assert ds.position == 6
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (8, 100) and x.dtype == torch.int64
        for row, s in enumerate(ds.starts(k).tolist()):
            assert np.array_equal(x[row].numpy(), data[s:s + 100].astype(np.int64))
            assert np.array_equal(y[row].numpy(), data[s + 1:s + 101].astype(np.int64))
        assert ds.request_bytes(k) % 4096 == 0


@pytest.mark.parametrize("prefetch,batches,group", [(1, 5, 1), (3, 7, 2), (8, 13, 3), (4, 6, 64)])
def test_grouped_reads_give_every_batch_in_order(tmp_path, monkeypatch, prefetch, batches, group):
    """Batches read in groups (one engine call per group, a partial last group) come out whole and in order."""
    from llmtier.data import tokens

    monkeypatch.setattr(tokens, "GATHER_BYTES", group * 16 * 4096)  # a batch of 16 windows reads 16 pages
    path, data = _flat(tmp_path)
    ds = TokenDataset(path, seq_len=50, batch_size=16, seed=7, prefetch=prefetch, batches=batches)
    got = list(ds)
    assert len(got) == batches and ds.position == batches
    for k, (x, y) in enumerate(got):
        for row, s in enumerate(ds.starts(k).tolist()):
            assert np.array_equal(x[row].numpy(), data[s:s + 50].astype(np.int64))
            assert np.array_equal(y[row].numpy(), data[s + 1:s + 51].astype(np.int64))


def test_deterministic_and_resumable(tmp_path):
    path, _ = _flat(tmp_path)
    a = _take(TokenDataset(path, seq_len=64, batch_size=4, seed=1), 10)
    b = _take(TokenDataset(path, seq_len=64, batch_size=4, seed=1), 10)
    c = _take(TokenDataset(path, seq_len=64, batch_size=4, seed=2), 1)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    first = TokenDataset(path, seq_len=64, batch_size=4, seed=1)
    _take(first, 4)
    state = first.state_dict()
    resumed = TokenDataset(path, seq_len=64, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    rest = _take(resumed, 6)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[4:], rest))
    with pytest.raises(DataError):
        TokenDataset(path, seq_len=64, batch_size=8, seed=1).load_state_dict(state)


def test_dataloader_workers_shard_the_same_stream(tmp_path):
    path, _ = _flat(tmp_path)
    ds = TokenDataset(path, seq_len=32, batch_size=4, seed=5, batches=9)
    plain = list(ds)
    assert len(plain) == 9
    ds2 = TokenDataset(path, seq_len=32, batch_size=4, seed=5, batches=9)
    loaded = list(torch.utils.data.DataLoader(ds2, batch_size=None, num_workers=2))
    assert len(loaded) == 9
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(plain, loaded))


def test_ranks_split_the_stream(tmp_path):
    path, _ = _flat(tmp_path)
    r0 = TokenDataset(path, seq_len=16, batch_size=2, seed=0, rank=0, world_size=2)
    r1 = TokenDataset(path, seq_len=16, batch_size=2, seed=0, rank=1, world_size=2)
    assert not np.array_equal(r0.starts(0), r1.starts(0))
    one = TokenDataset(path, seq_len=16, batch_size=2, seed=0)
    assert np.array_equal(one.starts(1), r1.starts(0))


def test_megatron_indexed_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30_000, size=int(n)).astype(np.uint16) for n in rng.integers(1, 5000, size=60)]
    info = write_indexed(tmp_path / "corpus", docs, np.uint16)
    back = read_index(tmp_path / "corpus.bin")
    assert back.dtype == np.uint16 and back.documents == 60 and back.tokens == sum(d.size for d in docs)
    assert np.array_equal(back.pointers, info.pointers)
    ds = TokenDataset(tmp_path / "corpus", seq_len=50, batch_size=4, seed=0)
    assert ds.index is not None
    flat = np.concatenate(docs)
    x, _ = next(iter(ds))
    for row, s in enumerate(ds.starts(0).tolist()):
        assert np.array_equal(x[row].numpy(), flat[s:s + 50])
    for i in (0, 17, 59):
        assert np.array_equal(ds.document(i), docs[i])


def test_bad_files_are_typed(tmp_path):
    write_indexed(tmp_path / "c", [np.arange(10, dtype=np.uint16)], np.uint16)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[0] = ord("X")
    (tmp_path / "bad.idx").write_bytes(raw)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(FormatError):
        read_index(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes((tmp_path / "c.idx").read_bytes()[:30])
    with pytest.raises(FormatError):
        read_index(tmp_path / "short.idx")
    path, _ = _flat(tmp_path, n=1000)
    with pytest.raises(DataError):
        TokenDataset(path, seq_len=4000, batch_size=1)
