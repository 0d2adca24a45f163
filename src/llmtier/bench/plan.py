"""``llmtier bench plan``: the planner's predictions held against measurements.

For each configuration (dense and MoE models x budgets x batch; generation
with streamed weights and a spilled KV tier, and training with AdamW state on
SSD) the planner places the model within a budget and predicts the peak
memory and the time per decode token (or per training step) from the device
profile; then a fresh process runs exactly that placement (``stream_model``
with the plan's weight budget, ``TieredCache`` with its KV budget,
``OffloadedAdamW`` with its chunk budget) inside a memory cgroup capped at the
plan's budget, and reports the cgroup's peak and the median step time.  The
table shows predicted vs measured and the error.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LLMTierError
from ..units import human
from .system import reset_peak_rss, status_bytes

MODELS: dict[str, dict[str, Any]] = {
    "dense": {"builder": "hf", "arch": "llama", "layers": 8, "vocab": 8192, "hidden_size": 512, "intermediate_size": 1536},
    "moe": {"builder": "family", "arch": "mixtral", "layers": 6, "vocab_size": 4096, "hidden_size": 256,
            "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2},
    "deep": {"builder": "hf", "arch": "llama", "layers": 16, "vocab": 4096, "hidden_size": 128, "intermediate_size": 384},
    "dense-train": {"builder": "hf", "arch": "llama", "layers": 4, "vocab": 4096, "hidden_size": 256,
                    "intermediate_size": 768},
    "moe-train": {"builder": "family", "arch": "mixtral", "layers": 4, "vocab_size": 4096, "hidden_size": 256,
                  "intermediate_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2},
}


@dataclass
class Config:
    """One row: a model, a workload and the share of the weights the budget leaves them (``weights`` x W)."""

    name: str
    model: str
    batch: int
    prompt: int
    new_tokens: int = 16
    weights: float = 1.2  # budget = process + activations + KV + weights x this
    kv_share: float = 1.0  # of the full KV the budget leaves (< 1: the tier spills)
    train: bool = False
    steps: int = 6


CONFIGS: list[Config] = [
    Config("dense resident b1", "dense", 1, 64),
    Config("dense stream 50% b1", "dense", 1, 64, weights=0.5),
    Config("dense stream 30% b4", "dense", 4, 64, weights=0.3),
    Config("deep KV spill b4x1024", "deep", 4, 1024, weights=1.0, kv_share=0.4),
    Config("deep KV spill b8x512", "deep", 8, 512, weights=1.0, kv_share=0.3),
    Config("moe resident b1", "moe", 1, 64),
    Config("moe stream 50% b1", "moe", 1, 64, weights=0.5),
    Config("moe stream 30% b4", "moe", 4, 64, weights=0.3),
    Config("dense train b2x128", "dense-train", 2, 128, train=True),
    Config("dense train b4x128", "dense-train", 4, 128, train=True),
    # measured after as many steps as the planner's memory probe runs: a MoE model's training memory climbs
    # for ~150 steps on CPUs with oneDNN's bf16 kernels (bench.layerprobe.probe_train_memory)
    Config("moe train b2x128", "moe-train", 2, 128, train=True, steps=200),
]
QUICK = [CONFIGS[1], CONFIGS[7]]


@dataclass
class Row:
    config: Config
    memory: int = 0
    predicted_peak: int = 0
    predicted_s: float = 0.0
    bottleneck: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    measured_peak: int | None = None  # the median of the children's peak RSS (VmHWM)
    cgroup_peak: int | None = None  # the cgroup's peak: RSS + the page cache charged to it (swings on a shared machine)
    measured_s: float | None = None
    spread_s: tuple[float, float] | None = None
    ok: bool = False
    error: str = ""
    children: list[dict[str, Any]] = field(default_factory=list)  # per child: its peak RSS and median step

    @property
    def mem_err(self) -> float | None:
        return (self.predicted_peak / self.measured_peak - 1) if self.measured_peak else None

    @property
    def time_err(self) -> float | None:
        return (self.predicted_s / self.measured_s - 1) if self.measured_s else None


def build_model(directory: str, kind: str) -> str:
    """Write the random-weight model of ``kind`` (see :data:`MODELS`) once; returns its directory."""
    spec = dict(MODELS[kind])
    path = os.path.join(directory, f"model-{kind}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    builder, arch, layers = spec.pop("builder"), spec.pop("arch"), spec.pop("layers")
    if builder == "hf":
        from .hfmodels import make_model  # noqa: PLC0415

        make_model(path, arch, layers=layers, tokenizer=False, **spec)
    else:
        from .families import make_family_model  # noqa: PLC0415

        make_family_model(path, arch, layers=layers, **spec)
    return path


def model_path(directory: str, kind: str) -> str:
    """What a configuration streams from: the HF directory, or for a MoE model its llmtier store.  A safetensors
    checkpoint stores each expert apart at unaligned offsets; transformers fuses them, and the pieces of the fused
    tensors go through the engine's bounce buffers, freed only by the cyclic GC (+20-50 MiB measured on the bench's
    MoE shapes): a store lays them out aligned, each read straight into place (as ``bench moe`` does)."""
    path = build_model(directory, kind)
    if MODELS[kind]["builder"] != "family":
        return path
    from .moe_models import ensure_store  # noqa: PLC0415

    return ensure_store(path)


def _memory_for(m: Any, c: Config, base: int, profile: Any = None, kept: int | None = None,
                overhead: int | None = None) -> int:
    """The budget of a configuration: what it needs outside the weights, the weights' share, the KV's share
    (training: ``kept``, the measured activations and overhead, where probed; generation: ``overhead``, the
    measured run overhead, where probed)."""
    from ..plan.planner import SLACK, Workload, _kv_need, _reserve, least_memory, training_activations  # noqa: PLC0415
    from ..plan.weights import RUN_OVERHEAD  # noqa: PLC0415

    if c.train:
        t = m.training(c.batch, c.prompt)
        opt = min(t.offloaded_state_bytes, 44 * m.params) // 2  # half the chunk pipeline a whole state would need
        acts = training_activations(m, Workload(c.batch, c.prompt, 0, True), profile) \
            + _reserve(profile, train=True, moe=bool(m.expert_bytes)) if kept is None else kept + kept // 10
        return int((base + acts + t.weights + t.gradients + opt) / (1 - SLACK))
    w = Workload(c.batch, c.prompt, c.new_tokens)
    kv = _kv_need(m, w, set(range(len(m.windows))))
    over = getattr(profile, "run_overhead_bytes", 0) if overhead is None else overhead
    acts = m.prefill_activation_bytes(c.batch, c.prompt) + max(RUN_OVERHEAD, over)
    want = int((base + acts + kv * c.kv_share + m.weight_bytes * c.weights) / (1 - SLACK))
    return max(want, least_memory(m, w, base, profile, overhead_bytes=overhead) + (4 << 20))


def plan_job(p: Any) -> dict[str, Any]:
    """The placement's parts as the child takes them (JSON): the weights' :class:`~llmtier.plan.weights.Plan`, the KV
    tier's :class:`~llmtier.plan.planner.KVPlan` (only where a layer spills: else transformers' own cache), the
    optimizer's :class:`~llmtier.plan.planner.OptimPlan`."""
    import dataclasses  # noqa: PLC0415

    kv, opt = p.kv, p.optim
    return {"weights_plan": dataclasses.asdict(p.weights),
            "kv_plan": dataclasses.asdict(kv) if kv is not None and kv.spilled else None,
            "optim_plan": dataclasses.asdict(opt) if opt is not None else None}


def run_child(job: dict[str, Any], limit: int, timeout: float = 900) -> dict[str, Any]:
    """Run one job in a fresh process in a memory cgroup of ``limit`` bytes (plain process when none is usable)."""
    from .cgroup import CgroupError, run_json_child  # noqa: PLC0415

    try:
        res = run_json_child("llmtier.bench.plan", job, limit, timeout=timeout)
    except CgroupError:
        res = run_json_child("llmtier.bench.plan", job, None, timeout=timeout)
    res["cgroup_peak"] = res.pop("cgroup_peak_bytes", None)
    return res


def overheads(directory: str, base: int) -> tuple[int, int, int]:
    """(generation, training, MoE training) overhead: a small model's peak RSS beyond base and the memory model's
    terms (the last: a small Mixtral-shaped model's training step, unlike any row of :data:`CONFIGS`)."""
    from ..plan import model_memory  # noqa: PLC0415
    from ..plan.optim import BYTES_PER_ELEM  # noqa: PLC0415
    from .hfmodels import make_model  # noqa: PLC0415

    path = os.path.join(directory, "model-probe")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_model(path, "llama", layers=2, tokenizer=False)
    m = model_memory(path)
    job = {"kind": "infer", "model": path, "batch": 1, "prompt": 32, "new_tokens": 8, "steps": 2,
           "weights_memory": 1 << 30, "kv_memory": 0, "kv_spill": False, "optim_memory": BYTES_PER_ELEM * 65536,
           "dir": directory}
    inf = run_child(job, 8 << 30)
    trn = run_child({**job, "kind": "train"}, 8 << 30)
    t = m.training(1, 32)
    gen = (inf.get("rss_peak") or 0) - base - m.weight_bytes - m.kv_bytes(1, 40) - m.prefill_activation_bytes(1, 32)
    tr = (trn.get("rss_peak") or 0) - base - t.weights - t.gradients - t.activations - job["optim_memory"]
    mpath = os.path.join(directory, "model-probe-moe")
    if not os.path.exists(os.path.join(mpath, "config.json")):
        from .families import make_family_model  # noqa: PLC0415

        make_family_model(mpath, "mixtral", layers=2, vocab_size=1024, hidden_size=128, intermediate_size=256,
                          num_local_experts=4, num_experts_per_tok=2)
    mm = model_memory(mpath)
    mt = mm.training(1, 32)
    moe = run_child({**job, "kind": "train", "model": mpath}, 8 << 30)
    mtr = (moe.get("rss_peak") or 0) - base - mt.weights - mt.gradients - mt.activations - job["optim_memory"]
    return max(0, gen), max(0, tr), max(0, mtr)


CHILDREN = 3  # fresh processes per configuration: this VM's speed swings from one minute to the next
REFRESH_DISK_BYTES = 256 << 20  # per request size, each time the rates are measured again (32 MiB swung +-25%)

ACTS_PROBE = {"layers": 2, "vocab": 3072, "hidden_size": 384, "intermediate_size": 1024}  # unlike every row's model
ACTS_BATCHES, ACTS_SEQ, ACTS_STEPS = (1, 5), 96, 6


def activation_scale(directory: str, repeats: int = 2) -> float:
    """What a dense training step saves for backward on this machine over the memory model's formula: a small Llama
    (:data:`ACTS_PROBE`) trained :data:`ACTS_STEPS` steps at two batch sizes, each in a fresh process; the difference
    of the two peaks (everything else is the same in both) against the formula's difference.  The largest of
    ``repeats`` (a budget is safer too large than too small); 0 when no probe ran."""
    from ..plan import model_memory  # noqa: PLC0415
    from ..plan.optim import BYTES_PER_ELEM  # noqa: PLC0415
    from .hfmodels import make_model  # noqa: PLC0415

    path = os.path.join(directory, "model-probe-acts")
    if not os.path.exists(os.path.join(path, "config.json")):
        spec = dict(ACTS_PROBE)
        make_model(path, "llama", layers=spec.pop("layers"), tokenizer=False, **spec)
    m = model_memory(path)
    lo, hi = ACTS_BATCHES
    formula = m.training(hi, ACTS_SEQ).activations - m.training(lo, ACTS_SEQ).activations
    got = []
    for _ in range(repeats):
        peaks = []
        for b in (lo, hi):
            res = run_child({"kind": "train", "model": path, "batch": b, "prompt": ACTS_SEQ, "new_tokens": 0,
                             "steps": ACTS_STEPS, "dir": directory, "optim_memory": BYTES_PER_ELEM * 65536}, 8 << 30)
            peaks.append(res.get("rss_job_growth") if res.get("ok") else None)
        if None not in peaks and formula > 0:
            got.append((peaks[1] - peaks[0]) / formula)
    return max(got) if got else 0.0


STREAM_PROBE = {"layers": 6, "vocab": 2048, "hidden_size": 640, "intermediate_size": 1792}  # unlike every row's model


def _stream_probe_model(directory: str) -> str:
    """The small Llama of :data:`STREAM_PROBE` in ``directory`` (written once); its path."""
    from .hfmodels import make_model  # noqa: PLC0415

    path = os.path.join(directory, "model-probe-stream")
    if not os.path.exists(os.path.join(path, "config.json")):
        spec = dict(STREAM_PROBE)
        make_model(path, "llama", layers=spec.pop("layers"), tokenizer=False, **spec)
    return path


def stream_overlap(directory: str, profile: Any, slots: int = 3) -> float | None:
    """How much of a streamed decode step's smaller part (compute or weight reads) does not hide under the larger
    beyond what the planner's pipeline model (``plan.pipeline``) already counts:
    a small Llama (:data:`STREAM_PROBE`, unlike every row of :data:`CONFIGS`) streamed through ``slots`` layer buffers
    in a fresh process; its measured step against the planner's compute (its own layer timed) and reads.  None when the
    probe could not run (its layer not timed, or the child failed)."""
    import dataclasses  # noqa: PLC0415

    from ..plan import model_memory, plan_given  # noqa: PLC0415
    from ..plan.planner import Workload  # noqa: PLC0415
    from .layerprobe import probe_layer  # noqa: PLC0415

    path = _stream_probe_model(directory)
    m = model_memory(path)
    w = Workload(1, 32, 24)
    timing = probe_layer(path, 1, 32, weight_bytes=max(m.layer_bytes, default=0))
    wmem = m.outside_bytes + m.embedding_bytes + slots * max(m.layer_bytes)
    p = plan_given(m, w, dataclasses.replace(profile, stream_overlap_loss=0.0), weights_memory=wmem, layer_timing=timing)
    if timing is None or p.prediction is None or not p.weights.streamed:
        return None
    res = run_child({"kind": "infer", "model": path, "batch": 1, "prompt": 32, "new_tokens": 24, "steps": 0,
                     "dir": directory, **plan_job(p)}, 8 << 30)
    if not res.get("ok"):
        return None
    step = statistics.median(res["steps_s"][1:])
    c, io = p.prediction.compute_s, p.prediction.parts["weights_io_s"]
    return min(1.0, max(0.0, (step - p.prediction.seconds) / max(min(c, io), 1e-9)))  # beyond the pipeline model


def stream_bookkeeping(directory: str) -> float:
    """The weight streamer's CPU per streamed layer and pass (``WeightStreamer.bookkeeping_s``) on the small Llama of
    :data:`STREAM_PROBE`, every layer streamed through 3 slots, in this process (seconds; 0 when it cannot run)."""
    from ..offload import stream_model  # noqa: PLC0415
    from ..plan import model_memory  # noqa: PLC0415

    path = _stream_probe_model(directory)
    m = model_memory(path)
    try:
        with stream_model(path, m.outside_bytes + m.embedding_bytes + 3 * max(m.layer_bytes), verify="never") as s:
            return s.llmtier.bookkeeping_s() if s.llmtier.plan.from_disk else 0.0
    except LLMTierError:
        return 0.0


def stream_overlap_median(directory: str, profile: Any, rounds: int = 3) -> float:
    """:func:`stream_overlap` measured ``rounds`` times, the disk's rate re-measured before each but the first (it
    swings from one moment to the next on a VM, and the loss is a difference against it; ``profile`` was just
    measured): the median; 0 when no round ran."""
    losses = []
    for r in range(rounds):
        if r:
            profile = refresh_profile(profile, directory)
        got = stream_overlap(directory, profile)
        if got is not None:
            losses.append(got)
    return statistics.median(losses) if losses else 0.0


def base_bytes(directory: str) -> int:
    """The peak RSS of a child that imports what the runs import and stops (the process term of the model)."""
    res = run_child({"kind": "base"}, 8 << 30)
    return int(res.get("rss_peak") or 0)


def refresh_profile(profile: Any, directory: str) -> Any:
    """``profile`` with its CPU rates, 256 KiB / 1 MiB / 4 MiB disk reads and the compute's slowdown under reads
    measured again, now (seconds)."""
    import dataclasses  # noqa: PLC0415

    from .profile import _cpu, _disk, read_slowdown  # noqa: PLC0415

    cpu = _cpu(True)
    sizes = (256 << 10, 1 << 20, 4 << 20)
    read, write = _disk(directory, REFRESH_DISK_BYTES, sizes, 1)
    return dataclasses.replace(profile, read_bw={**profile.read_bw, **read}, write_bw={**profile.write_bw, **write},
                               read_slowdown=read_slowdown(directory), stream_layer_s=stream_bookkeeping(directory),
                               gemm_flops=cpu["gemm_flops"], gemv_bw=cpu["gemv_bw"],
                               layer_overhead_s=cpu["layer_overhead_s"], adam_elems_s=cpu["adam_elems_s"],
                               expert_overhead_s=cpu["expert_overhead_s"], train_flops=cpu["train_flops"],
                               matmul_bw=cpu["matmul_bw"], step_overhead_s=cpu["step_overhead_s"])


def _steps(res: dict[str, Any]) -> list[float]:
    """A child's timed steps, the first (warm-up) left out where there are more than two."""
    s = res["steps_s"]
    return s[1:] if len(s) > 2 else s


RATES = ("gemm_flops", "gemv_bw", "layer_overhead_s", "adam_elems_s", "expert_overhead_s", "train_flops", "step_overhead_s",
         "read_slowdown", "stream_layer_s")


def median_profile(profiles: list[Any]) -> Any:
    """The first of ``profiles`` with every rate :func:`refresh_profile` measures replaced by its median over all."""
    import dataclasses  # noqa: PLC0415

    def med(get: Callable[[Any], float]) -> float:
        return statistics.median(get(p) for p in profiles)

    first = profiles[0]
    table = {k: med(lambda p, k=k: p.matmul_bw.get(k, first.matmul_bw[k])) for k in first.matmul_bw}
    return dataclasses.replace(
        first, read_bw={s: med(lambda p, s=s: p.read_bw.get(s, first.read_bw[s])) for s in first.read_bw},
        write_bw={s: med(lambda p, s=s: p.write_bw.get(s, first.write_bw[s])) for s in first.write_bw},
        matmul_bw=table, **{k: med(lambda p, k=k: getattr(p, k)) for k in RATES})


def run_plan_bench(directory: str, configs: list[Config], profile: Any = None, progress: bool = True,
                   recalibrate: bool = True, overlap_rounds: int = 3, children: int = CHILDREN) -> dict[str, Any]:
    """Predict, then measure, every configuration (``children`` fresh processes each: the median of their median
    steps and of their peaks, every child within the cap for the row to fit; each child's figures are kept in
    ``Row.children``); returns the rows and the profile used."""
    import dataclasses  # noqa: PLC0415

    from ..plan import model_memory, plan_inference, plan_training  # noqa: PLC0415
    from ..plan.planner import Workload, predict_decode, predict_step  # noqa: PLC0415
    from .layerprobe import probe_infer_memory, probe_layer, probe_train_memory  # noqa: PLC0415
    from .profile import measure_profile  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    if profile is None:
        profile = measure_profile(directory, quick=True, overlap_rounds=overlap_rounds)
    rows: list[Row] = []
    for c in configs:
        if recalibrate:  # the CPU and disk rates right now: the machine is shared, its rates swing run to run
            profile = refresh_profile(profile, directory)
        path = build_model(directory, c.model) if c.train else model_path(directory, c.model)
        m = model_memory(path)
        w = Workload(c.batch, c.prompt, 0 if c.train else c.new_tokens, c.train)
        # MoE training: what its steps keep measured on its own first layers (the activation formula and the
        # profile's small probe miss the climb of oneDNN's per-shape kernels); dense training: the formula
        kept = probe_train_memory(path, c.batch, c.prompt, directory, steps=c.steps) \
            if c.train and m.expert_bytes else None
        # generation: the run overhead measured on the model's own first layers (MoE: oneDNN's per-shape kernels
        # again; dense: its first layer, the allocator's slack a long prefill leaves)
        over = None if c.train else probe_infer_memory(build_model(directory, c.model), c.batch, c.prompt,
                                                       c.new_tokens, directory, per_layer=bool(m.expert_bytes))
        memory = _memory_for(m, c, profile.base_bytes, profile, kept, over)
        row = Row(c, memory)
        timing = None if c.train else probe_layer(build_model(directory, c.model), c.batch, c.prompt,
                                                   weight_bytes=max(m.layer_bytes, default=0))
        try:
            p = plan_training(m, w, memory, profile, kept_bytes=kept) if c.train else plan_inference(
                m, w, memory, profile, layer_timing=timing, overhead_bytes=over)
        except LLMTierError as exc:  # one row the planner refuses is reported, the others still run
            row.error = f"the planner refused the budget: {exc}"
            rows.append(row)
            if progress:
                print(f"[bench plan] {c.name}: {row.error}", file=sys.stderr, flush=True)
            continue
        row.predicted_peak, row.plan = p.predicted_peak, p.as_dict()
        row.predicted_s = p.prediction.seconds if p.prediction else 0.0
        row.bottleneck = p.prediction.bottleneck if p.prediction else ""
        job = {"kind": "train" if c.train else "infer", "model": path, "batch": c.batch, "prompt": c.prompt,
               "new_tokens": c.new_tokens, "steps": c.steps, "dir": directory, **plan_job(p)}
        if progress:
            probed = (f", measured on its first layers: training keeps {human(kept)}" if kept is not None else
                      f", measured on its first layers: run overhead {human(over)}" if over is not None else "")
            print(f"[bench plan] {c.name}: budget {human(memory)}, predicted peak {human(row.predicted_peak)}, "
                  f"{row.predicted_s * 1e3:.1f} ms{probed}", file=sys.stderr, flush=True)
        # each child runs right after the machine's rates (and the model's layer) were measured again: the prediction
        # takes their medians, so that it and the measurement see the same stretch of this VM's swings
        runs, profs, timings = [], [], []
        for k in range(max(1, children)):
            if k and recalibrate:
                profile = refresh_profile(profile, directory)
                if timing is not None:
                    timing = probe_layer(build_model(directory, c.model), c.batch, c.prompt,
                                         weight_bytes=max(m.layer_bytes, default=0)) or timing
            profs.append(profile)
            timings.append(timing)
            runs.append(run_child(job, memory))
        if len(profs) > 1:
            mp = median_profile(profs)
            if timing is not None:
                p.layer_timing = dataclasses.replace(timing, layer_s=statistics.median(t.layer_s for t in timings))
            p.prediction = predict_step(p, mp) if c.train else predict_decode(p, mp)
            row.predicted_s, row.bottleneck, row.plan = p.prediction.seconds, p.prediction.bottleneck, p.as_dict()
        row.children = [{"peak": r.get("rss_peak"), "step_s": statistics.median(_steps(r)) if r.get("ok") else None,
                         "major_faults": r.get("major_faults"), "rss_file": r.get("rss_file"),
                         "rss_anon": r.get("rss_anon")} for r in runs]
        row.ok = all(r.get("ok") for r in runs)
        row.measured_peak = int(statistics.median(r.get("rss_peak") or 0 for r in runs))
        row.cgroup_peak = max((r.get("cgroup_peak") or 0 for r in runs), default=0) or None
        if row.ok:
            every = [s for r in runs for s in _steps(r)]
            row.measured_s = statistics.median(statistics.median(_steps(r)) for r in runs)
            row.spread_s = (min(every), max(every))
        else:
            bad = next(r for r in runs if not r.get("ok"))
            row.error = f"{bad.get('error')}: {bad.get('stderr', '')[-300:]}"
        rows.append(row)
        if progress:
            print(f"[bench plan]   measured peak RSS {human(row.measured_peak or 0)}, "
                  f"{(row.measured_s or 0) * 1e3:.1f} ms (predicted at the children's rates {row.predicted_s * 1e3:.1f} ms), "
                  f"{'fit' if row.ok else row.error[:200]}", file=sys.stderr, flush=True)
    return {"rows": rows, "profile": profile}


# -- the child -----------------------------------------------------------------------------------------------------
def child_main(job: dict[str, Any]) -> dict[str, Any]:
    """Run one placement (in a fresh process) and return its step times."""
    import resource  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    import transformers.models.llama.modeling_llama  # noqa: PLC0415
    import transformers.models.mixtral.modeling_mixtral  # noqa: PLC0415, F401

    import llmtier.offload  # noqa: PLC0415, F401

    if job["kind"] == "base":

        return {"rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "steps_s": [0.0]}
    # the job's own peak growth, whatever importing cost (a process measured apart may differ by its huge pages)
    start = status_bytes("VmRSS") if reset_peak_rss() else 0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    torch.manual_seed(0)
    steps = _train(job) if job["kind"] == "train" else _infer(job)
    use = resource.getrusage(resource.RUSAGE_SELF)
    # major faults: pages read back from the disk (under a tight cap, the code and files a run keeps using)
    out = {"steps_s": steps, "rss_peak": use.ru_maxrss * 1024, "major_faults": use.ru_majflt - faults,
           "rss_file": status_bytes("RssFile"), "rss_anon": status_bytes("RssAnon")}  # at the end: what RSS holds
    if start:
        out["rss_job_growth"] = status_bytes("VmHWM") - start
    return out


def _infer(job: dict[str, Any]) -> list[float]:
    import torch  # noqa: PLC0415

    from ..offload import stream_model  # noqa: PLC0415
    from ..offload.generate import generate_timed  # noqa: PLC0415
    from ..plan.planner import KVPlan  # noqa: PLC0415
    from ..plan.weights import Plan  # noqa: PLC0415

    plan = Plan(**job["weights_plan"]) if job.get("weights_plan") else None
    budget = {"plan": plan} if plan is not None else {"memory": job["weights_memory"]}
    with stream_model(job["model"], verify="never", **budget) as model:
        cache = None
        if job.get("kv_plan"):
            from ..offload.kv import TieredCache  # noqa: PLC0415

            cache = TieredCache(model.config, plan=KVPlan(**job["kv_plan"]), path=job["dir"])
        ids = torch.randint(1, model.config.vocab_size, (job["batch"], job["prompt"]))
        try:
            timed = generate_timed(model, ids, job["new_tokens"], cache=cache)
        finally:
            if cache is not None:
                cache.close()
    st = timed.stamps
    return [b - a for a, b in itertools.pairwise(st)]


def _train(job: dict[str, Any]) -> list[float]:
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    from ..offload.optim import OffloadedAdamW  # noqa: PLC0415

    config = AutoConfig.from_pretrained(job["model"])
    if job.get("layers"):  # a probe of the model's first layers (bench.layerprobe.probe_train_memory)
        config.num_hidden_layers = int(job["layers"])
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:config.num_hidden_layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random init: no checkpoint pages
    model.train()
    state = tempfile.mkdtemp(prefix="optim-", dir=job["dir"])
    out = []
    from ..plan.planner import OptimPlan  # noqa: PLC0415

    budget = {"plan": OptimPlan(**job["optim_plan"])} if job.get("optim_plan") else {"memory": job["optim_memory"]}
    with OffloadedAdamW(model.parameters(), path=state, lr=1e-4, **budget) as opt:
        for _ in range(job["steps"]):
            ids = torch.randint(1, config.vocab_size, (job["batch"], job["prompt"]))
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(time.perf_counter() - t0)
    for name in os.listdir(state):
        os.unlink(os.path.join(state, name))
    os.rmdir(state)
    return out


# -- report --------------------------------------------------------------------------------------------------------
def format_table(res: dict[str, Any]) -> str:
    """Markdown: predicted vs measured peak memory and time, errors, and whether the run fit its budget."""
    lines = ["| configuration | budget (cgroup cap) | plan | pred. peak | meas. peak RSS | mem err | cgroup peak | pred. ms | "
             "meas. ms (min-max) | time err | bound by | fit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pl = r.plan
        if r.config.train:
            what = f"optim chunk {pl.get('chunk_elems')}"
        else:
            what = f"{len(pl.get('resident_layers', []))}/{len(pl.get('resident_layers', [])) + len(pl.get('streamed_layers', []))} " \
                   f"layers resident, KV {len(pl.get('kv_spilled', []))} spilled"
        me = f"{r.mem_err:+.1%}" if r.mem_err is not None else "-"
        te = f"{r.time_err:+.1%}" if r.time_err is not None else "-"
        ms = f"{r.measured_s * 1e3:.1f} ({r.spread_s[0] * 1e3:.0f}-{r.spread_s[1] * 1e3:.0f})" if r.measured_s else "-"
        lines.append(f"| {r.config.name} | {human(r.memory)} | {what} | {human(r.predicted_peak)} | "
                     f"{human(r.measured_peak) if r.measured_peak else '-'} | {me} | "
                     f"{human(r.cgroup_peak) if r.cgroup_peak else '-'} | {r.predicted_s * 1e3:.1f} | {ms} | "
                     f"{te} | {r.bottleneck} | {'yes' if r.ok else 'NO: ' + r.error[:80]} |")
    return "\n".join(lines)


def add_cli(bench: Any) -> None:
    """``llmtier bench plan``."""
    b = bench.add_parser("plan", help="the planner's predictions (peak memory, time per token/step) vs measurements "
                         "under a memory cgroup of the plan's budget, dense and MoE, generation and training")
    b.add_argument("--dir", help="directory on the disk (models, spill files, optimizer state)")
    b.add_argument("--quick", action="store_true", help="two configurations (a test-sized run)")
    b.add_argument("--profile", help="device profile JSON (default: measure a quick one in this run)")
    b.add_argument("--children", type=int, help=f"fresh processes per configuration (default {CHILDREN}; --quick: 1)")
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.set_defaults(func=cli_main)


def cli_main(args: argparse.Namespace) -> int:
    from ..plan import load_profile  # noqa: PLC0415
    from .profile import format_profile  # noqa: PLC0415

    directory = args.dir or os.path.join(tempfile.gettempdir(), "llmtier-bench-plan")
    prof = load_profile(args.profile) if args.profile else None
    children = args.children if args.children else (1 if args.quick else CHILDREN)
    res = run_plan_bench(directory, QUICK if args.quick else CONFIGS, prof, overlap_rounds=1 if args.quick else 3,
                         children=children)
    print(format_profile(res["profile"]))
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"name": r.config.name, "memory": r.memory, "predicted_peak": r.predicted_peak,
                        "measured_peak": r.measured_peak,
                        "cgroup_peak": r.cgroup_peak, "predicted_s": r.predicted_s, "measured_s": r.measured_s,
                        "spread_s": r.spread_s, "ok": r.ok, "error": r.error, "children": r.children,
                        "plan": r.plan} for r in res["rows"]],
                      f, indent=1, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":
        print(json.dumps(child_main(json.loads(argv[1]))))
        return 0
    from ..cli import main as cli  # noqa: PLC0415

    return cli(["bench", "plan", *argv])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CONFIGS", "MODELS", "Config", "Row", "add_cli", "base_bytes", "build_model", "child_main", "format_table",
           "run_plan_bench"]
