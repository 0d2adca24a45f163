"""``llmtier bench kv``: the KV tier measured against in-memory caches, fio and the analytic byte count.

(a) **offloaded decode**: a batch of sequences at a long context decodes with
    transformers' ``DynamicCache`` (all in DRAM) and with ``TieredCache`` at
    DRAM budgets below the KV size, alternating, with fio in each round.  The
    context is filled with the same random K/V in both (a real prefill of
    batch 8 × 4K tokens takes minutes on a CPU and changes nothing the decode
    reads); the tokens of the two must be identical.  Reported: tok/s, the
    I/O bound (KV bytes each step must read ÷ fio) and compute bound (the
    in-memory step), the efficiency against their maximum, and the bytes read
    and written, counted by the tracer, against the analytic count.
(t) **age profile**: a traced run with a short prompt and a long generation;
    reads per page against the page's age (the study's question 3).
(b) **multi-turn**: time to first token of prompts of 512 to 8K tokens,
    recomputed vs loaded from the prefix store, and the load bandwidth
    against fio in the same run.
(c) **restart**: a fresh process opens the store and looks the prompts up.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..offload.hfcompat import cache_kwargs
from ..units import human
from .system import engine_read_bw
from .weights import QUICK, TINYLLAMA, _fio


@dataclass
class KVBenchConfig:
    """Knobs of :func:`run_kv_bench`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-bench-kv")
    shape: tuple[int, ...] = TINYLLAMA
    batch: int = 8
    context: int = 4096
    new_tokens: int = 16
    fractions: tuple[float, ...] = (0.25, 0.5)  # DRAM budget as a share of the KV at the end
    rounds: int = 3
    page_tokens: int = 256
    prompts: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    age_prompt: int = 512
    age_new_tokens: int = 128
    age_page_tokens: int = 16
    parts: tuple[str, ...] = ("a", "t", "b", "c")
    device: str = "cpu"  # "cuda": the model and its K/V on the GPU (the tier's pool in pinned host memory)

    @classmethod
    def quick(cls, directory: str | None = None, **kw: Any) -> KVBenchConfig:
        base = {"shape": QUICK, "batch": 2, "context": 512, "new_tokens": 4, "fractions": (0.5,), "rounds": 1,
                "page_tokens": 64, "prompts": (256,), "age_prompt": 64, "age_new_tokens": 24, "age_page_tokens": 8}
        return cls(**({"directory": directory} if directory else {}), **{**base, **kw})


@dataclass
class KVBenchResult:
    config: dict[str, Any]
    kv_bytes_per_token: int = 0
    decode: list[dict[str, Any]] = field(default_factory=list)
    age: dict[str, Any] = field(default_factory=dict)
    ttft: list[dict[str, Any]] = field(default_factory=list)
    restart: dict[str, Any] = field(default_factory=dict)
    fio_read_bytes_per_s: list[float] = field(default_factory=list)


def _load_model(cfg: KVBenchConfig, progress: bool) -> tuple[Any, str]:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from .store import Arch, ensure_checkpoint  # noqa: PLC0415

    ck = ensure_checkpoint(cfg.directory, Arch(*cfg.shape), shard_bytes=8 << 30, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(ck.hf_dir, dtype=torch.bfloat16).to(cfg.device).eval()
    return model, ck.hf_dir


def _fio_file(cfg: KVBenchConfig, size: int = 1 << 30) -> str:
    from ..engine import alloc, open_engine  # noqa: PLC0415

    path = os.path.join(cfg.directory, "kv-fio.dat")
    if not os.path.exists(path) or os.path.getsize(path) < size:
        buf = alloc(64 << 20)
        buf[:] = 0x5A
        with open_engine("auto") as e, e.open(path, "w") as f:
            for off in range(0, size, buf.nbytes):
                f.pwrite(buf, off).result()
            f.sync()
    return path


def _geometry(model: Any) -> tuple[int, int, int]:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


# -- (a) offloaded decode ------------------------------------------------------------------------------------------
def _fill(model: Any, batch: int, context: int, seed: int = 0) -> list[tuple[Any, Any]]:
    import torch  # noqa: PLC0415

    layers, heads, head_dim = _geometry(model)
    g = torch.Generator().manual_seed(seed)
    dev = model.device
    return [(torch.randn(batch, heads, context, head_dim, generator=g).to(torch.bfloat16).to(dev),
             torch.randn(batch, heads, context, head_dim, generator=g).to(torch.bfloat16).to(dev))
            for _ in range(layers)]


def _decode(model: Any, cache: Any, fill: list[tuple[Any, Any]], steps: int, seed: int = 1) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    for i, (k, v) in enumerate(fill):
        cache.update(k, v, i)
    batch = fill[0][0].shape[0]
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(model.device)
    times, tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=ids, **cache_kwargs(cache, model), use_cache=True)
            ids = out.logits[:, -1:].argmax(-1)
            step = ids.flatten().tolist()  # (on a GPU this waits for the step)
            times.append(time.perf_counter() - t0)
            tokens.append(step)
    return {"step_s": times, "tokens": tokens}


def analytic_bytes(context: int, steps: int, spilled: int, page: int, group_bytes: int, *,
                   windows: Sequence[int | None] | None = None) -> tuple[int, int]:
    """Bytes a run must read and write: a prefill of ``context`` tokens, then ``steps`` forwards of one token.

    Every held full page of every spilled layer is read at every step; every
    page that fills is written once.  A full-attention layer holds all its
    pages.  A sliding-window layer of window ``W`` (``windows``: one entry per
    spilled layer, ``None`` for full attention; it replaces ``spilled``) holds
    at ``n`` tokens only the pages after ``start(n) = max(0, n - W + 1)``: page
    ``p`` is held iff ``(p + 1) * page > start(n)``, so at each step it reads
    ``n // page - start(n) // page`` pages, and the prefill writes only the
    ``context // page - start(context) // page`` pages still in the window
    (the others are dropped unwritten; in decode every page that fills is in
    the window).
    """
    wins = list(windows) if windows is not None else [None] * spilled

    def first(n: int, w: int | None) -> int:
        return 0 if w is None else max(0, n - w + 1) // page

    reads = sum((context + t) // page - first(context + t, w) for t in range(steps) for w in wins)
    writes = sum((context + steps) // page - first(context, w) for w in wins)
    return reads * group_bytes, writes * group_bytes


def _decode_part(cfg: KVBenchConfig, model: Any, res: KVBenchResult, fio_path: str, progress: bool) -> None:
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    from ..offload.kv import TieredCache, min_memory  # noqa: PLC0415
    from ..trace import load, record  # noqa: PLC0415
    from ..trace.analysis import rw_summary  # noqa: PLC0415

    layers, heads, head_dim = _geometry(model)
    total = res.kv_bytes_per_token * cfg.batch * (cfg.context + cfg.new_tokens)
    low = min_memory(layers, cfg.batch, heads, head_dim, 2, cfg.context + cfg.new_tokens, page_tokens=cfg.page_tokens)
    fill = _fill(model, cfg.batch, cfg.context)
    kv_dir = os.path.join(cfg.directory, "kv-spill")
    cells: dict[str, dict[str, Any]] = {"memory": {"system": "DynamicCache", "runs": []},
                                        "tier-dram": {"system": "TieredCache", "fraction": None, "memory": 2 * total,
                                                      "runs": []}}
    for f in cfg.fractions:
        cells[f"tier{f}"] = {"system": "TieredCache", "fraction": f, "memory": max(int(total * f), low),
                              "runs": []}
    for r in range(cfg.rounds):
        fio = _fio(fio_path, os.path.getsize(fio_path)) or engine_read_bw([fio_path])  # no fio: the engine's own reads
        if fio:
            res.fio_read_bytes_per_s.append(fio)
        for name, cell in cells.items():
            torch.manual_seed(0)
            traced = r == 0 and name not in ("memory", "tier-dram")
            if name == "memory":
                run = _decode(model, DynamicCache(config=model.config), fill, cfg.new_tokens)
            else:
                trace_path = os.path.join(cfg.directory, f"kv-decode-{name}.trace.npz")
                with TieredCache(model.config, memory=cell["memory"], path=kv_dir,
                                 page_tokens=cfg.page_tokens) as cache:
                    if traced:
                        with record(trace_path, device_path=kv_dir, label=f"KV decode {name}"):
                            run = _decode(model, cache, fill, cfg.new_tokens)
                    else:
                        run = _decode(model, cache, fill, cfg.new_tokens)
                    st = cache.stats()
                run["stats"] = {k: v for k, v in st.as_dict().items() if k != "reads_by_page"}
                if name == "tier-dram":
                    cell["runs"].append({**run, "fio": fio})
                    continue
                g = cfg.batch * res.kv_bytes_per_token // layers * cfg.page_tokens
                reads, writes = analytic_bytes(cfg.context, cfg.new_tokens, st.spilled_layers, cfg.page_tokens, g)
                run["analytic"] = {"read_bytes": reads, "write_bytes": writes}
                if traced:
                    t = load(trace_path)
                    run["traced"] = {"app": rw_summary(t, "app"),
                                     "block": rw_summary(t, "block") if t.has_block else None,
                                     "missing": t.missing, "trace": trace_path}
            run["fio"] = fio
            cell["runs"].append(run)
            if progress:
                med = statistics.median(run["step_s"][1:] or run["step_s"])
                print(f"  kv decode round {r + 1}/{cfg.rounds} {name}: {med:.3f} s/step", file=sys.stderr)
    ref = cells["memory"]["runs"][0]["tokens"]
    for cell in cells.values():
        cell["tokens_identical"] = all(run["tokens"] == ref for run in cell["runs"])
        for run in cell["runs"]:
            del run["tokens"]
    res.decode = list(cells.values())
    del fill


def decode_summary(res: KVBenchResult, cfg: KVBenchConfig) -> list[dict[str, Any]]:
    """Per cell: median step, tok/s, bounds and efficiency, bytes against the analytic count."""
    def median_step(c: dict[str, Any]) -> float:
        return statistics.median(s for run in c["runs"] for s in run["step_s"][1:] or run["step_s"])

    in_dram = [c for c in res.decode if c.get("fraction") is None]
    compute = min(median_step(c) for c in in_dram)  # the faster of the two caches held wholly in DRAM
    out = []
    for c in res.decode:
        step = median_step(c)
        row = {"system": c["system"], "fraction": c.get("fraction"), "memory": c.get("memory"),
               "step_s": step, "tok_s": cfg.batch / step, "tokens_identical": c["tokens_identical"]}
        if c.get("fraction") is not None:
            run = c["runs"][0]
            st = run["stats"]
            per_step = run["analytic"]["read_bytes"] / cfg.new_tokens
            fios = [r["fio"] for r in c["runs"] if r.get("fio")]
            fio = statistics.median(fios) if fios else None
            io = per_step / fio if fio else None
            bound = max(compute, io or 0.0)
            row.update(spilled_layers=st["spilled_layers"], resident_layers=st["resident_layers"],
                       read_per_step=per_step, io_bound_s=io, compute_bound_s=compute,
                       efficiency=bound / step, stall_s=st["stall_s"], peak_dram=st["peak_dram_bytes"],
                       analytic_read=run["analytic"]["read_bytes"], analytic_write=run["analytic"]["write_bytes"],
                       counted_read=st["bytes_read"] + st["discarded_bytes"], counted_write=st["bytes_written"])
            tr = run.get("traced")
            if tr:
                row["traced_read"] = tr["app"]["read_bytes"]
                row["traced_write"] = tr["app"]["write_bytes"]
                if tr.get("block"):
                    row["block_read"] = tr["block"]["read_bytes"]
                    row["block_write"] = tr["block"]["write_bytes"]
        out.append(row)
    return out


# -- (t) the age profile -------------------------------------------------------------------------------------------
def _age_part(cfg: KVBenchConfig, model: Any, res: KVBenchResult) -> None:
    """Reads per page against the page's age: a traced run, every layer spilled."""
    import numpy as np  # noqa: PLC0415

    from ..offload.kv import TieredCache, min_memory  # noqa: PLC0415
    from ..trace import load, record  # noqa: PLC0415
    from ..trace.analysis import OP_READ  # noqa: PLC0415

    fill = _fill(model, cfg.batch, cfg.age_prompt, seed=2)
    kv_dir = os.path.join(cfg.directory, "kv-spill")
    trace_path = os.path.join(cfg.directory, "kv-age.trace.npz")
    layers, heads, head_dim = _geometry(model)
    need = min_memory(layers, cfg.batch, heads, head_dim, 2, cfg.age_prompt + cfg.age_new_tokens,
                      page_tokens=cfg.age_page_tokens)
    with TieredCache(model.config, memory=need, path=kv_dir,
                     page_tokens=cfg.age_page_tokens) as cache:
        with record(trace_path, device_path=kv_dir, label="KV decode, age profile"):
            _decode(model, cache, fill, cfg.age_new_tokens, seed=3)
        st = cache.stats()
    t = load(trace_path)
    reads = t.app["op"] == OP_READ
    pages: dict[int, int] = {}
    for tag_id in t.app["tag"][reads]:
        name = t.tags[int(tag_id)]
        if name.startswith("kv:"):
            p = int(name.rsplit(":", 1)[1])
            pages[p] = pages.get(p, 0) + 1
    n = max(pages) + 1 if pages else 0
    counts = np.array([pages.get(p, 0) for p in range(n)])
    layers = st.spilled_layers or 1
    from ..trace.report import write_report  # noqa: PLC0415

    report = write_report(t, os.path.join(cfg.directory, "kv-age-report"),
                          title="llmtier bench kv: KV decode, every layer on SSD (age profile)")
    res.age = {"trace": trace_path, "report": report.get("html"), "findings": report.get("findings"),
               "page_tokens": cfg.age_page_tokens, "prompt": cfg.age_prompt,
               "new_tokens": cfg.age_new_tokens, "spilled_layers": st.spilled_layers,
               "reads_per_page": (counts / layers).round(2).tolist(),
               "expected_per_page": [_expected_reads(p, cfg) for p in range(n)]}


def _expected_reads(p: int, cfg: KVBenchConfig) -> int:
    """Steps that read page ``p``: every step after it filled (full attention reads the whole past)."""
    return sum(1 for t in range(cfg.age_new_tokens) if (cfg.age_prompt + t) // cfg.age_page_tokens > p)


# -- (b) multi-turn time to first token, (c) restart ---------------------------------------------------------------
def _ttft_part(cfg: KVBenchConfig, model: Any, res: KVBenchResult, fio_path: str, progress: bool) -> None:
    import shutil  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    from ..offload.kv import PrefixStore  # noqa: PLC0415
    from .system import drop_page_cache  # noqa: PLC0415

    store_dir = os.path.join(cfg.directory, "kv-prefix")
    shutil.rmtree(store_dir, ignore_errors=True)
    g = torch.Generator().manual_seed(5)
    prompts = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in cfg.prompts}
    with PrefixStore(store_dir, chunk_tokens=cfg.page_tokens) as store, torch.no_grad():
        for n, ids in prompts.items():
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            first = model(input_ids=ids, **cache_kwargs(cache, model), use_cache=True).logits[:, -1].argmax(-1)
            recompute = time.perf_counter() - t0
            store.observe_prefill(model, n, recompute)
            store.save(model, ids, cache)
            # what the hit computes, from recomputed KV: the prompt less its last token, then that token alone
            # (a one-token forward rounds differently from the same token inside a long prefill)
            cache.crop(-1)
            ref = model(input_ids=ids[:, -1:], **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
            del cache
            fio = _fio(fio_path, os.path.getsize(fio_path))
            drop_page_cache()
            before = store.metrics()
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            got = store.fetch(model, ids, cache, force=True)
            t1 = time.perf_counter()
            hit_logits = model(input_ids=ids[:, got:], **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
            hit = time.perf_counter() - t0
            hit_first = hit_logits.argmax(-1)
            after = store.metrics()
            nbytes = after.ssd_bytes - before.ssd_bytes
            cache = DynamicCache(config=model.config)  # again: the store's load buffer is now warm
            t2 = time.perf_counter()
            store.fetch(model, ids, cache, force=True)
            t3 = time.perf_counter()
            model(input_ids=ids[:, got:], **cache_kwargs(cache, model), use_cache=True)
            warm = time.perf_counter() - t2
            again = store.metrics()
            del cache
            fio_same = _fio(fio_path, max(nbytes, 1 << 20))  # fio moving the same bytes: ramp-up included alike
            row = {"prompt": n, "recompute_s": recompute, "hit_s": hit, "load_s": t1 - t0, "loaded_tokens": got,
                   "speedup": recompute / hit, "load_bytes": nbytes, "load_bytes_per_s": nbytes / (t1 - t0),
                   "ssd_read_s": after.ssd_s - before.ssd_s, "fio": fio,
                   "same_logits_as_recomputed_kv": bool(torch.equal(hit_logits, ref)),
                   "same_first_token": bool(torch.equal(ref.argmax(-1), hit_first)),
                   "same_first_token_as_full_prefill": bool(torch.equal(first, hit_first))}
            row["chunk_bytes_per_s"] = nbytes / row["ssd_read_s"] if row["ssd_read_s"] > 0 else None
            warm_read = again.ssd_s - after.ssd_s
            row.update(hit_warm_s=warm, speedup_warm=recompute / warm, load_warm_s=t3 - t2,
                       chunk_bytes_per_s_warm=(again.ssd_bytes - after.ssd_bytes) / warm_read if warm_read else None)
            row["vs_fio"] = row["load_bytes_per_s"] / fio if fio else None
            row["chunks_vs_fio"] = row["chunk_bytes_per_s"] / fio if fio and row["chunk_bytes_per_s"] else None
            row["chunks_warm_vs_fio"] = (row["chunk_bytes_per_s_warm"] / fio
                                         if fio and row["chunk_bytes_per_s_warm"] else None)
            row["fio_same_size"] = fio_same
            row["chunks_vs_fio_same_size"] = (row["chunk_bytes_per_s"] / fio_same
                                              if fio_same and row["chunk_bytes_per_s"] else None)
            row["chunks_warm_vs_fio_same_size"] = (row["chunk_bytes_per_s_warm"] / fio_same
                                                   if fio_same and row["chunk_bytes_per_s_warm"] else None)
            res.ttft.append(row)
            if fio:
                res.fio_read_bytes_per_s.append(fio)
            if progress:
                print(f"  kv ttft {n} tokens: recompute {recompute:.2f} s, hit {hit:.3f} s ({row['speedup']:.0f}x), "
                      f"chunks {human(row['chunk_bytes_per_s'] or 0)}/s, fetch {human(row['load_bytes_per_s'])}/s"
                      + (f", fio {human(fio)}/s" if fio else ""), file=sys.stderr)
    # (c) a fresh process right after: every stored chunk of every prompt must hit
    job = {"store": store_dir, "model": res.config["model_dir"], "chunk": cfg.page_tokens,
           "prompts": {str(n): ids[0].tolist() for n, ids in prompts.items()}}
    p = subprocess.run([sys.executable, "-m", "llmtier.bench.kv", "--restart-child", json.dumps(job)],
                       capture_output=True, text=True, timeout=600)
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
    res.restart = json.loads(line) if p.returncode == 0 and line else {"ok": False, "stderr": p.stderr[-600:]}


def _restart_child(job: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import AutoConfig  # noqa: PLC0415

    from ..offload.kv import PrefixStore, chain_keys  # noqa: PLC0415

    config = AutoConfig.from_pretrained(job["model"])

    m = types.SimpleNamespace(config=config, dtype=torch.bfloat16)  # identity only: config and dtype
    t0 = time.perf_counter()
    with PrefixStore(job["store"], chunk_tokens=job["chunk"]) as store:
        opened = time.perf_counter() - t0
        stored = hit = 0
        for ids in job["prompts"].values():
            keys = chain_keys(store.identity(m), ids, job["chunk"])
            stored += len(keys)
            hit += store.lookup(m, ids) // job["chunk"]
        met = store.metrics()
    return {"ok": True, "chunks_expected": stored, "chunks_hit": hit, "hit_rate": hit / stored if stored else None,
            "open_s": opened, "dropped_at_open": met.dropped_at_open, "chunks": met.chunks}


# -- driver --------------------------------------------------------------------------------------------------------
def run_kv_bench(cfg: KVBenchConfig, progress: bool = True) -> KVBenchResult:
    os.makedirs(cfg.directory, exist_ok=True)
    model, model_dir = _load_model(cfg, progress)
    layers, heads, head_dim = _geometry(model)
    res = KVBenchResult(config={**asdict(cfg), "model_dir": model_dir},
                        kv_bytes_per_token=2 * layers * heads * head_dim * 2)  # bf16, all layers
    fio_path = _fio_file(cfg)
    if "a" in cfg.parts:
        _decode_part(cfg, model, res, fio_path, progress)
    if "t" in cfg.parts:
        _age_part(cfg, model, res)
    if "b" in cfg.parts or "c" in cfg.parts:
        _ttft_part(cfg, model, res, fio_path, progress)
    return res


def format_result(res: KVBenchResult, cfg: KVBenchConfig) -> str:
    lines = []
    fio = statistics.median(res.fio_read_bytes_per_s) if res.fio_read_bytes_per_s else None
    lines.append(f"fio sequential read (1 MiB, QD32, direct): {human(fio) + '/s' if fio else 'not measured (no fio)'}")
    if res.decode:
        lines.append(f"(a) offloaded decode, batch {cfg.batch}, context {cfg.context}, {cfg.new_tokens} steps, "
                     f"page {cfg.page_tokens} tokens")
        for r in decode_summary(res, cfg):
            if r["fraction"] is None:
                what = "DynamicCache" if r["system"] == "DynamicCache" else "TieredCache, all in DRAM"
                lines.append(f"  {what}: {r['step_s']:.3f} s/step, {r['tok_s']:.2f} tok/s, tokens identical: "
                             f"{r['tokens_identical']}")
                continue
            io = f"{r['io_bound_s']:.3f}" if r.get("io_bound_s") is not None else "n/a"
            lines.append(f"  TieredCache {human(r['memory'])} ({r['fraction']:.0%} of KV): {r['step_s']:.3f} s/step, "
                         f"{r['tok_s']:.2f} tok/s; spilled {r['spilled_layers']}/{r['spilled_layers'] + r['resident_layers']}"
                         f" layers, reads {human(r['read_per_step'])}/step; bounds io {io} s, compute "
                         f"{r['compute_bound_s']:.3f} s; efficiency {r['efficiency']:.2f}; tokens identical: "
                         f"{r['tokens_identical']}")
            tr = r.get("traced_read")
            lines.append(f"    bytes read/written: analytic {human(r['analytic_read'])}/{human(r['analytic_write'])}, "
                         f"counted {human(r['counted_read'])}/{human(r['counted_write'])}"
                         + (f", traced {human(tr)}/{human(r['traced_write'])}" if tr is not None else "")
                         + (f", block layer {human(r['block_read'])}/{human(r['block_write'])}"
                            if r.get("block_read") is not None else ""))
    if res.age:
        a = res.age
        lines.append(f"(t) age profile: prompt {a['prompt']}, {a['new_tokens']} new tokens, page {a['page_tokens']}: "
                     f"reads per page (oldest first) {a['reads_per_page']}; expected {a['expected_per_page']}; "
                     f"report {a.get('report')}")
    for r in res.ttft:
        vs = f" = {r['vs_fio']:.2f}x fio" if r.get("vs_fio") else ""
        cv = f" = {r['chunks_vs_fio']:.2f}x fio" if r.get("chunks_vs_fio") else ""
        wv = f" = {r['chunks_warm_vs_fio']:.2f}x fio" if r.get("chunks_warm_vs_fio") else ""
        lines.append(f"(b) prompt {r['prompt']}: recompute {r['recompute_s']:.2f} s, hit {r['hit_s']:.3f} s "
                     f"({r['speedup']:.0f}x sooner), warm load buffer {r['hit_warm_s']:.3f} s "
                     f"({r['speedup_warm']:.0f}x); {r['loaded_tokens']} tokens, {human(r['load_bytes'])}: chunks "
                     f"read and verified at {human(r['chunk_bytes_per_s'] or 0)}/s{cv} (warm buffer "
                     f"{human(r['chunk_bytes_per_s_warm'] or 0)}/s{wv}); fio moving the same bytes "
                     f"{human(r.get('fio_same_size') or 0)}/s, the chunks "
                     f"{r.get('chunks_vs_fio_same_size') or float('nan'):.2f}x / warm "
                     f"{r.get('chunks_warm_vs_fio_same_size') or float('nan'):.2f}x of it; whole fetch into the cache "
                     f"{human(r['load_bytes_per_s'])}/s{vs}; logits equal to recomputed KV's: "
                     f"{r['same_logits_as_recomputed_kv']}; first token as a full prefill's: "
                     f"{r['same_first_token_as_full_prefill']}")
    if res.restart:
        r = res.restart
        lines.append(f"(c) restart: {r.get('chunks_hit')}/{r.get('chunks_expected')} stored chunks hit in a fresh "
                     f"process (index opened in {r.get('open_s', float('nan')):.3f} s)" if r.get("ok")
                     else f"(c) restart failed: {r.get('stderr')}")
    return "\n".join(lines)


def add_cli(bench: Any) -> None:
    k = bench.add_parser("kv", help="KV tier: offloaded decode vs in-memory, age profile, prefix-hit TTFT, restart")
    k.add_argument("--quick", action="store_true", help="a small model, small context, one round")
    k.add_argument("--dir", help="where the synthetic checkpoint, the spill files, the store and traces go")
    k.add_argument("--rounds", type=int)
    k.add_argument("--batch", type=int)
    k.add_argument("--context", type=int, help="tokens of context for the decode study (default 4096)")
    k.add_argument("--new-tokens", type=int, help="decode steps timed (default 16)")
    k.add_argument("--fractions", help="DRAM budgets as shares of the KV, comma list (default 0.25,0.5)")
    k.add_argument("--prompts", help="prompt lengths of the multi-turn study, comma list (default 512,...,8192)")
    k.add_argument("--parts", help="which of a (decode), t (age profile), b (TTFT), c (restart; needs b)")
    k.add_argument("--device", default="cpu", help="cuda: the model and its K/V on the GPU (decode study, part a)")
    k.add_argument("--json", metavar="PATH")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=cli_main)


def cli_main(args: Any) -> int:
    kw: dict[str, Any] = {}
    for name in ("rounds", "batch", "context", "new_tokens"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    if args.fractions:
        kw["fractions"] = tuple(float(x) for x in args.fractions.split(","))
    if args.prompts:
        kw["prompts"] = tuple(int(x) for x in args.prompts.split(","))
    if args.parts:
        kw["parts"] = tuple(args.parts.replace(",", ""))
    if args.device != "cpu":
        from ..engine.cuda import require_cuda  # noqa: PLC0415

        require_cuda(f"bench kv --device {args.device}")
        kw["device"] = args.device
        kw.setdefault("parts", ("a",))
    cfg = KVBenchConfig.quick(args.dir, **kw) if args.quick else \
        KVBenchConfig(**({"directory": args.dir} if args.dir else {}), **kw)
    res = run_kv_bench(cfg, progress=not args.no_progress)
    print(format_result(res, cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(res), f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--restart-child"]:
        print(json.dumps(_restart_child(json.loads(args[1]))))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
