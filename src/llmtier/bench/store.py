"""``llmtier bench store``: load a whole model from a store, next to what people use today.

The study, end to end, on the user's own disk:

1. A synthetic LLaMA-like checkpoint in Hugging Face layout (``config.json``,
   ``model.safetensors.index.json``, bf16 safetensors shards of about 1 GiB)
   of a target size is generated once and cached in the study directory
   (``manifest.json`` records how it was made; it is reused while the
   manifest matches the requested checkpoint and every file has its recorded
   size).  Weights are random bf16 of weight-like magnitude (no NaN/Inf).
2. It is converted to a single-file store by :func:`llmtier.store.convert.convert`
   in a child process that reports its throughput and peak resident memory
   (``VmHWM`` of the whole process, interpreter included; ``ru_maxrss`` is
   recorded too, but on Linux it includes the parent's RSS at fork, so it is
   no measure of the child), checked against the bound *largest tensor +
   512 MiB*.  One conversion per study, page cache dropped before it.  A ``torch.save`` copy of the same
   tensors (for ``torch.load``) is made once and cached.
3. Every loader loads every tensor, each run in a fresh child process (so one
   loader's page cache, allocator state or mapped files never help the next
   and peak RSS is per loader); only the load is timed, after the imports.
   Rounds interleave the loaders and fio, which reads the whole store file in
   every round; the order rotates each round, so no loader always follows
   the same one.  A warm-up round (loaders only) is not recorded.
   The page cache is dropped before every run where permitted.  Each row
   reports the median of the rounds and min-max.  In the first run of every
   loader the loaded tensors' CRC-32Cs are taken (after the timing) and all
   loaders must agree, bit for bit, with the checkpoint's tensors.

Loaders (``LOADERS``).  A load is done when the bytes are in memory: a
loader that only maps the file and returns (``torch.load(mmap=True)``, and
``safetensors.torch.load_file`` itself, whose default "mmap" backend hands out
views of a file mapping) has read nothing yet.  Those rows include reading one
byte of every 4 KiB page of every tensor: it faults every page in (the
kernel's read-around brings the rest) at a CPU cost of one byte per page, so
they measure making the bytes resident, not a copy.

``llmtier``            ``open_store(store).get_many(torch=True)``, CRC-32C verified (the default)
``llmtier-noverify``   the same with ``verify=False``: the price of verification
``llmtier-resident``   ``get_many(out=buffers)`` into page-aligned tensors allocated and touched before
                       the timing (a runtime's buffer pool, or a model's parameters): the load without
                       the first-touch cost of fresh memory, which on this VM is 0.3-1.5 s per GiB
``safetensors``        ``safetensors.torch.load_file`` of every shard of the HF checkpoint, then the
                       page touch; the baseline of the "vs safetensors" ratio
``safetensors-pread``  ``load_file(shard, backend="pread")`` (safetensors >= 0.8): reads into
                       private memory, no touch needed; skipped with a note where unsupported
``torch-mmap``         ``torch.load(copy, mmap=True, weights_only=True)`` of the ``torch.save``
                       copy, then the page touch
``llmtier-hf``         (not in the default set) ``open_store(hf_dir)``: the safetensors shards
                       read in place through the engine (widened unaligned reads)

fio (``--rw=read --bs=1M --iodepth=32 --ioengine=io_uring --direct=1``) reads the
whole store file: the device ceiling, measured in the same rounds.

GB/s here is 10^9 bytes of tensor data per second.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LLMTierError
from .fio import fio_available, run_fio
from .system import drop_page_cache, status_bytes

if TYPE_CHECKING:
    import argparse

    import numpy as np

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LOADERS = ("llmtier", "llmtier-noverify", "llmtier-resident", "safetensors", "safetensors-pread", "torch-mmap",
           "llmtier-hf")
DEFAULT_LOADERS = LOADERS[:6]
LABELS = {
    "llmtier": "llmtier get_many (CRC verified)",
    "llmtier-noverify": "llmtier get_many (verify=False)",
    "llmtier-resident": "llmtier get_many(out=resident buffers) (CRC verified)",
    "safetensors": "safetensors load_file + touch",
    "safetensors-pread": "safetensors load_file(backend=pread)",
    "torch-mmap": "torch.load(mmap=True) + touch",
    "llmtier-hf": "llmtier, safetensors in place",
    "fio": "fio seq read (ceiling)",
}
RSS_SLACK = 512 * MiB  # the convert bound: largest tensor + this
FIO_BS, FIO_QD = 1 * MiB, 32
MANIFEST = "manifest.json"
MARKER = ".llmtier-bench-store"  # in hf/: this directory was made by the study and may be replaced
MANIFEST_VERSION = 1
HF_DIR, STORE_FILE, TORCH_FILE = "hf", "store.lts", "state_dict.pt"
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "llmtier-bench-store")


class StoreBenchError(LLMTierError, RuntimeError):
    """A step of the store study failed (a child process, or loaders that disagree)."""


# -- the synthetic checkpoint --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """A LLaMA-shaped decoder: what the synthetic checkpoint's tensors are."""

    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        p = f"model.layers.{i}."
        return [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor, in the order Hugging Face checkpoints list them."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += self.layer_tensors(i)
        return out + [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * 2 for _, s in self.tensors())

    @property
    def layer_bytes(self) -> int:
        return sum(math.prod(s) * 2 for _, s in self.layer_tensors(0))

    def hf_config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.layers, "vocab_size": self.vocab,
                "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "llmtier_note": "synthetic random weights made by `llmtier bench store`"}


# (hidden, intermediate, vocab, heads, kv_heads), smallest first; the largest is TinyLlama-1.1B's shape.
PRESETS = ((256, 704, 8192, 4, 1), (512, 1408, 16384, 8, 2), (1024, 2816, 32000, 16, 4), (2048, 5632, 32000, 32, 4))


def choose_arch(size: int, hidden: int | None = None) -> Arch:
    """The widest preset whose embedding + head take at most a quarter of ``size``
    and that still has at least 8 layers; layers fill up to ``size``.
    ``hidden`` picks a preset by its hidden size instead."""
    presets = [p for p in PRESETS if p[0] == hidden] if hidden else list(PRESETS)
    if not presets:
        raise ValueError(f"hidden must be one of {[p[0] for p in PRESETS]}, got {hidden}")

    def fit(p: tuple[int, ...]) -> Arch:
        a = Arch(*p, layers=0)
        return Arch(*p, layers=max(1, round((size - a.nbytes) / Arch(*p, layers=1).layer_bytes)))

    if hidden:
        return fit(presets[0])
    good = [fit(p) for p in presets if Arch(*p, layers=0).nbytes <= size / 4 and fit(p).layers >= 8]
    return good[-1] if good else fit(presets[0])


def _fill(shape: tuple[int, ...], name: str, seed: int, index: int) -> np.ndarray:
    """Random bf16 bits (as uint16) of weight-like magnitude: sign and 7 mantissa bits
    random, exponent 120..123 (|w| in [0.0078, 0.125)); norm weights in [1, 2)."""
    import numpy as np  # noqa: PLC0415 - keeps `llmtier --help` (which imports this module) fast

    n = math.prod(shape)
    raw = np.random.SFC64([seed, index]).random_raw(-(-n // 4)).view(np.uint16)[:n]
    if name.endswith("norm.weight"):
        out = np.bitwise_and(raw, 0x007F)
        np.bitwise_or(out, 0x3F80, out=out)
    else:
        out = np.bitwise_and(raw, 0x81FF)
        np.bitwise_or(out, 0x3C00, out=out)
    return out.reshape(shape)


@dataclass
class Checkpoint:
    """The generated inputs of the study and what they hold."""

    directory: str
    arch: Arch
    tensors: int
    nbytes: int
    largest_tensor: int
    shards: list[str]
    torch_file: str | None = None
    reused: bool = False

    @property
    def hf_dir(self) -> str:
        return os.path.join(self.directory, HF_DIR)

    def record(self) -> dict[str, Any]:
        return {"hf_dir": self.hf_dir, "arch": asdict(self.arch), "tensors": self.tensors, "bytes": self.nbytes,
                "largest_tensor_bytes": self.largest_tensor, "shards": [os.path.basename(s) for s in self.shards],
                "torch_file": self.torch_file, "reused": self.reused}


def _manifest_key(arch: Arch, seed: int, shard_bytes: int) -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "arch": asdict(arch), "seed": seed, "shard_bytes": shard_bytes}


def _read_manifest(directory: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_manifest(directory: str, doc: dict[str, Any]) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def _files_ok(directory: str, files: Any) -> bool:
    if not isinstance(files, dict) or not files:
        return False
    return all(os.path.isfile(os.path.join(directory, k)) and os.path.getsize(os.path.join(directory, k)) == v
               for k, v in files.items())


def ensure_checkpoint(directory: str, arch: Arch, *, seed: int = 0, shard_bytes: int = 1 * GiB,
                      progress: bool = True) -> Checkpoint:
    """The synthetic HF checkpoint in ``directory/hf``: reused when the manifest matches, else (re)generated."""
    names = arch.tensors()
    sizes = [math.prod(s) * 2 for _, s in names]
    key = _manifest_key(arch, seed, shard_bytes)
    doc = _read_manifest(directory)
    ck = Checkpoint(directory, arch, len(names), sum(sizes), max(sizes), [])
    if doc and doc.get("key") == key and _files_ok(directory, doc.get("files")):
        ck.shards = [os.path.join(directory, p) for p in doc["shards"]]
        ck.reused = True
        tf = doc.get("torch_file")
        if isinstance(tf, dict) and _files_ok(directory, tf):
            ck.torch_file = os.path.join(directory, next(iter(tf)))
        return ck
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415 - bench extra
    from safetensors.torch import save_file  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    # Start over: nothing of an older checkpoint is trusted.  A directory hf/ that this
    # study did not make (no marker file in it) is never deleted.
    hf = os.path.join(directory, HF_DIR)
    if os.path.exists(hf) and not os.path.exists(os.path.join(hf, MARKER)):
        raise StoreBenchError(f"{hf} exists and was not made by `llmtier bench store`; choose another --dir")
    if os.path.exists(os.path.join(directory, MANIFEST)):
        os.unlink(os.path.join(directory, MANIFEST))
    shutil.rmtree(hf, ignore_errors=True)
    for stale in (TORCH_FILE, STORE_FILE):
        if os.path.exists(os.path.join(directory, stale)):
            os.unlink(os.path.join(directory, stale))
    os.makedirs(hf)
    open(os.path.join(hf, MARKER), "w").close()
    groups: list[list[int]] = [[]]
    acc = 0
    for i, n in enumerate(sizes):
        if groups[-1] and acc + n > shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += n
    weight_map: dict[str, str] = {}
    with tqdm(total=ck.nbytes, unit="B", unit_scale=True, desc="generate checkpoint", disable=not progress,
              leave=False) as bar:
        for g, idx in enumerate(groups):
            fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
            shard: dict[str, Any] = {}
            for i in idx:
                name, shape = names[i]
                shard[name] = torch.from_numpy(_fill(shape, name, seed, i).view(np.int16)).view(torch.bfloat16)
                weight_map[name] = fname
                bar.update(sizes[i])
            path = os.path.join(hf, fname)
            save_file(shard, path, metadata={"format": "pt"})
            del shard
            ck.shards.append(path)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": ck.nbytes}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(arch.hf_config(), f, indent=1)
    os.sync()
    files = {os.path.relpath(os.path.join(hf, e), directory): os.path.getsize(os.path.join(hf, e))
             for e in sorted(os.listdir(hf))}
    _write_manifest(directory, {"key": key, "files": files,
                                "shards": [os.path.relpath(s, directory) for s in ck.shards]})
    return ck


def ensure_torch_copy(ck: Checkpoint) -> str:
    """The ``torch.save`` copy of the checkpoint's tensors (made in a child, cached in the manifest)."""
    if ck.torch_file:
        return ck.torch_file
    path = os.path.join(ck.directory, TORCH_FILE)
    _child({"op": "torch-save", "shards": ck.shards, "out": path})
    doc = _read_manifest(ck.directory) or {}
    doc["torch_file"] = {TORCH_FILE: os.path.getsize(path)}
    _write_manifest(ck.directory, doc)
    ck.torch_file = path
    return path


# -- configuration and results ------------------------------------------------------------------------------------
@dataclass
class StoreBenchConfig:
    """Knobs of :func:`run_store_bench`."""

    directory: str = DEFAULT_DIR
    size: int = int(2.5 * GiB)  # target checkpoint size (bytes of tensor data)
    rounds: int = 5  # measured rounds
    warmup: bool = True  # one more round first, not recorded
    loaders: tuple[str, ...] = DEFAULT_LOADERS
    fio: bool = True  # fio's sequential read of the store in every round
    drop_cache: bool = True  # drop the page cache before every run (needs root)
    shard_bytes: int = 1 * GiB  # HF shard size
    hidden: int | None = None  # force a preset by its hidden size
    seed: int = 0
    keep_store: bool = False  # keep the converted store afterwards
    clean: bool = False  # remove everything generated afterwards (checkpoint and torch copy too)

    def __post_init__(self) -> None:
        unknown = set(self.loaders) - set(LOADERS)
        if unknown:
            raise ValueError(f"unknown loader(s) {','.join(sorted(unknown))}; choose from {','.join(LOADERS)}")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")


@dataclass
class Row:
    """One loader (or fio): medians over the measured rounds."""

    name: str
    label: str
    runs: int = 0
    gbps: float = 0.0
    gbps_min: float = 0.0
    gbps_max: float = 0.0
    seconds: float = 0.0  # median
    cpu_s: float = 0.0  # median CPU seconds of the load (child process, all threads)
    bytes: int = 0
    tensors: int = 0
    peak_rss: int = 0  # max over runs of the child's VmHWM (bytes; fio: not measured, 0)
    baseline_rss: int = 0  # RSS of the child after its imports, before the load (max over runs)
    vs_fio: float | None = None
    vs_safetensors: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def finish(self) -> None:
        rates = [s["bytes"] / s["seconds"] / 1e9 for s in self.samples]
        self.runs = len(rates)
        self.gbps = statistics.median(rates)
        self.gbps_min, self.gbps_max = min(rates), max(rates)
        self.seconds = statistics.median(s["seconds"] for s in self.samples)
        self.cpu_s = statistics.median(s.get("cpu_s", 0.0) for s in self.samples)
        self.bytes = self.samples[0]["bytes"]
        self.tensors = self.samples[0].get("tensors", 0)
        self.peak_rss = max(s.get("peak_rss", 0) for s in self.samples)
        self.baseline_rss = max(s.get("baseline_rss", 0) for s in self.samples)


@dataclass
class ConvertStats:
    """The measured conversion (one run) and the resident-memory bound."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    gbps: float
    peak_rss: int  # VmHWM of the converting process (whole process, interpreter included)
    ru_maxrss: int  # its ru_maxrss: an upper bound only (includes the parent's RSS at fork)
    baseline_rss: int  # its RSS after imports, before converting
    largest_tensor: int
    bound: int  # largest_tensor + RSS_SLACK
    held: bool  # peak_rss <= bound
    store_file: str
    store_file_bytes: int


@dataclass
class StoreBenchResult:
    config: dict[str, Any]
    checkpoint: dict[str, Any]
    convert: ConvertStats
    rows: list[Row]
    fio: Row | None
    cold: bool  # the page cache was dropped before every run
    digests_agree: bool
    engine: str
    notes: list[str]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance"] = acceptance(self)
        return d


# -- the study -----------------------------------------------------------------------------------------------------
def run_store_bench(cfg: StoreBenchConfig, progress: bool = True) -> StoreBenchResult:
    """Generate (or reuse) the checkpoint, convert it, and time every loader."""
    from tqdm import tqdm  # noqa: PLC0415

    os.makedirs(cfg.directory, exist_ok=True)
    notes: list[str] = []
    arch = choose_arch(cfg.size, cfg.hidden)
    ck = ensure_checkpoint(cfg.directory, arch, seed=cfg.seed, shard_bytes=cfg.shard_bytes, progress=progress)
    notes.append(f"checkpoint: {'reused' if ck.reused else 'generated'} {ck.hf_dir} ({len(ck.shards)} shards, "
                 f"hidden {arch.hidden}, {arch.layers} layers)")
    store = os.path.join(cfg.directory, STORE_FILE)
    try:
        cold = False
        if cfg.drop_cache:
            cold, msg = drop_page_cache()
            notes.append(msg if cold else msg + "; results are WARM (loaders may read from the page cache)")
        else:
            notes.append("page cache not dropped (drop_cache=False): results are warm for the buffered loaders")
        conv = _convert(ck, store)
        paths = {"store": store, "shards": ck.shards, "hf_dir": ck.hf_dir}
        if "torch-mmap" in cfg.loaders:
            paths["torch_file"] = ensure_torch_copy(ck)
        fio_ok, fio_msg = fio_available() if cfg.fio else (False, "fio not run (fio=False)")
        notes.append(f"ceiling: {fio_msg}, --rw=read --bs=1M --iodepth=32 --ioengine=io_uring --direct=1"
                     if fio_ok else f"{fio_msg}: no ceiling, ratios vs fio skipped")
        rows = {n: Row(n, LABELS[n]) for n in cfg.loaders}
        fio_row = Row("fio", LABELS["fio"]) if fio_ok else None
        digests: dict[str, str] = {}
        engine = ""
        order = [*cfg.loaders, *(["fio"] if fio_row is not None else [])]
        fio_bytes = os.path.getsize(store) // FIO_BS * FIO_BS  # the whole store file (it ends on a 4 KiB boundary)
        rounds = range(0 if cfg.warmup else 1, cfg.rounds + 1)  # round 0 is the warm-up, not recorded
        total = sum(len(order) - (0 if rnd else 1 if fio_row is not None else 0) for rnd in rounds)
        with tqdm(total=total, desc="bench store", unit="run", disable=not progress, leave=False) as bar:
            for rnd in rounds:
                k = rnd % len(order)
                for name in order[k:] + order[:k]:  # rotated: no loader always follows the same one
                    if name == "fio" and not rnd:
                        continue
                    if cold:
                        drop_page_cache()
                    if name == "fio":
                        r = run_fio(store, "read", FIO_BS, FIO_QD, fio_bytes, direct=True, ioengine="io_uring")
                        fio_row.samples.append({"seconds": r.runtime_s, "bytes": r.bytes,  # type: ignore[union-attr]
                                                "cpu_s": r.usr_s + r.sys_s})
                        bar.update()
                        continue
                    res = _child({"op": "load", "loader": name, "paths": paths, "digest": name not in digests})
                    if "skip" in res:
                        notes.append(f"{name} skipped: {res['skip']}")
                        order.remove(name)
                        del rows[name]
                        bar.update()
                        bar.total -= sum(1 for later in rounds if later > rnd)
                        bar.refresh()
                        continue
                    if name not in digests:
                        digests[name] = res.pop("digest")
                    if res.get("engine"):
                        engine = res["engine"]
                    _check_counts(name, res, ck)
                    if rnd:
                        rows[name].samples.append(res)
                    bar.update()
        for r in rows.values():
            r.finish()
        if fio_row is not None:
            fio_row.finish()
        st = rows.get("safetensors")
        for r in [*rows.values(), *([fio_row] if fio_row else [])]:
            r.vs_fio = r.gbps / fio_row.gbps if fio_row else None
            r.vs_safetensors = r.gbps / st.gbps if st else None
        agree = len(set(digests.values())) == 1
        if not agree:
            raise StoreBenchError("loaders disagree on the tensors' contents: "
                                  + ", ".join(f"{k} {v[:12]}" for k, v in digests.items()))
        notes.append(f"content: every loader's tensors match bit for bit (CRC-32C per tensor, first run of each; "
                     f"digest {next(iter(digests.values()))[:16]})")
        touch = [n for n in ("safetensors", "torch-mmap") if n in rows]
        if touch:
            notes.append(f"{' and '.join(touch)}: the library call only maps the file (reads nothing); the row "
                         "includes reading one byte of every 4 KiB page of every tensor, which faults it all in")
        if engine:
            notes.append(f"llmtier engine: {engine}")
        cfg_rec = asdict(cfg)
        return StoreBenchResult(cfg_rec, ck.record(), conv, list(rows.values()), fio_row, cold, agree, engine, notes)
    finally:
        if cfg.clean:
            if os.path.exists(os.path.join(cfg.directory, HF_DIR, MARKER)):
                shutil.rmtree(os.path.join(cfg.directory, HF_DIR), ignore_errors=True)
            for p in (MANIFEST, TORCH_FILE, STORE_FILE):
                if os.path.exists(os.path.join(cfg.directory, p)):
                    os.unlink(os.path.join(cfg.directory, p))
        elif not cfg.keep_store and os.path.exists(store):
            os.unlink(store)


def _check_counts(name: str, res: dict[str, Any], ck: Checkpoint) -> None:
    if res["tensors"] != ck.tensors or res["bytes"] != ck.nbytes:
        raise StoreBenchError(f"loader {name} loaded {res['tensors']} tensors, {res['bytes']} bytes; the checkpoint "
                              f"has {ck.tensors} tensors, {ck.nbytes} bytes")


def _convert(ck: Checkpoint, store: str) -> ConvertStats:
    if os.path.exists(store):
        os.unlink(store)
    r = _child({"op": "convert", "src": ck.hf_dir, "dst": store})
    bound = ck.largest_tensor + RSS_SLACK
    return ConvertStats(r["tensors"], r["bytes_read"], r["bytes_written"], r["seconds"],
                        r["bytes_read"] / r["seconds"] / 1e9, r["peak_rss"], r["ru_maxrss"], r["baseline_rss"],
                        ck.largest_tensor, bound, r["peak_rss"] <= bound, store,
                        os.path.getsize(store))


def acceptance(res: StoreBenchResult) -> dict[str, Any]:
    """The issue's acceptance figures (from the CRC-verified llmtier row)."""
    ll = res.row("llmtier")
    out: dict[str, Any] = {"convert_peak_rss_held": res.convert.held}
    if ll is not None:
        out["load_vs_fio"] = ll.vs_fio
        out["load_vs_fio_ok"] = None if ll.vs_fio is None else ll.vs_fio >= 0.9
        out["load_vs_safetensors"] = ll.vs_safetensors
        out["load_vs_safetensors_ok"] = None if ll.vs_safetensors is None else ll.vs_safetensors >= 2.0
        pread = res.row("safetensors-pread")
        out["load_vs_safetensors_pread"] = ll.gbps / pread.gbps if pread else None
        res_row = res.row("llmtier-resident")
        out["resident_vs_fio"] = res_row.vs_fio if res_row else None
        out["resident_vs_safetensors"] = res_row.vs_safetensors if res_row else None
        out["size_ok"] = res.checkpoint["bytes"] >= 2 * GiB
        out["rounds_ok"] = ll.runs >= 5
        out["cold"] = res.cold
    return out


# -- presentation --------------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def format_report(res: StoreBenchResult) -> str:
    ck = res.checkpoint
    rounds = res.rows[0].runs if res.rows else 0
    lines = [f"load every tensor: {ck['tensors']} tensors, {_human(ck['bytes'])} (bf16, "
             f"{ck['arch']['layers']} layers, hidden {ck['arch']['hidden']}); median [min-max] of {rounds} rounds, "
             + ("page cache dropped before each run" if res.cold else "page cache NOT dropped (warm)")]
    header = ["loader", "GB/s", "s", "CPU s", "vs fio", "vs safetensors", "peak RSS (load's share)"]
    table = []
    for r in [*res.rows, *([res.fio] if res.fio else [])]:
        table.append([r.label, f"{r.gbps:.2f} [{r.gbps_min:.2f}-{r.gbps_max:.2f}]", f"{r.seconds:.2f}",
                      f"{r.cpu_s:.2f}", "-" if r.vs_fio is None else f"{r.vs_fio:.2f}x",
                      "-" if r.vs_safetensors is None else f"{r.vs_safetensors:.2f}x",
                      "-" if not r.peak_rss else f"{_human(r.peak_rss)} (+{_human(r.peak_rss - r.baseline_rss)})"])
    widths = [max(len(x[i]) for x in [header, *table]) for i in range(len(header))]
    fmt = lambda row: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, table)]
    c = res.convert
    lines.append(f"\nconvert (one run): {c.tensors} tensors, {_human(c.bytes_read)} in {c.seconds:.2f} s "
                 f"({c.gbps:.2f} GB/s); peak RSS (VmHWM) {_human(c.peak_rss)}, "
                 f"{_human(c.baseline_rss)} of it before converting; bound largest tensor {_human(c.largest_tensor)} "
                 f"+ 512 MiB = {_human(c.bound)}: {'held' if c.held else 'EXCEEDED'}")
    a = acceptance(res)
    if "load_vs_fio" in a:
        fio = "n/a (no fio)" if a["load_vs_fio"] is None else \
            f"{a['load_vs_fio']:.2f}x ({'ok' if a['load_vs_fio_ok'] else 'FAILS'} >= 0.9)"
        st = "n/a" if a["load_vs_safetensors"] is None else \
            f"{a['load_vs_safetensors']:.2f}x ({'ok' if a['load_vs_safetensors_ok'] else 'FAILS'} >= 2)"
        if a["load_vs_safetensors_pread"] is not None:
            st += f", vs safetensors pread {a['load_vs_safetensors_pread']:.2f}x"
        caveats = [w for w, bad in (("store < 2 GiB", not a["size_ok"]), ("fewer than 5 rounds", not a["rounds_ok"]),
                                    ("warm page cache", not a["cold"])) if bad]
        lines.append(f"acceptance (llmtier, CRC verified): vs fio {fio}; vs safetensors {st}; convert RSS "
                     f"{'held' if a['convert_peak_rss_held'] else 'EXCEEDED'}"
                     + (f"  [not a qualifying run: {', '.join(caveats)}]" if caveats else ""))
        if a.get("resident_vs_fio") is not None and a.get("resident_vs_safetensors") is not None:
            lines.append(f"into resident buffers (llmtier-resident, CRC verified): vs fio {a['resident_vs_fio']:.2f}x, "
                         f"vs safetensors {a['resident_vs_safetensors']:.2f}x")
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def write_json(res: StoreBenchResult, path: str | os.PathLike[str]) -> None:
    with open(path, "w") as f:
        json.dump(res.record(), f, indent=1)
        f.write("\n")


# -- child processes -----------------------------------------------------------------------------------------------
def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh interpreter; returns its JSON answer (the last line of its stdout)."""
    import llmtier  # noqa: PLC0415

    src = os.path.dirname(os.path.dirname(os.path.abspath(llmtier.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-c", "from llmtier.bench.store import _child_main; _child_main()", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise StoreBenchError(f"{job['op']} {job.get('loader', '')} failed in its child process (exit "
                              f"{proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise StoreBenchError(f"{job['op']}: no JSON answer from the child ({exc}):\n{proc.stdout[-2000:]}"
                              f"{proc.stderr[-2000:]}") from None


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak() -> dict[str, int]:
    """This process's peak RSS: ``VmHWM`` of its own address space.  ``ru_maxrss`` is
    reported too but is no measure here: Linux carries the parent's RSS at
    fork/exec into it (a child of a 500 MiB parent starts at ru_maxrss 500 MiB)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": status_bytes("VmHWM") or maxrss, "ru_maxrss": maxrss}


def _digest(tensors: dict[str, Any]) -> str:
    """One hash of every tensor's name, dtype, shape and CRC-32C of its bytes."""
    import hashlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..store.format import crc32c  # noqa: PLC0415

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        h.update(json.dumps([name, str(t.dtype), list(t.shape), crc32c(raw)]).encode())
    return h.hexdigest()


def _touch(tensors: dict[str, Any]) -> int:
    """Read one byte of every 4 KiB page (and the last byte) of every tensor: faults
    lazily mapped data in at a CPU cost of one byte per page."""
    import torch  # noqa: PLC0415

    acc = 0
    for t in tensors.values():
        if t.numel():
            u = t.reshape(-1).view(torch.uint8)
            acc += int(u[::4096].sum()) + int(u[-1])
    return acc


def _load(loader: str, paths: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..store import open_store  # noqa: PLC0415

    kw: dict[str, Any] = {}
    if loader.startswith("safetensors"):
        import inspect  # noqa: PLC0415

        from safetensors.torch import load_file  # noqa: PLC0415

        if loader == "safetensors-pread":
            if "backend" not in inspect.signature(load_file).parameters:
                return {"skip": "this safetensors has no load_file(backend=...) (added in 0.8)"}
            kw["backend"] = "pread"
    engine = ""
    touched = 0
    resident = None
    if loader == "llmtier-resident":  # the buffers exist (and are resident) before the load starts
        from ..engine import alloc  # noqa: PLC0415
        from ..store.dtypes import torch_dtype  # noqa: PLC0415
        from ..store.reader import read_index  # noqa: PLC0415

        resident = {}
        for t in read_index(paths["store"])[0]:
            buf = alloc(t.nbytes)
            buf[::4096] = 0
            resident[t.name] = torch.from_numpy(buf).view(torch_dtype(t.dtype)).reshape(t.shape)
    base = status_bytes("VmRSS")
    c0, t0 = _cpu(), time.perf_counter()
    if loader in ("llmtier", "llmtier-noverify", "llmtier-resident", "llmtier-hf"):
        with open_store(paths["hf_dir" if loader == "llmtier-hf" else "store"],
                        verify=loader != "llmtier-noverify") as s:
            tensors = s.get_many(out=resident) if resident is not None else s.get_many(torch=True)
            engine = f"{s.engine.name} ({getattr(s.engine, 'reason', '')})".replace(" ()", "")
    elif loader.startswith("safetensors"):
        tensors = {}
        for p in paths["shards"]:
            tensors.update(load_file(p, **kw))
        if loader == "safetensors":
            touched = _touch(tensors)
    elif loader == "torch-mmap":
        tensors = torch.load(paths["torch_file"], mmap=True, weights_only=True)
        touched = _touch(tensors)
    else:
        raise ValueError(f"unknown loader {loader!r}")
    t1, c1 = time.perf_counter(), _cpu()
    out = {"seconds": t1 - t0, "cpu_s": c1 - c0, "tensors": len(tensors),
           "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "baseline_rss": base,
           "engine": engine, "touched": touched, **_peak()}
    return out | {"_tensors": tensors}


def _child_main() -> None:
    job = json.loads(sys.argv[1])
    op = job["op"]
    if op == "load":
        res = _load(job["loader"], job["paths"])
        tensors = res.pop("_tensors", {})
        if job.get("digest") and "skip" not in res:
            res["digest"] = _digest(tensors)
    elif op == "convert":
        from ..store.convert import convert  # noqa: PLC0415

        base = status_bytes("VmRSS")
        r = convert(job["src"], job["dst"], progress=False)
        res = {"tensors": r.tensors, "bytes_read": r.bytes_read, "bytes_written": r.bytes_written,
               "seconds": r.seconds, "baseline_rss": base, **_peak()}
    elif op == "torch-save":
        import torch  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        sd: dict[str, Any] = {}
        for p in job["shards"]:
            sd.update(load_file(p))
        tmp = job["out"] + ".tmp"
        torch.save(sd, tmp)
        os.replace(tmp, job["out"])
        res = {"tensors": len(sd)}
    else:
        raise ValueError(f"unknown job {op!r}")
    sys.stdout.write(json.dumps(res) + "\n")


# -- the command line (registered by llmtier.cli_store) -------------------------------------------------------------
def add_cli(bench: Any, parse_size: Any) -> None:
    """Register ``llmtier bench store`` on the ``bench`` subparsers (this module imports only the stdlib
    at load time, so ``llmtier --help`` stays fast)."""
    p = bench.add_parser("store", help="load a whole model: llmtier store vs safetensors vs torch.load vs fio; "
                         "convert throughput and peak RSS")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"study directory; the generated checkpoint and its "
                   f"torch.save copy are cached here and reused (default {DEFAULT_DIR})")
    p.add_argument("--size", type=parse_size, default=int(2.5 * GiB), help="checkpoint size (default 2.5G)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds, after one warm-up round (default 5)")
    p.add_argument("--loaders", help=f"comma list of {','.join(LOADERS)} (default {','.join(DEFAULT_LOADERS)})")
    p.add_argument("--shard-size", type=parse_size, default=1 * GiB, help="size of the HF safetensors shards (1G)")
    p.add_argument("--no-fio", action="store_true", help="no fio ceiling")
    p.add_argument("--no-drop-cache", action="store_true",
                   help="do not drop the page cache before each run (results are then warm)")
    p.add_argument("--keep", action="store_true", help="also keep the converted store (default: deleted; the "
                   "checkpoint and torch copy are always kept unless --clean)")
    p.add_argument("--clean", action="store_true", help="delete everything generated when done")
    p.add_argument("--json", metavar="PATH", help="write the result (all samples) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cli_main)


def cli_main(args: argparse.Namespace) -> int:
    loaders = tuple(args.loaders.split(",")) if args.loaders else DEFAULT_LOADERS
    cfg = StoreBenchConfig(args.dir, size=args.size, rounds=args.rounds, loaders=loaders, fio=not args.no_fio,
                           drop_cache=not args.no_drop_cache, shard_bytes=args.shard_size, keep_store=args.keep,
                           clean=args.clean)
    print(f"llmtier bench store: {_human(cfg.size)} checkpoint in {cfg.directory}, {cfg.rounds} rounds + warm-up, "
          f"loaders {','.join(cfg.loaders)}", file=sys.stderr)
    res = run_store_bench(cfg, progress=not args.no_progress)
    print(format_report(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


__all__ = ["DEFAULT_LOADERS", "LOADERS", "Arch", "Checkpoint", "ConvertStats", "Row", "StoreBenchConfig",
           "StoreBenchError", "StoreBenchResult", "acceptance", "add_cli", "choose_arch", "cli_main", "ensure_checkpoint",
           "ensure_torch_copy", "format_report", "run_store_bench", "write_json"]
