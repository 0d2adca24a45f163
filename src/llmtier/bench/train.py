"""``llmtier train``: train a small GPT on the CPU with its AdamW state on SSD and its data from a token file.

For each optimizer budget (a share of the 12 bytes per parameter of fp32
master + two moments) a fresh model from the same seed (bf16 weights) trains
for ``steps`` steps from a synthetic token file through
:class:`~llmtier.data.TokenDataset`, stepped by
:class:`~llmtier.offload.optim.OffloadedAdamW` with gradient clipping and a
warm-up + cosine schedule.  Per step: time, the optimizer's share, bytes read
and written against the analytic count, the loss.  fio measures sequential
read and write (1 MiB, QD 32, O_DIRECT) on the same file system just before
each run: the I/O bound of a step is ``read bytes / fio read + written bytes /
fio write``, and efficiency = that bound / the measured optimizer step.  Every
budget computes the same numbers, so the loss curves must be identical.
With ``checkpoint_every`` an :mod:`llmtier.checkpoint` is saved every N steps
(the optimizer state streamed from SSD: :meth:`OffloadedAdamW.lazy_state_dict`).
With ``trace`` the run is recorded (:func:`llmtier.trace.record`): tags
``optim:chunkN`` (read-modify-write of chunk N) and ``data:window``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..units import human

STATE_BYTES_PER_PARAM = 12  # fp32 master + exp_avg + exp_avg_sq


@dataclass
class TrainConfig:
    """Knobs of :func:`run_train`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-train")
    params: int = 12_000_000  # about; GPTConfig.sized picks the shape (100-300M works, slowly, on a CPU)
    context: int = 128
    batch: int = 4
    steps: int = 12
    budgets: tuple[float, ...] = (0.25, 0.5)
    tokens: int = 8_000_000  # synthetic token file length (uint16)
    vocab: int = 8192
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    fio: bool = True
    trace: bool = False
    block: bool = False  # with trace: also the block layer (root)
    keep: bool = False  # keep the optimizer state files
    checkpoint_every: int = 0  # llmtier.checkpoint saves every N steps (0: none)


@dataclass
class BudgetRun:
    """One budget's training run."""

    budget: float
    budget_bytes: int
    chunks: int
    chunk_elems: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    fio_read_gib_s: float = float("nan")
    fio_write_gib_s: float = float("nan")
    analytic_read: int = 0
    analytic_write: int = 0
    trace: str = ""
    peak_rss: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # step, seconds, bytes
    predicted_s: float | None = None  # the planner's step time for this budget (None: no saved device profile)
    predicted_peak: int = 0
    bottleneck: str = ""

    def median(self, key: str, skip: int = 1) -> float:
        vals = [s[key] for s in self.steps[skip:]] or [s[key] for s in self.steps]
        return statistics.median(vals) if vals else float("nan")

    @property
    def io_bound_s(self) -> float:
        return self.analytic_read / (self.fio_read_gib_s * 2**30) + self.analytic_write / (self.fio_write_gib_s * 2**30)


def synthetic_tokens(path: str, n: int, vocab: int, seed: int = 0) -> None:
    """A token file (uint16) a model can learn: random picks from 1024 random 16-token phrases."""
    if os.path.exists(path) and os.path.getsize(path) == 2 * n:
        return
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, vocab, size=(1024, 16)).astype(np.uint16)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for lo in range(0, n, 1 << 22):
            m = min(1 << 22, n - lo)
            f.write(phrases[rng.integers(0, len(phrases), size=-(-m // 16))].reshape(-1)[:m].tobytes())
    os.replace(tmp, path)


def parse_count(text: str) -> int:
    """``"125M"`` -> 125000000, ``"300k"``, ``"1.5B"`` or a plain number."""
    t = str(text).strip().lower()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (try 12M or 125M)") from None


def fio_bandwidth(directory: str, size: int) -> tuple[float, float]:
    """Sequential write then read (1 MiB, QD 32, O_DIRECT) of ``size`` bytes in ``directory``: GiB/s each."""
    from .fio import run_fio  # noqa: PLC0415

    path = os.path.join(directory, "fio-ceiling.bin")
    size = max(64 << 20, size // (1 << 20) * (1 << 20))
    try:
        w = run_fio(path, "write", 1 << 20, 32, size)
        r = run_fio(path, "read", 1 << 20, 32, size)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return r.gib_per_s, w.gib_per_s


def lr_lambda(steps: int, warmup: int) -> Any:
    """Linear warm-up then cosine decay to 10%."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def train_once(cfg: TrainConfig, budget: float, token_file: str) -> BudgetRun:
    """Train ``cfg.steps`` steps with the optimizer state at ``budget`` x its size."""
    import torch  # noqa: PLC0415

    from .. import checkpoint  # noqa: PLC0415
    from ..data import TokenDataset  # noqa: PLC0415
    from ..offload.optim import OffloadedAdamW  # noqa: PLC0415
    from .gpt import GPT, GPTConfig  # noqa: PLC0415

    gcfg = GPTConfig.sized(cfg.params, context=cfg.context, vocab=cfg.vocab)
    torch.manual_seed(cfg.seed)
    model = GPT(gcfg).to(torch.bfloat16)
    nparams = sum(p.numel() for p in model.parameters())
    budget_bytes = int(budget * STATE_BYTES_PER_PARAM * nparams)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    state_dir = os.path.join(cfg.directory, f"optim-{budget:g}")
    placement = train_placement(cfg, budget_bytes)  # the planner's plan, built once: the optimizer takes its part
    opt = OffloadedAdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                         plan=placement.optim, path=state_dir, lr=cfg.lr, betas=(0.9, 0.95))
    run = BudgetRun(budget, budget_bytes, len(opt.chunks), opt.chunk_elems)
    run.predicted_peak = placement.predicted_peak
    if placement.prediction is not None:
        run.predicted_s, run.bottleneck = placement.prediction.seconds, placement.prediction.bottleneck
    run.analytic_read, run.analytic_write = opt.step_bytes()
    try:
        if cfg.fio:
            run.fio_read_gib_s, run.fio_write_gib_s = fio_bandwidth(cfg.directory, opt.state_bytes)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.steps, max(1, cfg.steps // 5)))
        data = TokenDataset(token_file, seq_len=cfg.context, batch_size=cfg.batch, seed=cfg.seed, batches=cfg.steps)
        batches = iter(data)
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            x, y = next(batches)
            t1 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            t2 = time.perf_counter()
            r0, w0 = opt.stats.bytes_read, opt.stats.bytes_written
            opt.step()
            t3 = time.perf_counter()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                info = checkpoint.save({"model": model.state_dict(), "optim": opt.lazy_state_dict(),
                                        "sched": sched.state_dict(), "data": data.state_dict(), "step": step + 1},
                                       os.path.join(cfg.directory, f"ckpt-{budget:g}"), step=step + 1, keep_last=1)
                run.checkpoints.append({"step": step + 1, "seconds": info.seconds, "bytes": info.bytes})
            run.steps.append({"step": step, "loss": loss.item(), "step_s": time.perf_counter() - t0,
                              "data_s": t1 - t0, "fwd_bwd_s": t2 - t1, "optim_s": t3 - t2,
                              "optim_wait_s": opt.stats.wait_s, "read": opt.stats.bytes_read - r0,
                              "written": opt.stats.bytes_written - w0})
        del batches
    finally:
        opt.close()
        if not cfg.keep:
            for name in os.listdir(state_dir):
                os.unlink(os.path.join(state_dir, name))
            os.rmdir(state_dir)
    run.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return run


def run_train(cfg: TrainConfig, progress: bool = True) -> list[BudgetRun]:
    """Train once per budget of ``cfg.budgets`` (see the module docstring)."""
    from .. import trace  # noqa: PLC0415

    os.makedirs(cfg.directory, exist_ok=True)
    token_file = os.path.join(cfg.directory, f"tokens-{cfg.tokens}-v{cfg.vocab}.bin")
    synthetic_tokens(token_file, cfg.tokens, cfg.vocab, cfg.seed)
    runs = []
    for budget in cfg.budgets:
        if progress:
            print(f"llmtier train: budget {budget:g} of the optimizer state, {cfg.steps} steps", file=sys.stderr)
        if cfg.trace:
            path = os.path.join(cfg.directory, f"train-{budget:g}.trace.npz")
            with trace.record(path, device_path=cfg.directory, block=cfg.block,
                              label=f"llmtier train, optimizer budget {budget:g}"):
                run = train_once(cfg, budget, token_file)
            run.trace = path
        else:
            run = train_once(cfg, budget, token_file)
        runs.append(run)
    return runs


def format_runs(runs: list[BudgetRun]) -> str:
    """A Markdown table per budget run, plus the loss curves."""
    lines = ["| budget | chunks | step s | optim s | fwd+bwd s | data s | read/step | analytic | written/step | "
             "fio r/w GiB/s | I/O bound s | efficiency |", "|" + "---|" * 12]
    for r in runs:
        eff = r.io_bound_s / r.median("optim_s") if r.median("optim_s") else float("nan")
        lines.append(f"| {r.budget:g} ({human(r.budget_bytes)}) | {r.chunks} | {r.median('step_s'):.3f} | "
                     f"{r.median('optim_s'):.3f} | {r.median('fwd_bwd_s'):.3f} | {r.median('data_s'):.4f} | "
                     f"{human(r.median('read'))} | {human(r.analytic_read)} | {human(r.median('written'))} | "
                     f"{r.fio_read_gib_s:.2f}/{r.fio_write_gib_s:.2f} | {r.io_bound_s:.3f} | {eff:.2f} |")
    lines.append("")
    for r in runs:
        for c in r.checkpoints:
            lines.append(f"checkpoint (budget {r.budget:g}) at step {c['step']}: {human(c['bytes'])} in {c['seconds']:.2f} s "
                         f"({c['bytes'] / max(c['seconds'], 1e-9) / 2**30:.2f} GiB/s), optimizer state streamed from SSD")
    for r in runs:
        lines.append(f"loss (budget {r.budget:g}): " + " ".join(f"{s['loss']:.4f}" for s in r.steps))
    if len(runs) > 1:
        same = all([s["loss"] for s in r.steps] == [s["loss"] for s in runs[0].steps] for r in runs)
        lines.append(f"loss curves identical across budgets: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(**({"directory": args.dir} if args.dir else {}))
    for key in ("steps", "context", "batch", "lr", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.params:
        cfg.params = parse_count(args.params)
    if args.budgets:
        cfg.budgets = tuple(float(b) for b in args.budgets.split(","))
    if args.tokens:
        cfg.tokens = args.tokens
    cfg.fio = not args.no_fio
    cfg.checkpoint_every = args.checkpoint_every or 0
    cfg.trace = args.trace
    cfg.block = args.block
    runs = run_train(cfg)
    print(format_runs(runs))
    for line in plan_lines(cfg, runs):  # the planner's prediction beside the measurement
        print(line)
    for r in runs:
        if r.trace:
            print(f"trace: {r.trace} (llmtier report {r.trace} -o DIR)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)
    return 0


def gpt2_config(cfg: TrainConfig) -> dict[str, Any]:
    """The GPT of ``cfg`` as a gpt2 config the planner's memory model reads."""
    from .gpt import GPTConfig  # noqa: PLC0415

    g = GPTConfig.sized(cfg.params, context=cfg.context, vocab=cfg.vocab)
    return {"model_type": "gpt2", "n_embd": g.dim, "n_layer": g.layers, "n_head": g.heads, "vocab_size": g.vocab,
            "n_positions": g.context, "torch_dtype": "bfloat16"}


def train_placement(cfg: TrainConfig, budget_bytes: int) -> Any:
    """The planner's placement for one optimizer budget (its ``.optim`` is what ``OffloadedAdamW`` takes)."""
    from ..cli_plan import given_placement  # noqa: PLC0415

    return given_placement(gpt2_config(cfg), batch=cfg.batch, prompt=cfg.context, train=True, optim_memory=budget_bytes)


def plan_lines(cfg: TrainConfig, runs: list[BudgetRun]) -> list[str]:
    """Per budget: the planner's predicted step time and peak (made when the run was planned) beside the measured ones."""
    out = []
    for r in runs:
        parts = [f"plan: predicted peak {human(r.predicted_peak)} (measured {human(r.peak_rss)}, "
                 f"{r.predicted_peak / max(1, r.peak_rss) - 1:+.0%})"]
        if r.predicted_s is None:
            parts.append("no time prediction: no saved device profile (llmtier bench io --save-profile)")
        else:
            m = r.median("step_s")
            parts.append(f"{r.predicted_s * 1e3:.1f} ms per step (measured {m * 1e3:.1f} ms, {r.predicted_s / m - 1:+.0%}), "
                         f"bound by {r.bottleneck}")
        out.append(f"budget {r.budget:g}: " + "; ".join(parts))
    return out


def add_cli(sub: Any) -> None:
    """The ``llmtier train`` verb."""
    t = sub.add_parser("train", help="train a small GPT on the CPU: AdamW state on SSD at memory budgets, "
                       "data from a token file; step time, bytes vs analytic, fio bound, loss")
    t.add_argument("--dir", help="directory on the disk to use (token file, optimizer state, traces)")
    t.add_argument("--params", help="model size, e.g. 12M (default) or 125M")
    t.add_argument("--steps", type=int, help="training steps per budget (default 12)")
    t.add_argument("--context", type=int, help="sequence length (default 128)")
    t.add_argument("--batch", type=int, help="sequences per step (default 4)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    t.add_argument("--seed", type=int, help="seed of the model, the data and the token file")
    t.add_argument("--budgets", help="optimizer DRAM budgets as shares of its state, e.g. 0.25,0.5 (default)")
    t.add_argument("--tokens", type=int, help="synthetic token file length (default 8000000)")
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save an llmtier.checkpoint every N steps (model, optimizer state streamed from SSD, "
                   "scheduler, loader position) to --dir/ckpt-<budget>")
    t.add_argument("--no-fio", action="store_true", help="do not measure the fio bound")
    t.add_argument("--trace", action="store_true", help="record the I/O (train-<budget>.trace.npz in --dir)")
    t.add_argument("--block", action="store_true", help="with --trace: also the block layer (root)")
    t.add_argument("--json", metavar="PATH", help="write the runs as JSON")
    t.set_defaults(func=cmd_train)


__all__ = ["BudgetRun", "TrainConfig", "add_cli", "format_runs", "parse_count", "run_train", "synthetic_tokens", "train_once"]
