"""``PrefixStore``: the KV of processed prompts, in chunks on SSD, reused across requests and restarts.

A chunk is ``chunk_tokens`` tokens of one sequence, every layer:
``[L, 2 (K, V), H, C, D]``, written as a one-tensor llmtier store (magic,
version, CRC-32C, atomic commit; ``docs/FORMAT.md``).  Its key chains the
previous chunk's key, the model's identity (config and dtype) and the token
ids::

    key_0 = blake2b(model_id | tokens[0:C])      key_j = blake2b(key_{j-1} | tokens[jC:(j+1)C])

so equal keys mean equal prefixes of the same model.  The chunk files are the
index: at start-up each header is read and checked (magic, checksums, the key
recomputed from the stored tokens, the extent inside the file, a parent for
every chunk but the first); what fails is deleted.  Payloads are verified by
checksum on every load; a chunk that fails is deleted, it and everything
after it is recomputed, and ``metrics().corrupt`` counts it.

Loads read every chunk of every row in one engine batch (direct I/O, deep
queue).  A DRAM tier of ``memory`` bytes keeps recently used chunks.  The SSD
tier is capped at ``capacity`` bytes; eviction is LRU with ties broken
against later chunks, and an evicted chunk takes its descendants along
(nothing can reach them).  Pinned chunks are never evicted.  Admission: only
the prompt's chunks are stored by default (``admit="prompt"``), not decode KV.

Several processes may share one store.  Every change (chunks written,
evicted or dropped, pins, ``state.json``) happens under an exclusive
``flock`` of ``DIR/lock`` and bumps the counter in ``DIR/generation``; loads
hold the lock shared, so no chunk is evicted while it is read.  Each store
re-reads the directory when the counter moved, so chunks another process
saved are hits, chunks it evicted are misses (not corruption), the capacity
holds for all processes together, and ``state.json`` (last use, pins) is
merged, not overwritten.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...engine import Engine, alloc, open_engine
from ...errors import FormatError
from ...store import StoreWriter
from ...store.format import crc32c
from ...store.reader import read_index
from ...units import parse_size
from .cache import KVConfigError

FORMAT = 1
STATE = "state.json"
LOCK = "lock"
GENERATION = "generation"


@dataclass
class PrefixMetrics:
    """What the store did, per tier (read with :meth:`PrefixStore.metrics`)."""

    lookups: int = 0
    hits: int = 0  # chunks served (both tiers)
    misses: int = 0  # full prompt chunks looked up and not found
    hit_tokens: int = 0  # tokens loaded instead of recomputed
    dram_hits: int = 0
    dram_bytes: int = 0
    dram_s: float = 0.0
    ssd_hits: int = 0
    ssd_bytes: int = 0
    ssd_s: float = 0.0
    saved_chunks: int = 0
    saved_bytes: int = 0
    save_s: float = 0.0
    evictions: int = 0
    corrupt: int = 0  # chunks whose payload failed its checksum on load (dropped, recomputed)
    dropped_at_open: int = 0  # chunk files that failed the start-up check (deleted)
    recompute_chosen: int = 0  # lookups where recomputing was estimated faster than loading
    chunks: int = 0
    stored_bytes: int = 0
    pinned: int = 0
    load_gibps: float | None = None  # measured SSD load bandwidth (moving average)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Chunk:
    key: str
    parent: str
    position: int
    path: str
    offset: int
    nbytes: int
    crc: int
    shape: tuple[int, ...]
    dtype: str
    size: int  # file bytes
    last_used: float
    pinned: bool = False


def model_identity(config: Any, dtype: Any) -> str:
    """A hex digest of the model's config (less names and versions) and KV dtype."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for k in ("_name_or_path", "transformers_version", "architectures", "name_or_path", "_commit_hash"):
        d.pop(k, None)
    raw = json.dumps({"config": d, "dtype": str(dtype), "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def chain_keys(model_id: str, ids: list[int], chunk: int) -> list[str]:
    """Keys of the full chunks of ``ids``, each chained on the one before."""
    keys, prev = [], model_id
    for j in range(len(ids) // chunk):
        prev = _key(prev, ids[j * chunk:(j + 1) * chunk])
        keys.append(prev)
    return keys


def _key(prev: str, tokens: list[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev.encode())
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    return h.hexdigest()


class PrefixStore:
    """Chunks of prompt KV under ``path``; see the module doc.  Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, capacity: int | str = "10GiB", memory: int | str = 0,
                 chunk_tokens: int = 256, admit: str = "prompt", engine: Engine | None = None) -> None:
        if admit not in ("prompt", "all"):
            raise KVConfigError(f"admit must be 'prompt' or 'all', got {admit!r}")
        if chunk_tokens < 1:
            raise KVConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.path = os.path.abspath(os.fspath(path))
        self.capacity = parse_size(capacity) if isinstance(capacity, str) else int(capacity)
        self.memory = parse_size(memory) if isinstance(memory, str) else int(memory)
        self.chunk, self.admit = chunk_tokens, admit
        self.chunks_dir = os.path.join(self.path, "chunks")
        os.makedirs(self.chunks_dir, exist_ok=True)
        self._own_engine = engine is None
        self.engine = engine if engine is not None else open_engine("auto")
        self._m = PrefixMetrics()
        self._index: dict[str, _Chunk] = {}
        self._dram: OrderedDict[str, np.ndarray] = OrderedDict()
        self._dram_bytes = 0
        self._buf = alloc(0)  # the load buffer, as large as the largest load so far
        self._prefill_tps: dict[str, float] = {}
        self._ids: dict[int, str] = {}
        self._closed = False
        self._generation = -1
        with self._locked():
            self._open()
            self._bump()

    # -- sharing between processes: a lock and a change counter -------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True) -> Any:
        """Hold ``DIR/lock`` (exclusive for changes, shared for loads); never nested."""
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_generation(self) -> int:
        try:
            with open(os.path.join(self.path, GENERATION), encoding="ascii") as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _bump(self) -> None:
        """Tell the other processes the store changed (under the exclusive lock)."""
        gen = self._read_generation() + 1
        tmp = os.path.join(self.path, f".{GENERATION}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(gen))
        os.replace(tmp, os.path.join(self.path, GENERATION))
        self._generation = gen

    def _sync(self) -> None:
        """Re-read the chunk directory and state.json if another process changed them (under the lock)."""
        gen = self._read_generation()
        if gen == self._generation:
            return
        names = {n[:-4] for n in os.listdir(self.chunks_dir) if n.endswith(".lts") and not n.startswith(".")}
        for key in [k for k in self._index if k not in names]:  # evicted or dropped elsewhere: gone, not corrupt
            self._forget(key)
        state = self._read_state().get("chunks", {})
        for key in names - set(self._index):
            p = os.path.join(self.chunks_dir, key + ".lts")
            try:
                c = self._check_file(p, key)
            except (FormatError, OSError, ValueError, KeyError, TypeError):
                continue  # being written, or bad: the process that opens the store next drops it
            c.last_used = os.stat(p).st_mtime
            self._index[key] = c
        for key, info in state.items():
            c = self._index.get(key)
            if c is not None and isinstance(info, dict):
                c.last_used = max(c.last_used, float(info.get("last_used", 0.0)))
                c.pinned = bool(info.get("pinned", c.pinned))
        self._generation = gen

    def _forget(self, key: str) -> None:
        self._index.pop(key, None)
        old = self._dram.pop(key, None)
        if old is not None:
            self._dram_bytes -= old.nbytes

    # -- start-up: the chunk files are the index --------------------------------------------------------------------
    def _open(self) -> None:
        self._check_layout()
        state = self._read_state()
        self._prefill_tps = {k: float(v) for k, v in state.get("prefill_tps", {}).items()}
        bw = state.get("load_gibps")
        self._m.load_gibps = float(bw) if isinstance(bw, (int, float)) and bw > 0 else None
        seen = state.get("chunks", {})
        for name in sorted(os.listdir(self.chunks_dir)):
            p = os.path.join(self.chunks_dir, name)
            if name.startswith(".") and ".tmp-" in name:  # a writer died mid-write
                with contextlib.suppress(OSError):
                    os.unlink(p)
                continue
            if not name.endswith(".lts"):
                continue
            try:
                c = self._check_file(p, name[:-4])
            except (FormatError, OSError, ValueError, KeyError, TypeError):
                self._m.dropped_at_open += 1
                with contextlib.suppress(OSError):
                    os.unlink(p)
                continue
            info = seen.get(c.key, {})
            c.last_used = float(info.get("last_used", os.stat(p).st_mtime))
            c.pinned = bool(info.get("pinned", False))
            self._index[c.key] = c
        for c in sorted(self._index.values(), key=lambda c: c.position):  # unreachable: no parent
            if c.position and c.parent not in self._index and c.key in self._index:
                self._m.dropped_at_open += self._drop(c.key)
        self._refresh()

    def _check_layout(self) -> None:
        """The store's chunk size is fixed at creation (``store.json``); another one would drop every chunk."""
        p = os.path.join(self.path, "store.json")
        try:
            with open(p, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            meta = None
        except (OSError, ValueError) as exc:
            raise KVConfigError(f"{p} is unreadable ({exc}); move it aside to start a new store") from exc
        if meta is None:
            tmp = p + f".tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": "llmtier-kv-prefix", "version": FORMAT, "chunk_tokens": self.chunk}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            return
        if not isinstance(meta, dict) or meta.get("format") != "llmtier-kv-prefix" or meta.get("version") != FORMAT:
            raise KVConfigError(f"{self.path} is not an llmtier prefix store of version {FORMAT} ({p})")
        if meta.get("chunk_tokens") != self.chunk:
            raise KVConfigError(f"the prefix store {self.path} holds chunks of {meta.get('chunk_tokens')} tokens; "
                                f"open it with chunk_tokens={meta.get('chunk_tokens')}, not {self.chunk}")

    def _check_file(self, path: str, key: str) -> _Chunk:
        infos, meta = read_index(path)
        size = os.stat(path).st_size
        if meta.get("llmtier_kv_chunk") != FORMAT or len(infos) != 1 or infos[0].name != "kv":
            raise FormatError("not a KV chunk", path=path, field="metadata")
        tokens, parent, pos = meta["tokens"], meta["parent"], int(meta["position"])
        if meta["key"] != key or _key(parent, tokens) != key or len(tokens) != self.chunk:
            raise FormatError("key does not match the stored tokens", path=path, field="key")
        if pos == 0 and parent != meta["model"]:
            raise FormatError("first chunk not chained on its model", path=path, field="parent")
        t = infos[0]
        if len(t.shape) != 5 or t.shape[1] != 2 or t.shape[3] != self.chunk:
            raise FormatError(f"chunk shape {t.shape} is not [L, 2, H, {self.chunk}, D]", path=path, field="kv")
        if t.offset + t.nbytes > size or t.crc32c is None:
            raise FormatError("payload outside the file (truncated)", path=path, field="kv")
        return _Chunk(key, parent, pos, path, t.offset, t.nbytes, t.crc32c, t.shape, t.dtype.name, size, 0.0)

    # -- identity and lookup ----------------------------------------------------------------------------------------
    def identity(self, model: Any) -> str:
        mid = self._ids.get(id(model))
        if mid is None:
            mid = model_identity(model.config, getattr(model, "dtype", None))
            self._ids[id(model)] = mid
        return mid

    def lookup(self, model: Any, ids: list[int]) -> int:
        """Tokens of ``ids`` (one sequence) whose KV is stored, from the start: a multiple of ``chunk_tokens``."""
        with self._locked(exclusive=False):
            self._sync()
        n = 0
        for k in chain_keys(self.identity(model), list(ids), self.chunk):
            if k not in self._index:
                break
            n += self.chunk
        return n

    # -- loading ----------------------------------------------------------------------------------------------------
    def fetch(self, model: Any, input_ids: Any, cache: Any, *, force: bool = False, attention_mask: Any = None) -> int:
        """Fill the empty ``cache`` with the stored KV of ``input_ids``' common prefix; returns tokens loaded.

        At most ``len - 1`` tokens are loaded (the last one is computed, for
        its logits).  Unless ``force``, it loads only when the measured load
        bandwidth makes that faster than recomputing at the measured prefill
        speed.  Rows must be unpadded: with an ``attention_mask`` that shows
        padding nothing is loaded.
        """
        self._check_open()
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            return 0
        bad: list[str] = []
        try:
            with self._locked(exclusive=False):  # no chunk is evicted while it is read
                self._sync()
                return self._fetch(model, input_ids, cache, force, bad)
        finally:
            if bad:  # chunks that failed their checksum: deleted under the exclusive lock
                with self._locked():
                    self._sync()
                    for key in bad:
                        if key in self._index:
                            self._drop(key)
                    self._bump()

    def _fetch(self, model: Any, input_ids: Any, cache: Any, force: bool, bad: list[str]) -> int:
        import torch  # noqa: PLC0415

        _check_cache(cache)
        if cache.get_seq_length():
            raise KVConfigError(f"fetch fills an empty cache; this one holds {cache.get_seq_length()} tokens")
        rows = [list(map(int, r)) for r in input_ids.tolist()]
        mid = self.identity(model)
        self._m.lookups += 1
        chains = [chain_keys(mid, r, self.chunk) for r in rows]
        hit = min(sum(1 for _ in _present(ch, self._index)) for ch in chains)
        self._m.misses += sum(len(ch) - min(hit, len(ch)) for ch in chains)
        limit = min(hit * self.chunk, len(rows[0]) - 1)  # the last token is computed, for its logits
        take = -(-limit // self.chunk) if limit > 0 else 0
        if take == 0:
            return 0
        keys = sorted({k for ch in chains for k in ch[:take]})
        nbytes = sum(self._index[k].nbytes for k in keys)
        if not force and not self._worth_loading(mid, take * self.chunk, nbytes):
            self._m.recompute_chosen += 1
            return 0
        first = self._index[chains[0][0]]  # shape [L, 2, H, C, D] and dtype of every chunk of this model
        data = self._load(keys, bad)
        got = take
        for ch in chains:  # a chunk that failed its checksum ends every chain through it
            for j, k in enumerate(ch[:take]):
                if k not in data:
                    got = min(got, j)
                    break
        if got == 0:
            return 0
        tokens = min(got * self.chunk, len(rows[0]) - 1)
        L, _, H, C, D = first.shape
        dt = getattr(torch, first.dtype)
        device = _model_device(model)
        for layer in range(L):  # one copy from the chunks into each layer's [B, H, tokens, D]
            k = torch.empty((len(rows), H, tokens, D), dtype=dt)
            v = torch.empty_like(k)
            for b, ch in enumerate(chains):
                for j, key in enumerate(ch[:got]):
                    lo, hi = j * C, min(tokens, (j + 1) * C)
                    if lo >= hi:
                        break
                    kv = torch.from_numpy(data[key]).view(dt).view(L, 2, H, C, D)[layer]
                    k[b, :, lo:hi] = kv[0, :, :hi - lo]
                    v[b, :, lo:hi] = kv[1, :, :hi - lo]
            if device.type != "cpu":  # a GPU model: the cache takes K/V where the model computes
                k, v = k.to(device), v.to(device)
            cache.update(k, v, layer)
        self._m.hits += got * len(rows)
        self._m.hit_tokens += tokens * len(rows)
        self._touch(chains, got)
        return tokens

    def _touch(self, chains: list[list[str]], upto: int) -> None:
        """Mark the first ``upto`` chunks of each chain used now; later chunks count as a little older."""
        now = time.time()
        for ch in chains:
            for j, k in enumerate(ch[:upto]):
                if k in self._index:
                    self._index[k].last_used = now - j * 1e-6

    def _worth_loading(self, mid: str, tokens: int, nbytes: int) -> bool:
        tps, bw = self._prefill_tps.get(mid), self._m.load_gibps
        if not tps or not bw:
            return True  # nothing measured yet: loading is the safe bet on a CPU
        return nbytes / (bw * 2**30) < tokens / tps

    def _load(self, keys: list[str], bad: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        for k in keys:
            if k in self._dram:
                self._dram.move_to_end(k)
                out[k] = self._dram[k]
                self._m.dram_hits += 1
                self._m.dram_bytes += out[k].nbytes
        self._m.dram_s += time.perf_counter() - t0
        need = [self._index[k] for k in keys if k not in out]
        if not need:
            return out
        t0 = time.perf_counter()
        total = sum(c.nbytes for c in need)
        if self._buf.nbytes < total:  # kept across loads: a fresh buffer costs a page fault per 4 KiB
            self._buf = alloc(-(-total // (16 << 20)) * (16 << 20))
        buf = self._buf[:total]
        files, futs, pos = [], [], 0
        try:  # every chunk's read is queued at once; each is checked while the later ones are still reading
            for c in need:
                view = buf[pos:pos + c.nbytes]
                pos += c.nbytes
                try:
                    f = self.engine.open(c.path)
                except FileNotFoundError:  # gone (another process's index was behind): a miss, not corruption
                    self._forget(c.key)
                    continue
                except OSError:
                    futs.append((c, view, None))
                    continue
                files.append(f)
                futs.append((c, view, f.pread(view, c.offset, tag=f"kvprefix:{c.position}", exact=False)))
            for c, view, fut in futs:
                n = -1
                if fut is not None:
                    try:
                        n = fut.result()
                    except OSError:
                        n = -1
                if n != c.nbytes or crc32c(view) != c.crc:
                    self._m.corrupt += 1
                    bad.append(c.key)  # deleted (with what is chained on it) once the shared lock is let go
                    continue
                out[c.key] = view
                self._m.ssd_hits += 1
                self._m.ssd_bytes += c.nbytes
                self._remember(c.key, view)
        finally:
            for _, _, fut in futs:  # none may still write into buf
                if fut is not None and not fut.done():
                    with contextlib.suppress(Exception):
                        fut.result()
            for f in files:
                f.close()
        dt = time.perf_counter() - t0
        self._m.ssd_s += dt
        if total >= 1 << 20:
            gibps = total / dt / 2**30
            old = self._m.load_gibps
            self._m.load_gibps = gibps if old is None else 0.5 * old + 0.5 * gibps
        return out

    def _remember(self, key: str, data: np.ndarray) -> None:
        if self.memory <= 0 or data.nbytes > self.memory:
            return
        self._dram[key] = data.copy()  # not a view that would keep a whole load buffer alive
        self._dram_bytes += data.nbytes
        while self._dram_bytes > self.memory:
            _, old = self._dram.popitem(last=False)
            self._dram_bytes -= old.nbytes

    def observe_prefill(self, model: Any, tokens: int, seconds: float) -> None:
        """Tell the store how fast this model computes a prefill (for fetch-or-recompute)."""
        if tokens > 0 and seconds > 0:
            mid = self.identity(model)
            old = self._prefill_tps.get(mid)
            tps = tokens / seconds
            self._prefill_tps[mid] = tps if old is None else 0.5 * old + 0.5 * tps

    # -- saving -----------------------------------------------------------------------------------------------------
    def save(self, model: Any, input_ids: Any, cache: Any, *, prompt_tokens: int | None = None,
             attention_mask: Any = None) -> int:
        """Store the full chunks of ``input_ids`` (``[B, n]``) whose KV ``cache`` holds; returns chunks written.

        With ``admit="prompt"`` (default) only the first ``prompt_tokens``
        tokens are admitted (all of ``input_ids`` when not given): decode KV
        is not stored.  Chunks already stored are skipped.  ``attention_mask``
        (``[B, n]``, as given to the model): only rows without padding are
        stored (a padded row's KV sits at other positions).  Without it, a
        batch where some rows start with the pad token and others do not is
        refused: it looks left-padded.
        """
        self._check_open()
        _check_cache(cache)
        rows = [list(map(int, r)) for r in input_ids.tolist()]
        keep = list(range(len(rows)))
        if attention_mask is not None:
            keep = [b for b, m in enumerate(attention_mask.tolist()) if all(m)]
        elif len(rows) > 1:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
            starts = {r[0] == pad for r in rows if r} if pad is not None else set()
            if len(starts) > 1:
                raise KVConfigError("this batch looks left-padded (some rows start with the pad token, others do "
                                    "not); pass attention_mask= so that only unpadded rows are stored")
        if not keep:
            return 0
        with self._locked():
            self._sync()
            return self._save(model, rows, keep, cache, prompt_tokens)

    def _save(self, model: Any, rows: list[list[int]], keep: list[int], cache: Any, prompt_tokens: int | None) -> int:
        import torch  # noqa: PLC0415

        n = len(rows[0]) if rows else 0
        if self.admit == "prompt" and prompt_tokens is not None:
            n = min(n, prompt_tokens)
        held = cache.get_seq_length()
        n = min(n, held) // self.chunk * self.chunk
        if n == 0:
            return 0
        mid = self.identity(model)
        chains = {b: chain_keys(mid, rows[b][:n], self.chunk) for b in keep}
        todo = [(b, j) for b, ch in chains.items() for j, k in enumerate(ch) if k not in self._index]
        if not todo:
            self._touch(list(chains.values()), n // self.chunk)
            return 0
        t0 = time.perf_counter()
        n_layers = len(cache.layers)
        kvs = [_layer_kv(cache, layer, n) for layer in range(n_layers)]  # [B, H, n, D] K and V per layer
        written = 0
        done: set[str] = set()
        for b, j in todo:
            key = chains[b][j]
            if key in done:
                continue
            lo, hi = j * self.chunk, (j + 1) * self.chunk
            chunk = torch.stack([torch.stack([k[b, :, lo:hi], v[b, :, lo:hi]]) for k, v in kvs])  # [L, 2, H, C, D]
            parent = chains[b][j - 1] if j else mid
            self._write(key, parent, j, rows[b][lo:hi], mid, chunk.contiguous())
            done.add(key)
            written += 1
        self._m.save_s += time.perf_counter() - t0
        self._touch(list(chains.values()), n // self.chunk)
        self._evict()
        self._write_state()
        self._bump()
        return written

    def _write(self, key: str, parent: str, position: int, tokens: list[int], mid: str, chunk: Any) -> None:
        path = os.path.join(self.chunks_dir, f"{key}.lts")
        meta = {"llmtier_kv_chunk": FORMAT, "key": key, "parent": parent, "position": position,
                "tokens": tokens, "model": mid}
        with StoreWriter(path, metadata=meta, engine=self.engine) as w:
            w.add("kv", chunk)
        c = self._check_file(path, key)
        self._index[key] = c
        self._m.saved_chunks += 1
        self._m.saved_bytes += c.size
        self._remember(key, _as_bytes(chunk))

    # -- capacity, pins ---------------------------------------------------------------------------------------------
    def _evict(self) -> None:
        total = sum(c.size for c in self._index.values())
        if total <= self.capacity:
            self._refresh()
            return
        order = sorted((c for c in self._index.values() if not c.pinned), key=lambda c: (c.last_used, -c.position))
        for c in order:
            if total <= self.capacity:
                break
            if c.key not in self._index:
                continue
            gone = [self._index[k].size for k in self._subtree(c.key)]
            self._m.evictions += self._drop(c.key)
            total -= sum(gone)
        self._refresh()

    def _subtree(self, key: str) -> list[str]:
        """``key`` and every stored chunk chained on it."""
        children: dict[str, list[str]] = {}
        for c in self._index.values():
            children.setdefault(c.parent, []).append(c.key)
        out, todo = [], [key]
        while todo:
            k = todo.pop()
            if k in self._index:
                out.append(k)
                todo += children.get(k, [])
        return out

    def _drop(self, key: str) -> int:
        """Delete a chunk and every chunk chained on it; returns how many went."""
        keys = self._subtree(key)
        for k in keys:
            c = self._index.pop(k)
            old = self._dram.pop(k, None)
            if old is not None:
                self._dram_bytes -= old.nbytes
            with contextlib.suppress(OSError):
                os.unlink(c.path)
        return len(keys)

    def pin(self, model: Any, ids: Any, pinned: bool = True) -> int:
        """Keep the stored chunks of ``ids`` (one sequence) from eviction; returns how many were marked."""
        n = 0
        with self._locked():
            self._sync()
            for k in _present(chain_keys(self.identity(model), list(map(int, ids)), self.chunk), self._index):
                self._index[k].pinned = pinned
                n += 1
            self._write_state()
            self._bump()
        self._refresh()
        return n

    def unpin(self, model: Any, ids: Any) -> int:
        return self.pin(model, ids, False)

    # -- state, metrics, close --------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self._m.chunks = len(self._index)
        self._m.stored_bytes = sum(c.size for c in self._index.values())
        self._m.pinned = sum(c.pinned for c in self._index.values())

    def metrics(self) -> PrefixMetrics:
        self._refresh()
        return PrefixMetrics(**asdict(self._m))

    def _read_state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, STATE), encoding="utf-8") as f:
                state = json.load(f)
            return state if isinstance(state, dict) and state.get("version") == FORMAT else {}
        except (OSError, ValueError):
            return {}  # missing or damaged: rebuilt from the chunk files

    def _write_state(self) -> None:
        """Merge this process's view into state.json (under the exclusive lock, after :meth:`_sync`)."""
        old = self._read_state()
        seen = old.get("chunks", {}) if isinstance(old.get("chunks"), dict) else {}
        tps = {**old.get("prefill_tps", {}), **self._prefill_tps} if isinstance(old.get("prefill_tps"), dict) \
            else self._prefill_tps
        chunks = {}
        for k, c in self._index.items():
            theirs = seen.get(k, {}) if isinstance(seen.get(k), dict) else {}
            c.last_used = max(c.last_used, float(theirs.get("last_used", 0.0)))
            chunks[k] = {"last_used": c.last_used, "pinned": c.pinned}
        state = {"version": FORMAT, "load_gibps": self._m.load_gibps, "prefill_tps": tps, "chunks": chunks}
        tmp = os.path.join(self.path, f".{STATE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, STATE))

    def _check_open(self) -> None:
        if self._closed:
            raise KVConfigError("this PrefixStore is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._locked():
                self._sync()
                self._write_state()
        finally:
            self._dram.clear()
            self._buf = alloc(0)
            if self._own_engine:
                self.engine.close()

    def __enter__(self) -> PrefixStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrefixStore({self.path!r}, chunks={len(self._index)}, capacity={self.capacity})"


def _present(keys: list[str], index: dict[str, Any]) -> list[str]:
    out = []
    for k in keys:
        if k not in index:
            break
        out.append(k)
    return out


def _check_cache(cache: Any) -> None:
    """The store keeps every layer's full K and V of one shape: refuse caches that cannot give that."""
    odd = [type(lay).__name__ for lay in cache.layers if getattr(lay, "is_sliding", False)
           or type(lay).__name__ == "DummyLayer"]
    if odd:
        raise KVConfigError(f"PrefixStore keeps the full KV of every layer; this cache has {sorted(set(odd))} layers "
                            "(sliding windows keep only their window, layers without KV hold none): not supported")


def _layer_kv(cache: Any, layer: int, n: int) -> tuple[Any, Any]:
    if hasattr(cache, "export"):
        k, v = cache.export(layer, 0, n)
    else:
        lay = cache.layers[layer]
        k, v = lay.keys[:, :, :n], lay.values[:, :, :n]
    if k.shape[1] != v.shape[1] or k.shape[-1] != v.shape[-1]:
        raise KVConfigError(f"PrefixStore keeps K and V of one shape; this model's differ ({tuple(k.shape)} and "
                            f"{tuple(v.shape)}: multi-head latent attention): not supported")
    return k, v


def _as_bytes(t: Any) -> np.ndarray:
    import torch  # noqa: PLC0415

    return t.contiguous().view(torch.uint8).reshape(-1).cpu().numpy().copy()


def _model_device(model: Any) -> Any:
    """Where ``model`` computes: a streamed model says so; otherwise its first real parameter's device."""
    import torch  # noqa: PLC0415

    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device) and dev.type != "meta":
        return dev
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


__all__ = ["PrefixMetrics", "PrefixStore", "chain_keys", "model_identity"]
