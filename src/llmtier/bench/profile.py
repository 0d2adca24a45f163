"""Measure this machine's device profile (``llmtier bench io --save-profile``) for the planner.

Disk: direct writes then reads of one file through llmtier's engine at the
request sizes the runtimes issue (KV page groups ~256 KiB, the weights'
read-ahead pieces 1 MiB, whole layers and optimizer records 4-16 MiB), page
cache dropped before each read.  DRAM: a large ``numpy`` copy.  CPU: a bf16
matrix multiply and matrix-vector product with torch's threads, a small HF
decoder layer's fixed cost per token, fp32 AdamW updates per second.  Base:
the peak RSS of a fresh process that imports torch, transformers and llmtier.
GPU: pinned host -> device copy bandwidth, only where CUDA is usable.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from ..plan.profile import DeviceProfile, save_profile
from .system import drop_page_cache

SIZES = (256 << 10, 1 << 20, 4 << 20, 16 << 20)


def _disk(directory: str, total: int, sizes: tuple[int, ...], rounds: int) -> tuple[dict[int, float], dict[int, float]]:
    from ..engine import alloc, open_engine  # noqa: PLC0415

    path = os.path.join(directory, f"llmtier-profile-{os.getpid()}.bin")
    read: dict[int, list[float]] = {s: [] for s in sizes}
    write: dict[int, list[float]] = {s: [] for s in sizes}
    depth = 8
    try:
        with open_engine("auto") as eng:
            for _ in range(rounds):
                for s in sizes:
                    bufs = [alloc(s, huge=True) for _ in range(depth)]  # as the streamer's slots
                    for b in bufs:
                        np.frombuffer(b, dtype=np.uint8)[:] = 7
                    n = max(depth, total // s)
                    with eng.open(path, "w") as f:
                        t0 = time.perf_counter()
                        futs = []
                        for k in range(n):
                            if len(futs) == depth:
                                futs.pop(0).result()
                            futs.append(f.pwrite(bufs[k % depth], k * s))
                        for fut in futs:
                            fut.result()
                        f.sync()
                        write[s].append(n * s / (time.perf_counter() - t0))
                    drop_page_cache()
                    with eng.open(path) as f:
                        t0 = time.perf_counter()
                        futs = []
                        for k in range(n):
                            if len(futs) == depth:
                                futs.pop(0).result()
                            futs.append(f.pread(bufs[k % depth], k * s))
                        for fut in futs:
                            fut.result()
                        read[s].append(n * s / (time.perf_counter() - t0))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return ({s: float(np.median(v)) for s, v in read.items()}, {s: float(np.median(v)) for s, v in write.items()})


def _dram(nbytes: int = 256 << 20) -> float:
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def _cpu(quick: bool) -> dict[str, float]:
    import torch  # noqa: PLC0415

    out: dict[str, float] = {}
    n = 1024
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    reps = 3 if quick else 8
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    out["gemm_flops"] = reps * 2 * n ** 3 / (time.perf_counter() - t0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(reps * 4):
        torch.nn.functional.linear(x, w)
    out["gemv_bw"] = reps * 4 * w.numel() * 2 / (time.perf_counter() - t0)
    out["matmul_bw"] = _matmul_rates(w, reps)
    # AdamW on fp32 as OffloadedAdamW updates a chunk (torch's foreach-free functional form)
    e = 1 << 22
    p, g, m, v = (torch.randn(e) for _ in range(4))
    v.abs_()
    t0 = time.perf_counter()
    for _ in range(reps):
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.mul_(1 - 1e-4).addcdiv_(m, v.sqrt().add_(1e-8), value=-1e-3)
    out["adam_elems_s"] = reps * e / (time.perf_counter() - t0)
    out["layer_overhead_s"] = _layer_overhead(reps)
    out["step_overhead_s"] = _step_overhead(reps, out["layer_overhead_s"])
    out["train_flops"] = _train_rate(2 if quick else 4)
    out["expert_overhead_s"] = _expert_overhead(reps, out["layer_overhead_s"])
    return out


MATMUL_BATCHES = (1, 2, 4, 8, 16, 32)


def _matmul_rates(w: Any, reps: int) -> dict[int, float]:
    """Bytes of bf16 weights per second of ``[batch, k] x w`` at the batch sizes decode runs (median of ``reps * 4``)."""
    import torch  # noqa: PLC0415

    out = {}
    for b in MATMUL_BATCHES:
        x = torch.randn(b, w.shape[1], dtype=torch.bfloat16)
        torch.nn.functional.linear(x, w)
        times = []
        for _ in range(reps * 4):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
        out[b] = w.numel() * 2 / float(np.median(times))
    return out


def _train_rate(reps: int) -> float:
    """FLOP/s of a small bf16 Llama's forward + backward (6 x params x tokens per step), as ``llmtier`` trains."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=1024)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 1024, (2, 128))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 6 * params * ids.numel() / float(np.median(times[1:]))


def _expert_overhead(reps: int, dense_layer_s: float) -> float:
    """Seconds per routed expert a token hits in a decode step beyond a dense layer's cost (a tiny Mixtral, 8 experts,
    top-2): the per-expert dispatch of transformers' MoE blocks."""
    from transformers import MixtralConfig, MixtralForCausalLM  # noqa: PLC0415

    cfg = MixtralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=8, vocab_size=256, num_local_experts=8, num_experts_per_tok=2)
    return max(0.0, (_layer_overhead(reps, MixtralForCausalLM(cfg).eval()) - dense_layer_s) / 2)


def _step_overhead(reps: int, layer_s: float) -> float:
    """Seconds a decode step of ``generate()`` (as llmtier's runs call it) takes beyond its decoder layers' fixed
    cost: embedding, head, logits processing, the cache's bookkeeping (a tiny Llama, batch 1)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from ..offload.generate import generate_timed  # noqa: PLC0415

    layers = 8
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 32))
    steps = []
    for _ in range(2):
        st = generate_timed(model, ids, 4 * reps + 1).stamps
        steps += [b - a for a, b in itertools.pairwise(st[1:])]
    return max(0.0, float(np.median(steps)) - layers * layer_s)


def _probe_llama() -> Any:
    """The tiny Llama (8 layers, hidden 64) whose decode steps :func:`_layer_overhead` times."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=8, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def _layer_overhead(reps: int, model: Any = None) -> float:
    """Seconds per decoder layer of a tiny Llama forward (batch 1, one token after 32): Python and dispatch cost."""
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    from ..offload.hfcompat import cache_kwargs  # noqa: PLC0415

    if model is None:
        model = _probe_llama()
    cfg = model.config
    layers = cfg.num_hidden_layers
    ids = torch.randint(0, 256, (1, 32))
    times = []
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        model(ids, use_cache=True, **cache_kwargs(cache, model))
        nxt = ids[:, -1:]
        for _ in range(reps * 5):
            t0 = time.perf_counter()
            model(nxt, use_cache=True, **cache_kwargs(cache, model))
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) / layers


def read_slowdown(directory: str, rounds: int = 5, reps: int = 12) -> float:
    """The factor by which a small Llama's decode steps (as :func:`_layer_overhead` times them) slow down while the
    engine reads a scratch file in ``directory`` beside them (1 MiB direct reads, 8 in flight, another thread), as
    a streamed model's layers compute under their read-ahead: the median over ``rounds`` of the two, alternated.
    Never below 1."""
    import threading  # noqa: PLC0415

    from ..engine import alloc, open_engine  # noqa: PLC0415

    path = os.path.join(directory, f"llmtier-slowdown-{os.getpid()}.bin")
    size, piece, depth = 64 << 20, 1 << 20, 8
    bufs = [alloc(piece, huge=True) for _ in range(depth)]
    for b in bufs:
        np.frombuffer(b, dtype=np.uint8)[:] = 3
    ratios = []
    try:
        with open_engine("auto") as eng:
            with eng.open(path, "w") as f:
                for fut in [f.pwrite(bufs[k % depth], k * piece) for k in range(size // piece)]:
                    fut.result()
                f.sync()
            stop = threading.Event()

            def reader() -> None:
                with eng.open(path) as f:
                    futs, k = [], 0
                    while not stop.is_set():
                        if len(futs) == depth:
                            futs.pop(0).result()
                        futs.append(f.pread(bufs[k % depth], (k * piece) % size))
                        k += 1
                    for fut in futs:
                        fut.result()

            model = _probe_llama()
            _layer_overhead(1, model)  # warm
            for _ in range(rounds):
                alone = _layer_overhead(reps, model)
                stop.clear()
                th = threading.Thread(target=reader, daemon=True)
                th.start()
                try:
                    beside = _layer_overhead(reps, model)
                finally:
                    stop.set()
                    th.join()
                ratios.append(beside / alone if alone > 0 else 1.0)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return max(1.0, float(np.median(ratios)))


def _base_bytes(directory: str) -> int:
    """The memory a process takes before any model: the memory-cgroup peak (page cache of the libraries it maps
    included, as a cgroup counts it) of a child that imports what the planned runs import."""
    from .plan import base_bytes  # noqa: PLC0415

    return base_bytes(directory)


def _h2d() -> float | None:
    from ..engine.cuda import cuda_reason  # noqa: PLC0415

    if cuda_reason():
        return None
    import torch  # noqa: PLC0415

    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * src.numel() / (time.perf_counter() - t0)


def measure_profile(directory: str, *, quick: bool = False, overlap_rounds: int | None = None) -> DeviceProfile:
    """Measure this machine (see the module doc); ``quick``: 64 MiB per disk size, one round (seconds).
    ``overlap_rounds``: streamed-decode probes whose median is the overlap loss (default 1 quick, else 3)."""
    import torch  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)

    read, write = _disk(directory, (64 << 20) if quick else (256 << 20), SIZES, 1 if quick else 3)
    cpu = _cpu(quick)
    from .plan import activation_scale, overheads, stream_bookkeeping, stream_overlap_median  # noqa: PLC0415

    notes = ["machine shared with other work while measured" if os.cpu_count() and os.cpu_count() <= 4 else ""]
    base = _base_bytes(directory)
    gen, train, moe_train = overheads(directory, base)
    prof = DeviceProfile(read, write, _dram(), cpu["gemm_flops"], cpu["gemv_bw"], cpu["layer_overhead_s"],
                         cpu["adam_elems_s"], base, _h2d(), torch.get_num_threads(), os.path.abspath(directory),
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), platform.node(),
                         [n for n in notes if n], quick, gen, train, cpu["expert_overhead_s"], cpu["train_flops"],
                         cpu["matmul_bw"], cpu["step_overhead_s"], moe_train)
    prof.read_slowdown = read_slowdown(directory, 5 if quick else 9)
    prof.stream_layer_s = stream_bookkeeping(directory)
    prof.stream_overlap_loss = stream_overlap_median(directory, prof, overlap_rounds or (1 if quick else 3))
    prof.train_activation_scale = activation_scale(directory, 2 if quick else 3)
    return prof


def format_profile(p: DeviceProfile) -> str:
    """The profile as a few lines."""
    g = 1 << 30
    lines = [f"device profile ({'quick' if p.quick else 'full'}, {p.measured_at}, {p.threads} threads, dir {p.directory})"]
    for s in sorted(p.read_bw):
        lines.append(f"  disk {s >> 10:>6} KiB requests: read {p.read_bw[s] / g:.2f} GiB/s, "
                     f"write {p.write_bw.get(s, 0) / g:.2f} GiB/s")
    lines.append(f"  DRAM copy {p.dram_copy_bw / g:.2f} GiB/s; bf16 GEMM {p.gemm_flops / 1e9:.1f} GFLOP/s "
                 f"(training {p.train_flops / 1e9:.1f} GFLOP/s); "
                 f"GEMV {p.gemv_bw / g:.2f} GiB/s of weights")
    if p.matmul_bw:
        rates = ", ".join(f"{b}: {v / g:.2f}" for b, v in sorted(p.matmul_bw.items()))
        lines.append(f"  decode products (batch: GiB/s of weights) {rates}")
    lines.append(f"  decoder layer fixed cost {p.layer_overhead_s * 1e3:.3f} ms (+{p.expert_overhead_s * 1e3:.3f} ms per routed "
                 f"expert hit, +{p.step_overhead_s * 1e3:.2f} ms per decode step); AdamW {p.adam_elems_s / 1e6:.0f} M elems/s; "
                 f"process base {p.base_bytes / (1 << 20):.0f} MiB, run overhead {p.run_overhead_bytes / (1 << 20):.0f} MiB "
                 f"(training {p.train_overhead_bytes / (1 << 20):.0f} MiB, a MoE model's "
                 f"{p.moe_train_overhead_bytes / (1 << 20):.0f} MiB)")
    cpu = f"{p.stream_layer_s * 1e3:.3f} ms" if p.stream_layer_s else "not measured"
    lines.append(f"  streamed decode: the streamer's CPU {cpu} per streamed layer; compute "
                 f"{p.read_slowdown:.2f}x slower while the disk reads beside it; "
                 f"{p.stream_overlap_loss:.0%} of the smaller of compute and weight reads does not hide under the other "
                 "beyond the pipeline model")
    if p.train_activation_scale:
        lines.append(f"  training activations: {p.train_activation_scale:.2f} x the memory model's formula (measured)")
    lines.append(f"  pinned host->GPU {p.h2d_bw / g:.2f} GiB/s" if p.h2d_bw else "  pinned host->GPU: no CUDA here")
    return "\n".join(lines)


def cmd_save_profile(args: Any, directory: str) -> int:
    """``llmtier bench io --save-profile [PATH]``: measure, print and save."""
    prof = measure_profile(directory, quick=bool(getattr(args, "quick", False)))
    path = save_profile(prof, args.save_profile or None)
    print(format_profile(prof))
    print(f"saved {path}", file=sys.stderr)
    return 0


__all__ = ["SIZES", "cmd_save_profile", "format_profile", "measure_profile", "read_slowdown"]
