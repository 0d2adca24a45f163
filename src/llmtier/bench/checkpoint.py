"""``llmtier bench checkpoint``: llmtier's checkpoints against torch.save, safetensors, DCP and fio.

The state is that of a transformer trained with AdamW in mixed precision:
bf16 weights, fp32 master weights and two fp32 moments per parameter (about
14 bytes per parameter; the default shape has 271M parameters, 3.5 GiB),
random values, string keys throughout (so every peer can take it).  Each
round saves the state once with every method into a fresh file or directory,
drops the page cache, loads it back, and deletes it, in this order:

saves: llmtier ``save`` (durable), llmtier ``save_async`` (stall and total),
``torch.save`` + fsync, safetensors ``save_file`` + fsync, DCP
``FileSystemWriter`` (``dcp.save`` and ``dcp.async_save``), fio sequential
write (1 MiB, queue depth 32, O_DIRECT, ``--end_fsync=1``) of the same byte
count into a new file: the ceiling.
loads (page cache dropped before each): llmtier ``load`` (fresh memory and
``into=`` existing tensors), ``torch.load``, safetensors ``load_file``, DCP
``FileSystemReader``, fio sequential read of the file it wrote.

Round 0 is a warm-up and not counted.  Reported: the median over the
counted rounds of seconds and GiB/s per method, the spread, and the median
of each round's ratio to that round's fio.  Part ``k``: kill trials
(:mod:`llmtier.bench.checkpoint_kill`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import human
from .system import drop_page_cache


@dataclass
class CheckpointBenchConfig:
    """Knobs of :func:`run_checkpoint_bench`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-bench-checkpoint")
    hidden: int = 1024
    layers: int = 16
    ffn: int = 2816
    vocab: int = 32000
    rounds: int = 5  # counted rounds (plus one warm-up)
    kill_trials: int = 50
    staging_bytes: int | None = None  # llmtier save_async pool bound (None: the state's size)
    methods: tuple[str, ...] = ("llmtier", "llmtier_async", "memcpy", "fault", "torch", "safetensors", "dcp",
                                "dcp_async", "fio")

    @classmethod
    def quick(cls, directory: str | None = None, **kw: Any) -> CheckpointBenchConfig:
        base = {"hidden": 128, "layers": 2, "ffn": 352, "vocab": 1000, "rounds": 1, "kill_trials": 3}
        return cls(**({"directory": directory} if directory else {}), **{**base, **kw})


@dataclass
class CheckpointBenchResult:
    """Everything measured (seconds per round per method)."""

    params: int = 0
    state_bytes: int = 0
    save_s: dict[str, list[float]] = field(default_factory=dict)
    load_s: dict[str, list[float]] = field(default_factory=dict)
    stall_s: dict[str, list[float]] = field(default_factory=dict)
    staging_bytes: int = 0
    cache_note: str = ""
    engine: str = ""
    kill: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def make_training_state(cfg: CheckpointBenchConfig) -> tuple[dict[str, Any], int]:
    """``(state, parameter count)``: model (bf16), master (fp32), optim (two fp32 moments + step), plain data."""
    import torch  # noqa: PLC0415

    h, f, v = cfg.hidden, cfg.ffn, cfg.vocab
    shapes = {"embed.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,)}
    for i in range(cfg.layers):
        p = f"layers.{i}."
        shapes.update({p + "attn.q.weight": (h, h), p + "attn.k.weight": (h, h), p + "attn.v.weight": (h, h),
                       p + "attn.o.weight": (h, h), p + "mlp.gate.weight": (f, h), p + "mlp.up.weight": (f, h),
                       p + "mlp.down.weight": (h, f), p + "norm1.weight": (h,), p + "norm2.weight": (h,)})
    g = torch.Generator().manual_seed(0)
    master = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = {k: t.to(torch.bfloat16) for k, t in master.items()}
    optim = {k: {"exp_avg": torch.randn(s, generator=g) * 1e-3, "exp_avg_sq": torch.rand(s, generator=g) * 1e-6,
                 "step": torch.tensor(1000.0)} for k, s in shapes.items()}
    n = sum(t.numel() for t in master.values())
    state = {"model": model, "master": master, "optim": optim,
             "extra": {"step": 1000, "lr": 3e-4, "data_offset": 123456789}}
    return state, n


def _tensor_bytes(x: Any) -> int:
    if isinstance(x, dict):
        return sum(_tensor_bytes(v) for v in x.values())
    return x.numel() * x.element_size() if hasattr(x, "element_size") else 0


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in x.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif hasattr(v, "element_size"):
            out[prefix + k] = v
    return out


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_tree(src: Any, dst: Any, np: Any, torch: Any, copy: Any) -> None:
    if isinstance(src, dict):
        for k, v in src.items():
            _copy_tree(v, dst[k], np, torch, copy)
    elif isinstance(src, torch.Tensor):
        copy(dst.view(-1).view(torch.uint8).numpy(), src.view(-1).view(torch.uint8).numpy())


def _empty_like(x: Any) -> Any:
    import torch  # noqa: PLC0415

    if isinstance(x, dict):
        return {k: _empty_like(v) for k, v in x.items()}
    return torch.empty_like(x) if isinstance(x, torch.Tensor) else x


class _Methods:
    """One save and one load per method; each save writes a fresh target under ``root``."""

    def __init__(self, cfg: CheckpointBenchConfig, state: dict[str, Any], nbytes: int, res: CheckpointBenchResult,
                 root: str) -> None:
        from ..checkpoint import Checkpointer  # noqa: PLC0415

        self.cfg, self.state, self.nbytes, self.res, self.root = cfg, state, nbytes, res, root
        self.async_ck = Checkpointer(os.path.join(root, "llmtier-async"), staging_bytes=cfg.staging_bytes)
        self.res.engine = f"{self.async_ck.engine.name} ({self.async_ck.engine.reason})"
        self.step = 0
        self.into: Any = None

    def close(self) -> None:
        self.async_ck.close()

    # each returns (save seconds, stall seconds or None, load seconds); the target is deleted after
    def run(self, method: str) -> tuple[float, float | None, float | None]:
        self.step += 1
        fn: Callable[[], tuple[float, float | None, float | None]] = getattr(self, "_" + method)
        with warnings.catch_warnings():  # DCP says once per call that it runs without a process group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            return fn()

    def _timed_load(self, fn: Callable[[], Any]) -> float:
        drop_page_cache()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        del out
        return dt

    def _llmtier(self) -> tuple[float, float | None, float | None]:
        from .. import checkpoint  # noqa: PLC0415

        d = os.path.join(self.root, "llmtier")
        t0 = time.perf_counter()
        checkpoint.save(self.state, d, step=self.step)
        ts = time.perf_counter() - t0
        tl = self._timed_load(lambda: checkpoint.load(d))
        if self.into is None:
            self.into = _empty_like(self.state)
        self.res.load_s.setdefault("llmtier_into", []).append(self._timed_load(lambda: checkpoint.load(d, into=self.into)))
        shutil.rmtree(d)
        return ts, None, tl

    def _memcpy(self) -> tuple[float, float | None, float | None]:
        """The floor of any snapshot: the state's tensors copied into already-resident memory (the
        ``into`` tensors), one memcpy per tensor, split over as many threads as save_async's copy uses
        (``memcpy``) and on one thread (``memcpy_1t``)."""
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from ..checkpoint.staging import ParallelCopy  # noqa: PLC0415

        if self.into is None:
            self.into = _empty_like(self.state)
            _copy_tree(self.state, self.into, np, torch, np.copyto)  # fault the pages in, untimed
        t0 = time.perf_counter()
        _copy_tree(self.state, self.into, np, torch, np.copyto)
        self.res.save_s.setdefault("memcpy_1t", []).append(time.perf_counter() - t0)
        cp = ParallelCopy(self.async_ck._copy_threads)
        try:
            t0 = time.perf_counter()
            _copy_tree(self.state, self.into, np, torch, cp.copy)
            return time.perf_counter() - t0, None, None
        finally:
            cp.close()

    def _fault(self) -> tuple[float, float | None, float | None]:
        """The memory bound of a load into new tensors: page-faulting fresh memory of the state's size,
        as the loader does it (64 MiB arenas, transparent huge pages, its prefault threads)."""
        import threading  # noqa: PLC0415

        from ..checkpoint.readinto import ARENA, PREFAULT, alloc_huge  # noqa: PLC0415

        sizes = [min(ARENA, self.nbytes - a) for a in range(0, self.nbytes, ARENA)]
        bufs: list[Any] = []

        def work(k0: int) -> None:
            for k in range(k0, len(sizes), PREFAULT):
                b = alloc_huge(sizes[k])
                b[::4096] = 0
                bufs.append(b)

        ths = [threading.Thread(target=work, args=(i,)) for i in range(PREFAULT)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        dt = time.perf_counter() - t0
        bufs.clear()
        self.res.load_s.setdefault("fault", []).append(dt)
        return dt, None, None

    def _llmtier_async(self) -> tuple[float, float | None, float | None]:
        t0 = time.perf_counter()
        h = self.async_ck.save_async(self.state, step=self.step)
        stall = time.perf_counter() - t0
        h.wait()
        total = time.perf_counter() - t0
        self.res.staging_bytes = max(self.res.staging_bytes, h.info.staging_bytes)
        d = self.async_ck.directory
        for e in os.listdir(d):
            if e.startswith("step-"):
                shutil.rmtree(os.path.join(d, e))
        return total, stall, None

    def _torch(self) -> tuple[float, float | None, float | None]:
        import torch  # noqa: PLC0415

        p = os.path.join(self.root, "state.pt")
        t0 = time.perf_counter()
        with open(p, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(p)
        ts = time.perf_counter() - t0
        tl = self._timed_load(lambda: torch.load(p, weights_only=True))
        os.unlink(p)
        return ts, None, tl

    def _safetensors(self) -> tuple[float, float | None, float | None]:
        from safetensors.torch import load_file, save_file  # noqa: PLC0415

        p = os.path.join(self.root, "state.safetensors")
        flat = _flat(self.state)
        t0 = time.perf_counter()
        save_file(flat, p)
        _fsync_path(p)
        ts = time.perf_counter() - t0
        tl = self._timed_load(lambda: load_file(p))
        os.unlink(p)
        return ts, None, tl

    def _dcp(self) -> tuple[float, float | None, float | None]:
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415

        d = os.path.join(self.root, "dcp")
        t0 = time.perf_counter()
        dcp.save(self.state, storage_writer=dcp.FileSystemWriter(d))
        ts = time.perf_counter() - t0
        if self.into is None:
            self.into = _empty_like(self.state)
        tl = self._timed_load(lambda: dcp.load(self.into, storage_reader=dcp.FileSystemReader(d)))
        shutil.rmtree(d)
        return ts, None, tl

    def _dcp_async(self) -> tuple[float, float | None, float | None]:
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415

        d = os.path.join(self.root, "dcp-async")
        t0 = time.perf_counter()
        fut = dcp.async_save(self.state, storage_writer=dcp.FileSystemWriter(d))
        stall = time.perf_counter() - t0
        fut.result()
        total = time.perf_counter() - t0
        shutil.rmtree(d)
        return total, stall, None

    def _fio(self) -> tuple[float, float | None, float | None]:
        from .fio import run_fio  # noqa: PLC0415

        p = os.path.join(self.root, "fio.bin")
        size = self.nbytes - self.nbytes % (1 << 20)
        w = run_fio(p, "write", 1 << 20, 32, size, fresh=True)
        drop_page_cache()
        r = run_fio(p, "read", 1 << 20, 32, size)
        os.unlink(p)
        # as seconds for the state's byte count at fio's rate
        return self.nbytes / (w.gib_per_s * 2**30), None, self.nbytes / (r.gib_per_s * 2**30)


def run_checkpoint_bench(cfg: CheckpointBenchConfig, *, progress: bool = True) -> CheckpointBenchResult:
    """Run the benchmark; every file it writes lives under ``cfg.directory`` and is deleted."""
    from .fio import fio_available  # noqa: PLC0415

    res = CheckpointBenchResult()
    res.cache_note = drop_page_cache()[1]
    methods = list(cfg.methods)
    if "fio" in methods and not fio_available()[0]:
        methods.remove("fio")
        res.notes.append("fio is not installed: no ceiling measured")
    if "safetensors" in methods:
        try:
            import safetensors  # noqa: F401, PLC0415
        except ImportError:
            methods.remove("safetensors")
            res.notes.append("safetensors is not installed")
    root = os.path.join(cfg.directory, f"run-{os.getpid()}")
    os.makedirs(root, exist_ok=True)
    state, res.params = make_training_state(cfg)
    res.state_bytes = _tensor_bytes(state)
    m = _Methods(cfg, state, res.state_bytes, res, root)
    bar = _bar(progress, (cfg.rounds + 1) * len(methods))
    try:
        for rnd in range(cfg.rounds + 1):
            saved = {k: list(v) for k, v in res.load_s.items()}
            saved_s = {k: list(v) for k, v in res.save_s.items()}
            for method in methods:
                if bar is not None:
                    bar.set_description(f"round {rnd} {method}")
                ts, stall, tl = m.run(method)
                if rnd == 0:
                    continue
                res.save_s.setdefault(method, []).append(ts)
                if stall is not None:
                    res.stall_s.setdefault(method, []).append(stall)
                if tl is not None:
                    res.load_s.setdefault(method, []).append(tl)
                if bar is not None:
                    bar.update(1)
            if rnd == 0:
                res.load_s, res.save_s = saved, saved_s  # nor the warm-up's extra figures (into-loads ...)
    finally:
        m.close()
        if bar is not None:
            bar.close()
        shutil.rmtree(root, ignore_errors=True)
    del state
    if cfg.kill_trials:
        from .checkpoint_kill import run_kill_trials  # noqa: PLC0415

        kd = os.path.join(cfg.directory, f"kill-{os.getpid()}")
        try:
            k = run_kill_trials(kd, cfg.kill_trials, seed=1, size=4 << 20)
            res.kill = {"trials": k.trials, "corrupt": k.corrupt, "lost": k.lost,
                        "killed_mid_save": k.killed_mid_save, "steps": k.steps, "problems": k.problems}
        finally:
            shutil.rmtree(kd, ignore_errors=True)
    return res


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    with contextlib.suppress(ImportError):
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=total, unit="run", file=sys.stderr)
    return None


LABELS = {"llmtier": "llmtier save (durable)", "llmtier_async": "llmtier save_async (total)",
          "torch": "torch.save + fsync", "safetensors": "safetensors save_file + fsync",
          "dcp": "DCP FileSystemWriter save", "dcp_async": "DCP async_save (total)", "fio": "fio seq write, end_fsync",
          "memcpy": "memcpy of the state (snapshot floor)"}
LOAD_LABELS = {"llmtier": "llmtier load (new tensors)", "llmtier_into": "llmtier load into= existing",
               "torch": "torch.load", "safetensors": "safetensors load_file", "dcp": "DCP FileSystemReader (into)",
               "fio": "fio seq read", "fault": "page faults of new memory of the state's size (loader's threads)"}


def _ratios(times: list[float], fio: list[float] | None) -> str:
    if not fio or len(fio) != len(times):
        return "-"
    r = [f / t for t, f in zip(times, fio)]
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def format_result(res: CheckpointBenchResult, cfg: CheckpointBenchConfig) -> str:
    """Markdown tables of the result."""
    gib = res.state_bytes / 2**30
    lines = [f"state: {res.params / 1e6:.0f}M parameters, {human(res.state_bytes)} of tensors "
             f"({cfg.layers} layers, hidden {cfg.hidden}, ffn {cfg.ffn}, vocab {cfg.vocab}); "
             f"{len(next(iter(res.save_s.values()), []))} counted rounds after a warm-up; {res.cache_note}",
             f"engine: {res.engine}", "",
             "| save | median s | GiB/s median (min-max) | × fio, per round: median (min-max) |", "|---|---|---|---|"]
    for k, v in res.save_s.items():
        if k in ("memcpy", "memcpy_1t", "fault"):
            continue
        bw = [gib / t for t in v]
        lines.append(f"| {LABELS.get(k, k)} | {statistics.median(v):.2f} | {statistics.median(bw):.2f} "
                     f"({min(bw):.2f}-{max(bw):.2f}) | {_ratios(v, res.save_s.get('fio'))} |")
    lines += ["", "| async | stall median s (min-max) | stall ÷ durable llmtier save, per round |", "|---|---|---|"]
    for k, v in res.stall_s.items():
        base = res.save_s.get("llmtier")
        ratio = "-" if not base else f"{statistics.median([s / b for s, b in zip(v, base)]):.3f}"
        lines.append(f"| {LABELS.get(k, k).replace(' (total)', '')} | {statistics.median(v):.3f} "
                     f"({min(v):.3f}-{max(v):.3f}) | {ratio} |")
    for key, what in (("memcpy", "memcpy of the state into resident memory, save_async's copy threads (floor of "
                              "a copy-based snapshot)"), ("memcpy_1t", "the same memcpy on one thread")):
        if key in res.save_s:
            v, base = res.save_s[key], res.save_s.get("llmtier")
            ratio = "-" if not base else f"{statistics.median([s / b for s, b in zip(v, base)]):.3f}"
            lines.append(f"| {what} | {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}) | {ratio} |")
    lines.append(f"\nllmtier save_async staging memory: {human(res.staging_bytes)} (pool + two writer buffers)")
    lines += ["", "| load (page cache dropped) | median s | GiB/s median (min-max) | × fio read, per round |",
              "|---|---|---|---|"]
    for k, v in res.load_s.items():
        bw = [gib / t for t in v]
        lines.append(f"| {LOAD_LABELS.get(k, k)} | {statistics.median(v):.2f} | {statistics.median(bw):.2f} "
                     f"({min(bw):.2f}-{max(bw):.2f}) | {_ratios(v, res.load_s.get('fio'))} |")
    if res.kill:
        k = res.kill
        lines.append(f"\nkill trials: {k['trials']} SIGKILLs, {k['killed_mid_save']} left an unfinished save behind; "
                     f"corrupt resumes {k['corrupt']}, lost commits {k['lost']}")
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


def add_cli(bench: Any) -> None:
    """Register ``llmtier bench checkpoint``."""
    c = bench.add_parser("checkpoint", help="checkpoint save/load vs torch.save, safetensors, DCP and fio; kill trials")
    c.add_argument("--quick", action="store_true", help="a small state, one counted round, 3 kill trials")
    c.add_argument("--dir", help="where checkpoints are written (deleted after each run)")
    c.add_argument("--rounds", type=int, help="counted rounds (default 5; one warm-up round more)")
    c.add_argument("--layers", type=int)
    c.add_argument("--hidden", type=int)
    c.add_argument("--kill-trials", type=int)
    c.add_argument("--staging-bytes", help="bound on save_async's staging pool, e.g. 1G (default: the state's size)")
    c.add_argument("--methods", help=f"comma list of {','.join(CheckpointBenchConfig.methods)}")
    c.add_argument("--json", metavar="PATH")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cli_main)


def cli_main(args: Any) -> int:
    """The CLI verb: run, print Markdown, optionally write JSON."""
    from ..units import parse_size  # noqa: PLC0415

    kw: dict[str, Any] = {}
    for name in ("rounds", "layers", "hidden", "kill_trials"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.staging_bytes:
        kw["staging_bytes"] = parse_size(args.staging_bytes)
    if args.methods:
        kw["methods"] = tuple(args.methods.split(","))
    cfg = CheckpointBenchConfig.quick(args.dir, **kw) if args.quick else \
        CheckpointBenchConfig(**({"directory": args.dir} if args.dir else {}), **kw)
    res = run_checkpoint_bench(cfg, progress=not args.no_progress)
    print(format_result(res, cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(res), f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
