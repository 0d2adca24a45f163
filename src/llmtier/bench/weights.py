"""``llmtier bench weights``: generate with a model larger than its memory
budget -- llmtier's weight streaming against the model fully in memory and
against Hugging Face accelerate disk offload under the same memory cgroup.

Every measurement is a fresh child process (page cache dropped first), so no
run inherits another's memory or cache.  Streamed runs and accelerate's run
in a cgroup v1 memory group capped at ``budget + OVERHEAD`` (the interpreter,
torch, transformers, activations and KV cache); the in-memory model runs
uncapped.  fio reads the checkpoint file in the same round (1 MiB, QD 32,
O_DIRECT): the I/O bound of a configuration is its streamed bytes per token
divided by that bandwidth, the compute bound is the in-memory time per token,
and efficiency = max(bounds) / measured time per token.  Because this disk
serves our repeated reads of one file faster than fio's pass (the host caches
under the VM), a second, stricter figure uses the engine's own bandwidth on
the very reads a run streams, measured with no compute just before the run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import human

# What a capped child may use beyond the weights budget: the interpreter, torch and
# its libraries (in the page cache, which the cgroup charges), activations, KV cache.
OVERHEAD = 1 << 30
TINYLLAMA = (2048, 5632, 32000, 32, 4, 22)  # hidden, intermediate, vocab, heads, kv heads, layers
QUICK = (512, 1408, 2048, 8, 2, 8)  # 49 MB, layers dominate as in real models


@dataclass
class WeightsBenchConfig:
    """Knobs of :func:`run_weights_bench`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-bench-weights")
    shape: tuple[int, ...] = TINYLLAMA
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 5
    prompt_len: int = 32
    new_tokens: int = 16
    peers: tuple[str, ...] = ("accelerate-hf", "accelerate-dispatch")
    threads: int = 2
    overhead: int = OVERHEAD
    trace: bool = True

    @classmethod
    def quick(cls, directory: str | None = None, **kw: Any) -> WeightsBenchConfig:
        base = {"shape": QUICK, "budgets": (0.5,), "batches": (1,), "rounds": 1, "new_tokens": 8, "trace": False}
        return cls(**({"directory": directory} if directory else {}), **{**base, **kw})


@dataclass
class Cell:
    """One configuration's runs."""

    system: str  # memory | llmtier | accelerate-hf | accelerate-dispatch
    budget: float  # share of the weights (1.0 for memory)
    batch: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        vals = [r[key] for r in self.runs if r.get("ok") and r.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    def spread(self, key: str) -> tuple[float, float]:
        vals = [r[key] for r in self.runs if r.get("ok") and r.get(key) is not None]
        return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def _child(job: dict[str, Any], limit: int | None, timeout: float) -> dict[str, Any]:
    from .cgroup import run_json_child  # noqa: PLC0415

    return run_json_child("llmtier.bench.weights", job, limit, timeout=timeout)


def _fio(path: str, size: int) -> float | None:
    from .fio import FioError, fio_available, run_fio  # noqa: PLC0415

    if not fio_available()[0]:
        return None
    try:
        return run_fio(path, "read", 1 << 20, 32, size - size % (1 << 20)).gib_per_s * 2**30
    except FioError:
        return None


def _engine_bw(model_dir: str, budget: int, passes: int = 2) -> float | None:
    """Bytes/s of the engine reading the layers a streamed run at ``budget``
    would stream, in the same order and requests, with no compute: the
    ceiling of the streaming itself (this disk serves repeated reads of one
    file faster than fio's, so fio alone would understate it)."""
    from ..engine import alloc  # noqa: PLC0415
    from ..offload.weights import BudgetError, open_layout  # noqa: PLC0415

    lay = open_layout(model_dir)
    try:
        try:
            plan = lay.plan(budget)
        except BudgetError:
            return None
        groups = [lay.groups[i] for i in plan.streamed]
        if not groups:
            return None
        bufs = [alloc(plan.slot_bytes) for _ in range(2)]
        pending: list = []
        n = 0
        t0 = time.perf_counter()
        for k in range(passes * len(groups)):
            g = groups[k % len(groups)]
            if len(pending) == 2:
                for f in pending.pop(0):
                    f.result()
            buf = bufs[k % 2]
            pending.append([lay.source.file(r.file).pread(buf[r.pos:r.pos + r.length], r.start, exact=False)
                            for r in g.runs])
            n += sum(r.length for r in g.runs)
        for futs in pending:
            for f in futs:
                f.result()
        return n / (time.perf_counter() - t0)
    finally:
        lay.source.close()


def run_weights_bench(cfg: WeightsBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run the study; returns a JSON-able dict (cells, fio, notes, acceptance)."""
    from tqdm import tqdm  # noqa: PLC0415

    from .cgroup import memory_cgroup_available  # noqa: PLC0415
    from .store import Arch, ensure_checkpoint  # noqa: PLC0415

    arch = Arch(*cfg.shape)
    ck = ensure_checkpoint(cfg.directory, arch, shard_bytes=8 << 30, progress=progress)
    model_dir, total = ck.hf_dir, ck.nbytes
    notes: list[str] = []
    capped, why = memory_cgroup_available()
    if not capped:
        notes.append(f"no memory cgroup ({why}): streamed and accelerate runs are NOT capped; their memory is "
                     "reported but not enforced")
    peers = cfg.peers
    cells: dict[tuple[str, float, int], Cell] = {}
    for b in cfg.batches:
        cells[("memory", 1.0, b)] = Cell("memory", 1.0, b)
        for frac in cfg.budgets:
            for system in ("llmtier", *peers):
                cells[(system, frac, b)] = Cell(system, frac, b)
    fio: list[float] = []
    steps = cfg.rounds * len(cells)
    bar = tqdm(total=steps, desc="bench weights", disable=not progress)
    offload_dir = os.path.join(cfg.directory, "accelerate-offload")
    timeout = 1800.0
    for rnd in range(cfg.rounds):
        bw = _fio(ck.shards[0], os.path.getsize(ck.shards[0]))
        if bw:
            fio.append(bw)
        for (system, frac, batch), cell in cells.items():
            budget = int(total * frac)
            job = {"system": system, "model": model_dir, "budget": budget, "batch": batch,
                   "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "threads": cfg.threads,
                   "offload_dir": offload_dir, "seed": rnd}
            bar.set_postfix_str(f"{system} {frac:.0%} b{batch}")
            limit = None if system == "memory" or not capped else budget + cfg.overhead
            ebw = _engine_bw(model_dir, budget) if system == "llmtier" else None
            run = _child(job, limit, timeout)
            run["engine_bw"] = ebw
            cell.runs.append(run)
            bar.update(1)
    bar.close()
    for batch in cfg.batches:  # every system, every round (same prompt): the tokens of the in-memory model
        ref = cells[("memory", 1.0, batch)].runs
        for (system, frac, b), cell in cells.items():
            if b != batch or system == "memory":
                continue
            bad = [k for k, r in enumerate(cell.runs) if r.get("ok") and ref[k].get("ok")
                   and r["tokens_digest"] != ref[k]["tokens_digest"]]
            if bad:
                notes.append(f"{system} {frac:.0%} batch {batch}: tokens differ from the in-memory model in "
                             f"round(s) {bad}")
    fio_bw = statistics.median(fio) if fio else None
    if fio_bw is None:
        notes.append("fio not available: no I/O bound and no efficiency figure")
    rows = []
    for (system, frac, batch), cell in cells.items():
        mem = cells[("memory", 1.0, batch)]
        s_tok = 1 / cell.median("decode_tok_s") if cell.median("decode_tok_s") > 0 else float("nan")
        row: dict[str, Any] = {"system": system, "budget": frac, "batch": batch,
                               "decode_tok_s": cell.median("decode_tok_s"),
                               "decode_tok_s_range": cell.spread("decode_tok_s"),
                               "prefill_s": cell.median("prefill_s"), "runs": len(cell.runs),
                               "failed": [r["error"] for r in cell.runs if not r.get("ok")],
                               "peak_rss_bytes": cell.median("peak_rss_bytes"),
                               "cgroup_peak_bytes": cell.median("cgroup_peak_bytes"),
                               "page_cache_growth_bytes": cell.median("page_cache_growth_bytes")}
        if system == "llmtier":
            per_tok = cell.median("streamed_bytes_per_pass")
            compute = 1 / mem.median("decode_tok_s")
            io = per_tok / fio_bw if fio_bw else float("nan")
            eng = [max(r["streamed_bytes_per_pass"] / r["engine_bw"], compute) * r["decode_tok_s"]
                   for r in cell.runs if r.get("ok") and r.get("engine_bw") and r.get("decode_tok_s")]
            row.update(streamed_bytes_per_token=per_tok, io_bound_s=io, compute_bound_s=compute,
                       efficiency=max(io, compute) / s_tok if fio_bw else float("nan"),
                       engine_bw=cell.median("engine_bw"),
                       efficiency_engine=statistics.median(eng) if eng else float("nan"),
                       stall_s=cell.median("stall_s"), resident_layers=cell.median("resident_layers"),
                       weights_memory_bytes=cell.median("weights_memory_bytes"))
            acc = [cells[(p, frac, batch)].median("decode_tok_s") for p in peers]
            acc = [a for a in acc if a == a and a > 0]
            row["vs_accelerate_best"] = row["decode_tok_s"] / max(acc) if acc else float("nan")
        rows.append(row)
    res = {"config": asdict(cfg), "checkpoint": ck.record(), "weights_bytes": total, "fio_read_bytes_per_s": fio,
           "fio_median": fio_bw, "rows": rows, "notes": notes, "capped": capped,
           "raw": [{"system": c.system, "budget": c.budget, "batch": c.batch, "runs": c.runs} for c in cells.values()]}
    if cfg.trace:
        res["trace"] = _traced_run(cfg, model_dir, total)
    return res


def _traced_run(cfg: WeightsBenchConfig, model_dir: str, total: int) -> dict[str, Any]:
    """One traced streamed run (50% budget, batch 1) and its report."""
    trace = os.path.join(cfg.directory, "weights-run.trace.npz")
    report = os.path.join(cfg.directory, "weights-run-report")
    argv = [sys.executable, "-m", "llmtier.cli", "run", "--model", model_dir, "--memory", str(total // 2),
            "--prompt-ids", ",".join(str(i + 1) for i in range(cfg.prompt_len)), "--max-new-tokens",
            str(cfg.new_tokens), "--threads", str(cfg.threads), "--trace", trace, "--json"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        return {"ok": False, "stderr": p.stderr[-600:]}
    from ..trace import load  # noqa: PLC0415
    from ..trace.report import write_report  # noqa: PLC0415

    out = write_report(load(trace), report, title="llmtier run: weights streamed at a 50% budget")
    return {"ok": True, "trace": trace, "report": report, "findings": out.get("findings")}


# -- the child -----------------------------------------------------------------------------------------------------
def _cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def child_main(job: dict[str, Any]) -> dict[str, Any]:
    """Load one system, generate once, return the figures (runs in a fresh process)."""
    import resource  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..offload.generate import generate_timed  # noqa: PLC0415

    torch.set_num_threads(job["threads"])
    g = torch.Generator().manual_seed(job["seed"])
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if job["system"] == "memory":
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16).eval()
    elif job["system"] == "llmtier":
        from ..offload import stream_model  # noqa: PLC0415

        model = stream_model(job["model"], job["budget"], verify="never")
        plan = model.llmtier.plan
        extra = {"resident_layers": len(plan.resident), "weights_memory_bytes": plan.memory_bytes,
                 "streamed_bytes_per_pass": plan.streamed_bytes_per_pass}
    else:
        from .peers_hf import load_accelerate  # noqa: PLC0415

        model = load_accelerate(job["model"], job["budget"], job["system"].removeprefix("accelerate-"),
                                job["offload_dir"])
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (job["batch"], job["prompt_len"]), generator=g)
    cached0 = _cached()
    timed = generate_timed(model, ids, job["new_tokens"])
    if job["system"] == "llmtier":
        s = model.llmtier.stats()
        extra.update(stall_s=s.stall_s, bytes_read=s.bytes_read, passes=s.passes)
        model.close()
    rec = timed.record()
    rec.pop("tokens")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**rec, **extra, "load_s": load_s, "peak_rss_bytes": peak,
            "page_cache_growth_bytes": _cached() - cached0,  # while generating
            "tokens_digest": hashlib.sha256(str(timed.tokens).encode()).hexdigest()[:16]}


# -- report --------------------------------------------------------------------------------------------------------
def format_report(res: dict[str, Any]) -> str:
    fio = res.get("fio_median")
    lines = [f"weights {human(res['weights_bytes'])}; fio 1 MiB QD32 direct read: "
             f"{fio / 2**30:.2f} GiB/s (median of {len(res['fio_read_bytes_per_s'])})" if fio else "fio: not run",
             "",
             "| system | budget | batch | decode tok/s (min-max) | prefill s | streamed/token | I/O bound s | "
             "compute bound s | efficiency (fio) | engine GiB/s | efficiency (engine) | vs accelerate | peak RSS | "
             "cgroup peak | page cache growth |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or x != x else format(x, fmt)

    def h(x: Any) -> str:
        return "-" if x is None or x != x else human(x)

    for r in res["rows"]:
        lo, hi = r["decode_tok_s_range"]
        lines.append(
            f"| {r['system']} | {r['budget']:.0%} | {r['batch']} | {f(r['decode_tok_s'], '.2f')} ({f(lo, '.2f')}-"
            f"{f(hi, '.2f')}) | {f(r['prefill_s'], '.2f')} | "
            f"{h(r.get('streamed_bytes_per_token'))} | "
            f"{f(r.get('io_bound_s'), '.3f')} | {f(r.get('compute_bound_s'), '.3f')} | "
            f"{f(r.get('efficiency'), '.2f')} | {f((r.get('engine_bw') or float('nan')) / 2**30, '.2f')} | "
            f"{f(r.get('efficiency_engine'), '.2f')} | {f(r.get('vs_accelerate_best'), '.2f')}x | "
            f"{h(r['peak_rss_bytes'])} | {h(r['cgroup_peak_bytes'])} | {h(r['page_cache_growth_bytes'])} |"
            + (f" failed: {', '.join(r['failed'])}" if r["failed"] else ""))
    lines += [f"note: {n}" for n in res["notes"]]
    for c in res["raw"]:
        for run in c["runs"]:
            if not run.get("ok"):
                tail = (run.get("stderr") or "").strip().splitlines()[-1:] or [""]
                lines.append(f"failed: {c['system']} {c['budget']:.0%} b{c['batch']}: {run['error']}: {tail[0]}")
    t = res.get("trace")
    if t:
        lines.append(f"traced run: {t.get('report', t.get('stderr'))}")
        for x in (t.get("findings") or []):
            lines.append(f"  - {x}")
    return "\n".join(lines)


def add_cli(bench: Any) -> None:
    w = bench.add_parser("weights", help="weight streaming vs in-memory vs accelerate disk offload (memory-capped)")
    w.add_argument("--quick", action="store_true", help="a small model, one budget, one round")
    w.add_argument("--dir", help="where the synthetic checkpoint and traces go")
    w.add_argument("--rounds", type=int)
    w.add_argument("--budgets", help="comma list of shares of the weights, e.g. 0.25,0.5")
    w.add_argument("--batches", help="comma list, e.g. 1,8")
    w.add_argument("--new-tokens", type=int)
    w.add_argument("--peers", help="comma list of accelerate-hf,accelerate-dispatch (or 'none')")
    w.add_argument("--no-trace", action="store_true")
    w.add_argument("--device", default="cpu", help="cuda: stream onto the GPU (a third of the layers resident, the rest "
                   "from pinned host memory and from the disk) against the in-GPU model and accelerate's CPU and "
                   "disk offload at the same GPU budget")
    w.add_argument("--json", metavar="PATH")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=cli_main)


def cli_main(args: argparse.Namespace) -> int:
    if args.device != "cpu":
        from .weights_cuda import format_report as gpu_report  # noqa: PLC0415
        from .weights_cuda import run_weights_cuda  # noqa: PLC0415

        out = run_weights_cuda(args.dir or os.path.join(tempfile.gettempdir(), "llmtier-bench-weights-cuda"),
                               shape=QUICK if args.quick else None, rounds=args.rounds or (1 if args.quick else 3),
                               new_tokens=args.new_tokens or 16, progress=not args.no_progress)
        print(gpu_report(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
        return 0
    kw: dict[str, Any] = {}
    if args.rounds:
        kw["rounds"] = args.rounds
    if args.budgets:
        kw["budgets"] = tuple(float(x) for x in args.budgets.split(","))
    if args.batches:
        kw["batches"] = tuple(int(x) for x in args.batches.split(","))
    if args.new_tokens:
        kw["new_tokens"] = args.new_tokens
    if args.peers:
        kw["peers"] = () if args.peers == "none" else tuple(args.peers.split(","))
    if args.no_trace:
        kw["trace"] = False
    cfg = WeightsBenchConfig.quick(args.dir, **kw) if args.quick else \
        WeightsBenchConfig(**({"directory": args.dir} if args.dir else {}), **kw)
    res = run_weights_bench(cfg, progress=not args.no_progress)
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m llmtier.bench.weights --child JOB_JSON (used by `llmtier bench weights`)")
