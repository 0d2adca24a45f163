"""`llmtier bench store` end to end on a tiny checkpoint: structure, counts, bit-exact contents.

No timing assertions: speed is shown by the benchmark itself (docs/BENCHMARKS.md).
The page cache is not dropped here (other work on the machine would pay for it).
"""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from llmtier.bench.fio import fio_available  # noqa: E402
from llmtier.bench.store import (  # noqa: E402
    DEFAULT_LOADERS,
    GiB,
    MiB,
    StoreBenchConfig,
    StoreBenchError,
    acceptance,
    choose_arch,
    ensure_checkpoint,
    format_report,
    run_store_bench,
    write_json,
)
from llmtier.cli import build_parser  # noqa: E402
from llmtier.store import open_store  # noqa: E402

SIZE = 32 * MiB


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-store")
    cfg = StoreBenchConfig(str(d), size=SIZE, rounds=1, warmup=False, drop_cache=False, shard_bytes=12 * MiB,
                           keep_store=True)
    return cfg, run_store_bench(cfg, progress=False)


def test_every_loader_loaded_everything(bench):
    _, res = bench
    ck = res.checkpoint
    arch = choose_arch(SIZE)
    assert ck["tensors"] == len(arch.tensors()) and ck["bytes"] == arch.nbytes
    assert len(ck["shards"]) >= 2  # shards of 12 MiB: the loaders read several files
    assert [r.name for r in res.rows] == list(DEFAULT_LOADERS)
    for r in res.rows:
        assert r.runs == 1 and r.tensors == ck["tensors"] and r.bytes == ck["bytes"]
        assert r.gbps > 0 and r.seconds > 0 and r.peak_rss > 0
        assert r.vs_safetensors is not None
    assert res.digests_agree  # every loader's tensors: same names, dtypes, shapes and CRC-32Cs
    for r in res.rows:  # the lazily mapped loads really read every page
        assert all((s["touched"] > 0) == (r.name in ("safetensors", "torch-mmap")) for s in r.samples)
    fio_ok, _ = fio_available()
    assert (res.fio is not None) == fio_ok
    if fio_ok:
        assert res.fio.runs == 1 and res.fio.bytes > 0
        assert all(r.vs_fio is not None for r in res.rows)
    assert not res.cold and any("not dropped" in n for n in res.notes)


def test_convert_stats(bench):
    _, res = bench
    c = res.convert
    assert c.tensors == res.checkpoint["tensors"] and c.bytes_read == res.checkpoint["bytes"]
    assert c.largest_tensor == res.checkpoint["largest_tensor_bytes"] == 2 * 8192 * 256  # the embedding
    assert c.bound == c.largest_tensor + 512 * MiB
    assert c.peak_rss > c.baseline_rss > 0 and c.held == (c.peak_rss <= c.bound)
    assert c.gbps > 0 and c.store_file_bytes % 4096 == 0


def test_store_equals_safetensors_bit_for_bit(bench):
    _, res = bench
    with open_store(res.convert.store_file) as s:
        ours = s.get_many(torch=True)
    theirs = {}
    for shard in res.checkpoint["shards"]:
        theirs.update(load_file(f"{res.checkpoint['hf_dir']}/{shard}"))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == t.dtype == torch.bfloat16 and o.shape == t.shape
        assert torch.equal(o.reshape(-1).view(torch.int16), t.reshape(-1).view(torch.int16)), name
        assert torch.isfinite(t.float()).all()  # weight-like values, no NaN/Inf bit patterns


def test_report_and_json(bench, tmp_path):
    _, res = bench
    text = format_report(res)
    for label in ("llmtier get_many (CRC verified)", "safetensors load_file + touch", "torch.load(mmap=True)",
                  "convert (one run)", "acceptance"):
        assert label in text
    write_json(res, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"config", "checkpoint", "convert", "rows", "fio", "notes", "acceptance"} <= set(doc)
    assert all(len(r["samples"]) == 1 for r in doc["rows"])
    a = acceptance(res)
    assert a["size_ok"] is False and a["rounds_ok"] is False  # a tiny run never qualifies


def test_checkpoint_is_reused_until_the_request_changes(bench, tmp_path):
    cfg, _ = bench
    again = ensure_checkpoint(cfg.directory, choose_arch(SIZE), seed=cfg.seed, shard_bytes=cfg.shard_bytes,
                              progress=False)
    assert again.reused and again.torch_file  # the torch.save copy is cached too
    small = choose_arch(8 * MiB, hidden=256)
    first = ensure_checkpoint(str(tmp_path), small, seed=1, shard_bytes=4 * MiB, progress=False)
    assert not first.reused and first.nbytes == small.nbytes and len(first.shards) >= 2
    assert ensure_checkpoint(str(tmp_path), small, seed=1, shard_bytes=4 * MiB, progress=False).reused
    assert not ensure_checkpoint(str(tmp_path), small, seed=2, shard_bytes=4 * MiB, progress=False).reused
    with open(first.shards[0], "r+b") as f:  # a damaged (truncated) shard is not reused either
        f.truncate(4096)
    assert not ensure_checkpoint(str(tmp_path), small, seed=2, shard_bytes=4 * MiB, progress=False).reused
    foreign = tmp_path / "foreign"
    (foreign / "hf").mkdir(parents=True)  # an hf/ the study did not make is never replaced
    with pytest.raises(StoreBenchError):
        ensure_checkpoint(str(foreign), small, progress=False)


def test_arch_for_the_full_run():
    arch = choose_arch(int(2.5 * GiB))
    assert arch.hidden == 2048 and arch.nbytes >= 2 * GiB and arch.layers >= 16
    assert max(math.prod(s) * 2 for _, s in arch.tensors()) == 32000 * 2048 * 2


def test_cli_parses():
    args = build_parser().parse_args(["bench", "store", "--size", "256M", "--rounds", "2", "--dir", "/x",
                                      "--loaders", "llmtier,safetensors", "--no-drop-cache", "--json", "o.json"])
    assert args.size == 256 * MiB and args.rounds == 2 and args.dir == "/x" and args.no_drop_cache
    assert args.func.__name__ == "cli_main"
    with pytest.raises(ValueError):
        StoreBenchConfig("/x", loaders=("llmtier", "nope"))
