"""``llmtier bench train``: the training half measured against its bounds and its peers.

**Optimizer.**  A GPT's parameters (bf16) with random gradients, stepped in a
fresh child process per run: in-memory ``torch.optim.AdamW(foreach=False)`` on
fp32 masters (the reference of :class:`~llmtier.offload.optim.OffloadedAdamW`:
``master.grad = p.grad.float()``, step, ``p.copy_(master)``) -- the compute
bound -- and OffloadedAdamW at each budget (a share of the 12 bytes per
parameter of state).  Medians of the steps after a warm-up step.  Each child
runs in a cgroup v1 memory group (page cache dropped first): OffloadedAdamW
capped at ``budget + 4 bytes per parameter (bf16 weights and grads) +
OVERHEAD``; the peak (cgroup) and the RSS above the child's baseline (weights
and grads allocated, before the optimizer) are reported.  fio measures
sequential write and read (1 MiB, QD 32, O_DIRECT) of a file as large as the
state before each child: I/O bound = state / fio read + state / fio write;
efficiency = max(I/O bound, compute bound) / median step.  Because this
disk's bandwidth swings within seconds, the child also runs fio (256 MiB
write then read) just before every OffloadedAdamW step, and the per-step
efficiency (that step's bound / that step's time, median over the steps)
is reported next to it.

**Loader.**  A token file (uint16) on the disk under test; windows of
``seq_len + 1`` tokens (``seq_len = 2048``: every window is one 8 KiB request
after widening to 4 KiB pages).  Per round, interleaved, the page cache dropped
before each: fio random reads on the same file at the loader's request size
(``span``) and queue depth (the engine's), O_DIRECT;
:class:`~llmtier.data.TokenDataset` (one ``pread_pages`` per group of batches, prefetch);
nanoGPT's way (``np.memmap`` and a list of slices per batch, the same windows);
and ``DataLoader(num_workers=2)`` over that memmap dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..units import human
from .system import status_bytes

OVERHEAD = 1 << 30  # interpreter, torch, numpy and their libraries (their page cache is charged by the cgroup)


@dataclass
class TrainBenchConfig:
    """Knobs of :func:`run_train_bench`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-bench-train")
    params: int = 100_000_000
    budgets: tuple[float, ...] = (0.25, 0.5)
    steps: int = 8  # per child: 1 warm-up + the rest measured
    rounds: int = 1  # children per system
    loader_bytes: int = 2 << 30
    seq_len: int = 2048
    batch: int = 32
    loader_batches: int = 2048  # TokenDataset's batches per round (512 MiB, ~2 s: as long as fio's run)
    peer_batches: int = 128  # np.memmap's and DataLoader's (they are ~10x slower; their rate needs fewer)
    loader_rounds: int = 5
    prefetch: int = 4
    parts: tuple[str, ...] = ("optim", "loader")

    @classmethod
    def quick(cls, directory: str | None = None, **kw: Any) -> TrainBenchConfig:
        base = {"params": 1_000_000, "budgets": (0.25,), "steps": 3, "loader_bytes": 32 << 20,
                "loader_batches": 4, "peer_batches": 4, "loader_rounds": 1, "batch": 8}
        return cls(**({"directory": directory} if directory else {}), **{**base, **kw})


# -- optimizer ---------------------------------------------------------------------------------------------------
def optim_child(job: dict[str, Any]) -> dict[str, Any]:
    """One optimizer run (in the child process): step times, bytes, memory."""
    import resource  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..offload.optim import OffloadedAdamW  # noqa: PLC0415
    from .gpt import GPT, GPTConfig  # noqa: PLC0415

    torch.manual_seed(0)
    with torch.device("meta"):  # the shapes of a GPT; bf16 values made directly (no fp32 transient)
        shapes = [p.shape for p in GPT(GPTConfig.sized(job["params"], vocab=32768)).parameters()]
    params = [torch.nn.Parameter(torch.empty(s, dtype=torch.bfloat16).normal_(0.0, 0.02)) for s in shapes]
    for p in params:
        p.grad = torch.empty(p.shape, dtype=torch.bfloat16).normal_(0.0, 1e-3)
    n = sum(p.numel() for p in params)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports ~70 MiB of torch modules
    base = status_bytes("VmRSS")
    out: dict[str, Any] = {"params": n, "baseline_rss": base}
    if job["system"] == "memory":
        masters = [p.detach().float() for p in params]
        opt = torch.optim.AdamW(masters, lr=1e-4, foreach=False)

        def step() -> None:
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        close = None
    else:
        opt = OffloadedAdamW(params, memory=int(job["budget"] * 12 * n), path=job["dir"], lr=1e-4)
        step = opt.step
        close = opt.close
        out.update(state_bytes=opt.state_bytes, dram_bytes=opt.dram_bytes, chunks=len(opt.chunks))
    times, waits, fio_r, fio_w = [], [], [], []
    for _ in range(job["steps"]):
        if close is not None and job.get("fio"):  # the bound just before the step it bounds
            from .train import fio_bandwidth  # noqa: PLC0415

            r, w = fio_bandwidth(job["dir"], 256 << 20)
            fio_r.append(r)
            fio_w.append(w)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if close is not None:
            waits.append(opt.stats.wait_s)
    if close is not None:
        out.update(bytes_read=opt.stats.bytes_read, bytes_written=opt.stats.bytes_written, wait_s=waits,
                   step_fio_read_gib_s=fio_r, step_fio_write_gib_s=fio_w)
        close()
    out.update(step_s=times, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def _run_child(job: dict[str, Any], limit: int | None, capped: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "llmtier.bench.trainbench", "--child", json.dumps(job)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if capped and limit is not None:
        from .cgroup import run_in_cgroup  # noqa: PLC0415

        r = run_in_cgroup(argv, limit, drop_caches=True, env=env, timeout=3600)
        rc, out, err, peak, oom = r.returncode, r.stdout, r.stderr, r.peak_bytes, bool(r.oom_killed)
    else:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
        rc, out, err, peak, oom = p.returncode, p.stdout, p.stderr, None, False
    line = next((x for x in reversed(out.splitlines()) if x.startswith("{")), None)
    if rc != 0 or line is None:
        why = "killed by the memory cap (OOM)" if oom or rc in (-9, 137) else f"exit {rc}"
        return {"ok": False, "error": why, "stderr": err.strip()[-800:], "cgroup_peak": peak}
    res = json.loads(line)
    res.update(ok=True, cgroup_peak=peak, limit=limit)
    return res


def run_optim(cfg: TrainBenchConfig, notes: list[str]) -> list[dict[str, Any]]:
    """In-memory AdamW vs OffloadedAdamW per budget, fio before each child."""
    from .cgroup import memory_cgroup_available  # noqa: PLC0415
    from .train import fio_bandwidth  # noqa: PLC0415

    capped, why = memory_cgroup_available()
    if not capped:
        notes.append(f"no memory cgroup ({why}): runs are not capped; peak RSS is the process's own")
    rows = []
    state_dir = os.path.join(cfg.directory, "optim")
    systems = [("memory", 1.0)] + [("llmtier", b) for b in cfg.budgets]
    for _ in range(cfg.rounds):  # rounds interleave the systems: the machine's drift hits all alike
        for system, frac in systems:
            fio_r, fio_w = fio_bandwidth(cfg.directory, min(12 * cfg.params, 2 << 30))
            job = {"system": system, "params": cfg.params, "budget": frac, "dir": state_dir, "steps": cfg.steps,
                   "fio": True}
            limit = (16 << 30) if system == "memory" else int(frac * 12 * cfg.params) + 4 * cfg.params + OVERHEAD
            res = _run_child(job, limit, capped)
            res.update(system=system, budget=frac, fio_read_gib_s=fio_r, fio_write_gib_s=fio_w)
            rows.append(res)
    mem = [r for r in rows if r["system"] == "memory" and r.get("ok")]
    compute = statistics.median(t for r in mem for t in r["step_s"][1:]) if mem else float("nan")
    for r in rows:
        if not r.get("ok"):
            notes.append(f"{r['system']} {r['budget']:g}: {r['error']} {r.get('stderr', '')[-300:]}")
            continue
        meas = r["step_s"][1:] or r["step_s"]
        r["median_s"] = statistics.median(meas)
        r["range_s"] = (min(meas), max(meas))
        r["compute_bound_s"] = compute
        if r["system"] == "llmtier":
            gib = 2**30
            r["io_bound_s"] = r["state_bytes"] / (r["fio_read_gib_s"] * gib) + r["state_bytes"] / (r["fio_write_gib_s"] * gib)
            r["efficiency"] = max(r["io_bound_s"], compute) / r["median_s"]
            if r.get("step_fio_read_gib_s"):  # per step, against fio run just before that step
                per = [r["state_bytes"] / (fr * gib) + r["state_bytes"] / (fw * gib)
                       for fr, fw in zip(r["step_fio_read_gib_s"], r["step_fio_write_gib_s"])]
                r["step_io_bound_s"] = per
                effs = [max(b, compute) / t for b, t in zip(per[1:], r["step_s"][1:])] or [max(per[0], compute) / r["step_s"][0]]
                r["efficiency_per_step"] = statistics.median(effs)
                r["efficiency_per_step_range"] = (min(effs), max(effs))
            r["rss_above_baseline"] = r["peak_rss"] - r["baseline_rss"]
    if os.path.isdir(state_dir):
        for name in os.listdir(state_dir):
            os.unlink(os.path.join(state_dir, name))
    return rows


# -- loader ------------------------------------------------------------------------------------------------------
class MemmapWindows:
    """nanoGPT's ``get_batch``: slices of an ``np.memmap``, stacked (the same windows as a TokenDataset)."""

    def __init__(self, path: str, ds: Any, batches: int) -> None:
        self.path, self.ds, self.batches = path, ds, batches

    def batch(self, data: np.ndarray, k: int) -> tuple[Any, Any]:
        import torch  # noqa: PLC0415

        t = self.ds.seq_len
        starts = self.ds.starts(k).tolist()
        x = torch.stack([torch.from_numpy(data[s:s + t].astype(np.int64)) for s in starts])
        y = torch.stack([torch.from_numpy(data[s + 1:s + 1 + t].astype(np.int64)) for s in starts])
        return x, y

    def __iter__(self) -> Any:
        import torch  # noqa: PLC0415

        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        data = np.memmap(self.path, dtype=np.uint16, mode="r")  # re-opened per batch in nanoGPT; once here
        for k in range(w, self.batches, nw):
            yield self.batch(data, k)


def _loader_round(cfg: TrainBenchConfig, path: str, ds_seed: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..data import TokenDataset  # noqa: PLC0415
    from ..engine import current_settings  # noqa: PLC0415
    from .fio import run_fio  # noqa: PLC0415
    from .system import drop_page_cache  # noqa: PLC0415

    out: dict[str, Any] = {}
    ds = TokenDataset(path, seq_len=cfg.seq_len, batch_size=cfg.batch, seed=ds_seed, batches=cfg.loader_batches,
                      prefetch=cfg.prefetch)
    # fio as the loader reads: its request size (a window widened to whole pages) and its queue depth (the
    # engine's: every pread_pages keeps that many of its pages in flight), O_DIRECT, random offsets, same file
    qd = current_settings().queue_depth
    size = os.path.getsize(path) // ds.span * ds.span
    drop_page_cache()  # every reader of the round starts cold, fio included (file metadata too)
    fio = run_fio(path, "randread", ds.span, qd, size, runtime_s=2.0 if cfg.loader_batches > 8 else 1.0)
    out.update(fio_bytes_s=fio.gib_per_s * 2**30, request_size=ds.span, queue_depth=qd)
    req = sum(ds.request_bytes(k) for k in range(cfg.loader_batches))
    windows = cfg.batch * cfg.loader_batches
    drop_page_cache()
    t0 = time.perf_counter()
    n = sum(1 for _ in ds)
    dt = time.perf_counter() - t0
    out.update(ours_s=dt, ours_bytes_s=req / dt, ours_windows_s=windows / dt, request_bytes=req, batches=n)
    windows = cfg.batch * cfg.peer_batches
    mm = MemmapWindows(path, ds, cfg.peer_batches)
    drop_page_cache()
    t0 = time.perf_counter()
    sum(1 for _ in mm)
    out["memmap_windows_s"] = windows / (time.perf_counter() - t0)
    drop_page_cache()
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(_iterable(mm), batch_size=None, num_workers=2)
    sum(1 for _ in loader)
    out["dataloader_windows_s"] = windows / (time.perf_counter() - t0)
    return out


def _iterable(mm: MemmapWindows) -> Any:
    """``mm`` as a torch ``IterableDataset`` (workers are forked: a local class needs no pickling)."""
    import torch  # noqa: PLC0415

    class IterMemmap(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(mm)

    return IterMemmap()


def run_loader(cfg: TrainBenchConfig, notes: list[str]) -> dict[str, Any]:
    """The loader against fio, np.memmap and DataLoader(num_workers=2), cold cache, interleaved rounds."""
    from .train import synthetic_tokens  # noqa: PLC0415

    os.makedirs(cfg.directory, exist_ok=True)
    path = os.path.join(cfg.directory, f"loader-{cfg.loader_bytes}.bin")
    synthetic_tokens(path, cfg.loader_bytes // 2, 50000)
    rounds = [_loader_round(cfg, path, seed) for seed in range(cfg.loader_rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    rng = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds)) for k in rounds[0]}
    med.update(vs_fio=med["ours_bytes_s"] / med["fio_bytes_s"], vs_memmap=med["ours_windows_s"] / med["memmap_windows_s"],
               vs_dataloader=med["ours_windows_s"] / med["dataloader_windows_s"], rounds=rounds, range=rng,
               vs_fio_per_round=statistics.median(r["ours_bytes_s"] / r["fio_bytes_s"] for r in rounds),
               vs_memmap_per_round=statistics.median(r["ours_windows_s"] / r["memmap_windows_s"] for r in rounds))
    return med


# -- the study ---------------------------------------------------------------------------------------------------
def run_train_bench(cfg: TrainBenchConfig) -> dict[str, Any]:
    """Run the parts of the study; a JSON-able dict with the rows, the loader figures and notes."""
    os.makedirs(cfg.directory, exist_ok=True)
    notes: list[str] = []
    res: dict[str, Any] = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "notes": notes}
    if "optim" in cfg.parts:
        res["optim"] = run_optim(cfg, notes)
    if "loader" in cfg.parts:
        res["loader"] = run_loader(cfg, notes)
    return res


def format_report(res: dict[str, Any]) -> str:
    """Markdown tables of :func:`run_train_bench`'s result."""
    out = []
    if "optim" in res:
        out += ["| system | budget | step s (median, range) | compute bound s | I/O bound s | fio r/w GiB/s | "
                "efficiency | RSS above baseline | cgroup peak / cap |", "|" + "---|" * 9]
        for r in res["optim"]:
            if not r.get("ok"):
                out.append(f"| {r['system']} | {r['budget']:g} | failed: {r['error']} |||||||")
                continue
            io = f"{r['io_bound_s']:.3f}" if "io_bound_s" in r else "-"
            eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
            if "efficiency_per_step" in r:
                lo, hi = r["efficiency_per_step_range"]
                eff += f"; per step {r['efficiency_per_step']:.2f} ({lo:.2f}-{hi:.2f})"
            rss = human(r["rss_above_baseline"]) + f" (budget {human(r['dram_bytes'])})" if "rss_above_baseline" in r else "-"
            cg = f"{human(r['cgroup_peak'])} / {human(r['limit'])}" if r.get("cgroup_peak") else "-"
            out.append(f"| {r['system']} | {r['budget']:g} | {r['median_s']:.3f} ({r['range_s'][0]:.3f}-"
                       f"{r['range_s'][1]:.3f}) | {r['compute_bound_s']:.3f} | {io} | {r['fio_read_gib_s']:.2f}/"
                       f"{r['fio_write_gib_s']:.2f} | {eff} | {rss} | {cg} |")
        out += ["", "| all rounds | budget | children | median step s | compute bound s | median I/O bound s | "
                "efficiency = max(bounds) / step |", "|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys((r["system"], r["budget"]) for r in res["optim"]):
            rs = [r for r in res["optim"] if (r["system"], r["budget"]) == key and r.get("ok")]
            if not rs:
                continue
            med = statistics.median(t for r in rs for t in (r["step_s"][1:] or r["step_s"]))
            comp = rs[0]["compute_bound_s"]
            io = statistics.median(b for r in rs for b in r.get("step_io_bound_s", [r.get("io_bound_s", float("nan"))]))
            eff = max(io, comp) / med if key[0] == "llmtier" else float("nan")
            out.append(f"| {key[0]} | {key[1]:g} | {len(rs)} | {med:.3f} | {comp:.3f} | "
                       f"{'-' if key[0] == 'memory' else f'{io:.3f}'} | {'-' if key[0] == 'memory' else f'{eff:.2f}'} |")
    if "loader" in res:
        m = res["loader"]
        out += ["", "| loader (cold cache) | windows/s | request MiB/s | vs fio | llmtier vs it |", "|---|---|---|---|---|",
                f"| fio randread {m['request_size'] // 1024:.0f} KiB QD{m['queue_depth']:.0f} | - | "
                f"{m['fio_bytes_s'] / 2**20:.0f} | 1.00 | {m['vs_fio']:.2f} |",
                f"| llmtier TokenDataset | {m['ours_windows_s']:.0f} | {m['ours_bytes_s'] / 2**20:.0f} | "
                f"{m['vs_fio']:.2f} | - |",
                f"| np.memmap windows (nanoGPT) | {m['memmap_windows_s']:.0f} | - | - | {m['vs_memmap']:.2f} |",
                f"| DataLoader(num_workers=2) over memmap | {m['dataloader_windows_s']:.0f} | - | - | "
                f"{m['vs_dataloader']:.2f} |"]
    out += ["", *("note: " + n for n in res["notes"])]
    return "\n".join(out)


def cmd_bench_train(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {}
    if args.params:
        from .train import parse_count  # noqa: PLC0415

        kw["params"] = parse_count(args.params)
    if args.budgets:
        kw["budgets"] = tuple(float(b) for b in args.budgets.split(","))
    if args.parts:
        kw["parts"] = tuple(args.parts.split(","))
    if args.loader_gib:
        kw["loader_bytes"] = int(args.loader_gib * 2**30)
    for key in ("steps", "rounds", "loader_rounds", "loader_batches", "peer_batches"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    cfg = TrainBenchConfig.quick(args.dir, **kw) if args.quick else TrainBenchConfig(
        **({"directory": args.dir} if args.dir else {}), **kw)
    res = run_train_bench(cfg)
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


def add_cli(bench: Any) -> None:
    """The ``llmtier bench train`` verb."""
    t = bench.add_parser("train", help="OffloadedAdamW vs in-memory AdamW (memory-capped), TokenDataset vs fio, "
                         "np.memmap and DataLoader")
    t.add_argument("--quick", action="store_true", help="1M parameters, a 32 MiB token file, one round (seconds)")
    t.add_argument("--dir", help="directory on the disk under test")
    t.add_argument("--params", help="optimizer study size, e.g. 100M (default)")
    t.add_argument("--budgets", help="optimizer budgets as shares of its state (default 0.25,0.5)")
    t.add_argument("--steps", type=int, help="steps per optimizer child (first is warm-up)")
    t.add_argument("--rounds", type=int, help="optimizer children per system")
    t.add_argument("--loader-rounds", type=int, help="loader rounds (default 5)")
    t.add_argument("--loader-batches", type=int, help="TokenDataset's batches of 32 windows per loader round (default 2048)")
    t.add_argument("--peer-batches", type=int, help="np.memmap's and DataLoader's batches per round (default 128)")
    t.add_argument("--loader-gib", type=float, help="token file size for the loader part (default 2)")
    t.add_argument("--parts", help="optim,loader (default both)")
    t.add_argument("--json", metavar="PATH", help="write the result as JSON")
    t.set_defaults(func=cmd_bench_train)


def _main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(optim_child(json.loads(sys.argv[2]))))
        return 0
    print("usage: python -m llmtier.bench.trainbench --child JOB", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main())


__all__ = ["OVERHEAD", "MemmapWindows", "TrainBenchConfig", "add_cli", "format_report", "optim_child",
           "run_train_bench"]
