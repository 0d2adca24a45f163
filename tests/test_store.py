"""The tensor store: round trips, reader API, sharding, safetensors in place, convert, inspect."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmtier.cli import main
from llmtier.errors import ChecksumError, FormatError, TensorNotFoundError
from llmtier.store import DTYPES, StoreWriter, open_store, write_store
from llmtier.store import reader as reader_mod
from llmtier.store.convert import convert, describe, layer_order, tags_for

safetensors_torch = pytest.importorskip("safetensors.torch")

TORCH_DTYPES = [name for name in DTYPES if hasattr(torch, name)]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bits of any dtype (every bit pattern, NaNs included: round trips must be bit-exact)."""
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _no_temps(directory: str) -> bool:
    return not [e for e in os.listdir(directory) if ".tmp-" in e]


# -- round trips ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_round_trip_every_dtype_bit_exact(tmp_path, dtype):
    dt = getattr(torch, dtype)
    tensors = {"scalar": _rand((), dt, 1), "empty": _rand((0, 3), dt), "odd": _rand((3, 1365), dt, 2),
               "big": _rand((300, 1000), dt, 3)}
    path = tmp_path / "s.lts"
    write_store(path, tensors, stage_bytes=64 << 10)  # small staging: many flushes
    assert os.path.getsize(path) % 4096 == 0
    with open_store(path) as s:
        for name, t in tensors.items():
            assert _same(s.get_torch(name), t), name
        got = s.get_many(torch=True)
        assert all(_same(got[n], t) for n, t in tensors.items())
        info = s.info("big")
        assert info.offset % 4096 == 0 and info.dtype.name == dtype and info.shape == (300, 1000)
        assert s.verify() == []


def test_numpy_get_returns_values_or_raw_bits(tmp_path):
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    bf = torch.randn(5, 7).to(torch.bfloat16)
    write_store(tmp_path / "s.lts", {"f32": f32, "bf": bf, "i64": np.array([1, -2, 3])})
    with open_store(tmp_path / "s.lts") as s:
        np.testing.assert_array_equal(s.get("f32"), f32)
        raw = s.get("bf")
        assert raw.dtype == np.uint16 and raw.shape == (5, 7)
        np.testing.assert_array_equal(raw, bf.view(torch.uint16).numpy())
        assert s.get("i64").tolist() == [1, -2, 3]
        assert isinstance(s.get("f32"), np.ndarray) and s.get("f32").base is not None  # a view, not a copy


def test_get_into_caller_buffers(tmp_path):
    a = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    write_store(tmp_path / "s.lts", {"a": a})
    with open_store(tmp_path / "s.lts") as s:
        out = np.empty_like(a)
        assert s.get("a", out) is out
        np.testing.assert_array_equal(out, a)
        t = torch.empty(64, 33)
        assert s.get_torch("a", t) is t and torch.equal(t, torch.from_numpy(a))
        with pytest.raises(ValueError, match="bytes"):
            s.get("a", np.empty(10, np.float32))


def test_partial_reads_along_leading_dimension(tmp_path):
    a = np.random.default_rng(1).standard_normal((1000, 77)).astype(np.float16)
    write_store(tmp_path / "s.lts", {"a": a, "s": np.array(1.0)})
    with open_store(tmp_path / "s.lts") as s:
        for sl in (slice(0, 1), slice(13, 500), slice(999, 1000), slice(-10, None), slice(5, 5)):
            np.testing.assert_array_equal(s.get("a", rows=sl), a[sl])
        assert torch.equal(s.get_torch("a", rows=slice(3, 9)), torch.from_numpy(a[3:9]))
        out = np.empty((4, 77), np.float16)
        s.get("a", out, rows=slice(100, 104))
        np.testing.assert_array_equal(out, a[100:104])
        with pytest.raises(ValueError, match="step"):
            s.get("a", rows=slice(0, 10, 2))
        with pytest.raises(ValueError, match="0-dimensional"):
            s.get("s", rows=slice(0, 1))


def test_get_many_in_several_windows_tags_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "WINDOW_BYTES", 256 << 10)
    tensors = {f"t{i}": np.full(50_000 + i, i, dtype=np.uint8) for i in range(20)}
    write_store(tmp_path / "s.lts", tensors)
    events = []
    with open_store(tmp_path / "s.lts") as s:
        s.engine.add_observer(events.extend)
        got = s.get_many(["t3", "t17", "t0"] + [f"t{i}" for i in range(4, 10)])
        assert list(got)[:3] == ["t3", "t17", "t0"]
        for n, v in got.items():
            np.testing.assert_array_equal(v, tensors[n])
        everything = s.get_many()
        assert len(everything) == 20
    tags = {e.tag for e in events}
    assert {"t3", "t17", "t0"} <= tags
    assert sum(e.size for e in events if e.tag == "t3") >= 50_003


def test_checksum_detects_damage(tmp_path):
    a = np.arange(100_000, dtype=np.int32)
    path = tmp_path / "s.lts"
    write_store(path, {"a": a, "b": np.ones(10, np.float32)})
    with open_store(path) as s:
        off = s.info("a").offset
    with open(path, "r+b") as f:
        f.seek(off + 12345)
        byte = f.read(1)
        f.seek(off + 12345)
        f.write(bytes([byte[0] ^ 0x40]))
    with open_store(path) as s:
        with pytest.raises(ChecksumError) as err:
            s.get("a")
        assert err.value.field == "a" and str(path) in str(err.value)
        with pytest.raises(ChecksumError):
            s.get_many()
        assert s.verify() == ["a"]
        np.testing.assert_array_equal(s.get("b"), np.ones(10, np.float32))
        assert s.get("a", verify=False)[0] == 0  # still readable when asked to skip the check
    with open_store(path, verify=False) as s:
        assert len(s.get_many()) == 2
    assert main(["inspect", str(path), "--verify"]) == 2


def test_missing_tensor_is_a_key_error(tmp_path):
    write_store(tmp_path / "s.lts", {"a": np.zeros(3)})
    with open_store(tmp_path / "s.lts") as s:
        with pytest.raises(KeyError):
            s.get("nope")
        with pytest.raises(TensorNotFoundError, match="nope"):
            s.info("nope")
        assert "a" in s and "nope" not in s and len(s) == 1 and list(s) == ["a"]


def test_not_a_store(tmp_path):
    p = tmp_path / "x.lts"
    p.write_bytes(b"hello world" * 1000)
    with pytest.raises(FormatError) as err:
        open_store(p)
    assert err.value.field == "magic"


# -- writer behaviour ------------------------------------------------------------
def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path):
    path = tmp_path / "s.lts"
    write_store(path, {"old": np.arange(5)})
    with StoreWriter(path) as w:
        w.add("x", np.zeros(3))
        for bad in ("", "a/b", "a\\b", "nul\0"):
            with pytest.raises(FormatError):
                w.add(bad, np.zeros(1))
        with pytest.raises(ValueError, match="already"):
            w.add("x", np.zeros(1))
        with pytest.raises(ValueError, match="JSON"):
            w.add("y", np.zeros(1), tags={"obj": object()})
        w.abort()
    with open_store(path) as s:
        assert s.keys() == ["old"]
    assert _no_temps(str(tmp_path))


def test_exception_inside_with_keeps_previous_store(tmp_path):
    path = tmp_path / "s.lts"
    write_store(path, {"old": np.arange(5)})
    with pytest.raises(RuntimeError), StoreWriter(path) as w:
        w.add("new", np.arange(1_000_000))
        raise RuntimeError("boom")
    with open_store(path) as s:
        assert s.keys() == ["old"] and s.get("old").tolist() == [0, 1, 2, 3, 4]
    assert _no_temps(str(tmp_path))


def test_streamed_tensor_must_get_all_its_bytes(tmp_path):
    path = tmp_path / "s.lts"
    w = StoreWriter(path)
    sink = w.begin("t", "float32", (4, 4))
    sink.write(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="got 32 of its 64 bytes"):
        sink.close()
    assert not path.exists() and _no_temps(str(tmp_path))
    with StoreWriter(path) as w:
        sink = w.begin("t", "bfloat16", (4, 4), tags={"layer": 0})
        for i in range(4):
            sink.write(torch.full((4,), float(i), dtype=torch.bfloat16))
        info = sink.close()
    assert info.tags == {"layer": 0}
    with open_store(path) as s:
        assert s.get_torch("t")[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_overwrite_replaces_atomically(tmp_path):
    path = tmp_path / "s.lts"
    write_store(path, {"a": np.zeros(10)}, metadata={"v": 1})
    write_store(path, {"b": np.ones(10)}, metadata={"v": 2})
    with open_store(path) as s:
        assert s.keys() == ["b"] and s.metadata == {"v": 2}


def test_writer_accepts_non_contiguous_and_noncpu_free_inputs(tmp_path):
    a = np.arange(100, dtype=np.int16).reshape(10, 10).T  # Fortran-ordered view
    t = torch.arange(100, dtype=torch.float32).reshape(10, 10).t()
    write_store(tmp_path / "s.lts", {"a": a, "t": t})
    with open_store(tmp_path / "s.lts") as s:
        np.testing.assert_array_equal(s.get("a"), a)
        assert torch.equal(s.get_torch("t"), t)


# -- sharded stores --------------------------------------------------------------
def _layered(n_layers: int, per_layer: int = 3, elems: int = 4000) -> tuple[dict, dict]:
    tensors, tags = {"embed": np.arange(elems, dtype=np.float32)}, {"embed": {"kind": "embed"}}
    for layer in range(n_layers):
        for j in range(per_layer):
            name = f"layers.{layer}.w{j}"
            tensors[name] = np.full(elems, layer * 10 + j, dtype=np.float32)
            tags[name] = {"layer": layer}
    return tensors, tags


def test_sharded_store_keeps_layers_whole(tmp_path):
    tensors, tags = _layered(5)
    d = tmp_path / "sharded"
    write_store(d, tensors, tags=tags, max_shard_bytes=40_000)
    with open_store(d) as s:
        assert sorted(s.keys()) == sorted(tensors)
        for n, v in s.get_many().items():
            np.testing.assert_array_equal(v, tensors[n])
        shard_of_layer: dict[int, set[str]] = {}
        for info in s.infos():
            if "layer" in info.tags:
                shard_of_layer.setdefault(info.tags["layer"], set()).add(info.file)
        assert all(len(files) == 1 for files in shard_of_layer.values())
        assert len({i.file for i in s.infos()}) > 1
    first = set(os.listdir(d))
    write_store(d, {"only": np.zeros(4)}, max_shard_bytes=40_000)  # a new generation replaces the old
    with open_store(d) as s:
        assert s.keys() == ["only"]
    assert not (first - {"index.json"}) & set(os.listdir(d))
    assert _no_temps(str(d))


def test_sharded_writer_refuses_foreign_directory(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError):
        StoreWriter(d, max_shard_bytes=1 << 20)
    assert (d / "precious.txt").read_text() == "do not delete"
    with pytest.raises(IsADirectoryError):
        StoreWriter(d)


# -- safetensors in place ---------------------------------------------------------
SAFETENSORS_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                      torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def test_safetensors_read_in_place_matches_load_file(tmp_path):
    tensors = {f"t_{str(dt).split('.')[1]}": _rand((7, 13), dt, i) for i, dt in enumerate(SAFETENSORS_DTYPES)}
    tensors["big"] = _rand((1024, 1031), torch.float32, 99)
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    ref = safetensors_torch.load_file(str(path))
    with open_store(path) as s:
        assert s.format == "safetensors" and not s.has_checksums
        assert s.metadata == {"safetensors": {"format": "pt"}}
        for name in tensors:
            assert _same(s.get_torch(name), ref[name]), name
        got = s.get_many(torch=True)
        assert all(_same(got[n], ref[n]) for n in tensors)
        assert _same(s.get_torch("big", rows=slice(100, 300)), ref["big"][100:300].contiguous())


def _hf_dir(path, n_layers: int = 3, hidden: int = 64, vocab: int = 500) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden)}
    for i in range(n_layers):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            shape = (hidden,) if "norm" in n else (hidden, hidden)
            sd[f"model.layers.{i}.{n}.weight"] = torch.randn(*shape)
    sd["model.norm.weight"] = torch.randn(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden)
    sd["model.rotary.inv_freq_int"] = torch.arange(10)  # an integer tensor: never cast
    names = list(sd)
    rng = np.random.default_rng(0)
    rng.shuffle(names)  # shards list tensors out of layer order, as real checkpoints do
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    wmap = {}
    os.makedirs(path, exist_ok=True)
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        safetensors_torch.save_file({n: sd[n] for n in part}, os.path.join(path, fname))
        wmap.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": n_layers}, f)
    return sd


def test_hf_directory_read_in_place(tmp_path):
    sd = _hf_dir(tmp_path / "hf")
    with open_store(tmp_path / "hf") as s:
        assert sorted(s.keys()) == sorted(sd)
        assert s.metadata["hf_config"]["model_type"] == "llama"
        got = s.get_many(torch=True)
        assert all(_same(got[n], sd[n]) for n in sd)


# -- convert -----------------------------------------------------------------------
def test_convert_hf_directory_groups_layers(tmp_path):
    sd = _hf_dir(tmp_path / "hf")
    res = convert(tmp_path / "hf", tmp_path / "m.lts", progress=False, chunk_bytes=4096)  # force row chunks
    assert res.tensors == len(sd) and res.bytes_read == res.bytes_written == sum(t.nbytes for t in sd.values())
    with open_store(tmp_path / "m.lts") as s:
        got = s.get_many(torch=True)
        assert all(_same(got[n], sd[n]) for n in sd)
        assert s.metadata["hf_config"]["num_hidden_layers"] == 3 and s.metadata["source"] == "hf"
        infos = sorted(s.infos(), key=lambda t: t.offset)
        order = [i.tags.get("layer", -1) for i in infos]
        assert infos[0].name == "model.embed_tokens.weight"
        layered = [x for x in order if x != -1]
        assert layered == sorted(layered)  # each layer one contiguous range, in order
        first, last = order.index(0), len(order) - 1 - order[::-1].index(2)
        assert all(x != -1 for x in order[first : last + 1])
        assert s.info("model.layers.1.mlp.up_proj.weight").tags == {"kind": "mlp", "layer": 1}
        assert s.info("model.layers.0.self_attn.q_proj.weight").tags["kind"] == "attn"
        assert s.info("lm_head.weight").tags == {"kind": "lm_head"}


def test_convert_casts_floats_only(tmp_path):
    sd = _hf_dir(tmp_path / "hf", n_layers=1)
    convert(tmp_path / "hf", tmp_path / "m.lts", dtype="bf16", progress=False, chunk_bytes=8192)
    with open_store(tmp_path / "m.lts") as s:
        for n, t in sd.items():
            want = t.to(torch.bfloat16) if t.is_floating_point() else t
            assert _same(s.get_torch(n), want), n
        assert s.metadata["cast_to"] == "bfloat16"
    with pytest.raises(ValueError, match="floating"):
        convert(tmp_path / "hf", tmp_path / "x.lts", dtype="int8", progress=False)


def test_convert_store_to_sharded_store_checks_source(tmp_path):
    tensors, tags = _layered(4, elems=20_000)
    write_store(tmp_path / "a.lts", tensors, tags=tags)
    convert(tmp_path / "a.lts", tmp_path / "b", max_shard_bytes=200_000, progress=False, chunk_bytes=4096)
    with open_store(tmp_path / "b") as s:
        for n, v in s.get_many().items():
            np.testing.assert_array_equal(v, tensors[n])
        assert s.info("layers.2.w1").tags == {"layer": 2, "kind": "other"}


def test_layer_order_and_tags():
    names = ["lm_head.weight", "model.layers.10.mlp.w", "model.layers.2.self_attn.q_proj.weight",
             "model.embed_tokens.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight"]
    assert layer_order(names) == ["model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight",
                                  "model.layers.2.input_layernorm.weight", "model.layers.10.mlp.w",
                                  "lm_head.weight", "model.norm.weight"]
    assert tags_for("transformer.h.3.attn.c_attn.weight") == {"kind": "attn", "layer": 3}
    assert tags_for("transformer.wte.weight") == {"kind": "embed"}


# -- inspect and the CLI --------------------------------------------------------------
def test_inspect_and_convert_cli(tmp_path, capsys):
    _hf_dir(tmp_path / "hf", n_layers=2)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.lts"), "--no-progress"]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m.lts"), "--verify", "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "verified:" in out and "0 bad" in out and "2 decoder layers" in out and "model.norm.weight" in out
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    assert "safetensors" in capsys.readouterr().out
    d = describe(tmp_path / "m.lts")
    assert d["aligned_tensors"] == d["tensors"] and set(d["per_layer"]) == {"0", "1", "-"}
    assert main(["inspect", str(tmp_path / "nope.lts")]) == 1
    assert "error" in capsys.readouterr().err


def test_get_many_into_caller_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "WINDOW_BYTES", 64 << 10)
    tensors = {f"t{i}": torch.randn(100 + i, 37) for i in range(12)}
    write_store(tmp_path / "s.lts", tensors)
    out = {n: torch.empty_like(t) for n, t in tensors.items()}  # torch's own (not page-aligned) memory
    with open_store(tmp_path / "s.lts") as s:
        got = s.get_many(out=out)
        assert all(got[n] is out[n] and torch.equal(out[n], tensors[n]) for n in tensors)
        part = {"t3": np.empty((103, 37), np.float32)}
        s.get_many(out=part)
        np.testing.assert_array_equal(part["t3"], tensors["t3"].numpy())
        with pytest.raises(ValueError, match="bytes"):
            s.get_many(out={"t0": np.empty(3, np.float32)})
        with pytest.raises(ValueError, match="no buffer"):
            s.get_many(["t1"], out={})


def test_numpy_scalars_are_stored_as_0d(tmp_path):
    write_store(tmp_path / "s.lts", {"s": np.float64(2.5), "i": np.int32(-7)})
    with open_store(tmp_path / "s.lts") as s:
        assert s.get("s").shape == () and float(s.get("s")) == 2.5 and int(s.get("i")) == -7


def test_big_endian_arrays_round_trip_by_value(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    write_store(tmp_path / "s.lts", {"a": a})
    with open_store(tmp_path / "s.lts") as s:
        np.testing.assert_array_equal(s.get("a"), a.astype("<f4"))


def test_open_store_keeps_reading_the_file_it_opened(tmp_path):
    path = tmp_path / "s.lts"
    write_store(path, {"a": np.arange(100_000, dtype=np.int64)})
    with open_store(path) as s:
        write_store(path, {"b": np.zeros(7)})  # renamed over the path after the index was read
        assert s.get("a", rows=slice(10, 12)).tolist() == [10, 11]
        assert s.get("a", verify=False)[-1] == 99_999
    with open_store(path) as s:
        assert s.keys() == ["b"]


def test_one_sharded_writer_at_a_time(tmp_path):
    from llmtier.errors import LLMTierError

    d = tmp_path / "d"
    w1 = StoreWriter(d, max_shard_bytes=1 << 20)
    with pytest.raises(LLMTierError, match="another process"):
        StoreWriter(d, max_shard_bytes=1 << 20)
    w1.add("x", np.ones(3))
    w1.close()
    write_store(d, {"y": np.zeros(2)}, max_shard_bytes=1 << 20)  # the lock was released
    with open_store(d) as s:
        assert s.keys() == ["y"]


def test_get_many_error_waits_for_reads_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "WINDOW_BYTES", 64 << 10)
    path = tmp_path / "s.lts"
    write_store(path, {f"t{i}": np.full(60_000, i, np.uint8) for i in range(4)})
    with open_store(path) as s:
        off = s.info("t0").offset
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff")
    out = {f"t{i}": np.zeros(60_000, np.uint8) for i in range(4)}
    with open_store(path) as s, pytest.raises(ChecksumError):
        s.get_many(out=out)
    snapshot = {n: v.copy() for n, v in out.items()}
    import time

    time.sleep(0.2)
    assert all(np.array_equal(snapshot[n], out[n]) for n in out)  # nothing still writing into them


def test_hf_directory_with_broken_config_still_reads(tmp_path):
    sd = _hf_dir(tmp_path / "hf", n_layers=1)
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with open_store(tmp_path / "hf") as s:
        assert "hf_config" not in s.metadata and "not valid JSON" in s.metadata["hf_config_error"]
        assert _same(s.get_torch("lm_head.weight"), sd["lm_head.weight"])
