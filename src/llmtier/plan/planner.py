"""The planner: given a model, a workload and budgets, where each byte lives and how fast it will run.

:func:`plan_inference` splits one DRAM budget (the whole process: what a
memory cgroup would cap) between the process's own memory, activations, the
KV tier and the weights, and returns a :class:`Placement` whose parts are
what the runtimes take: ``weights`` (the :class:`~llmtier.plan.weights.Plan`
``stream_model`` builds from ``weights_memory``), ``kv_memory`` and the layers
it spills (``TieredCache`` decides with :func:`llmtier.plan.kv.choose_spills`),
``experts`` (the resident MoE experts), and for training (:func:`plan_training`)
``optim_memory`` / ``chunk_elems`` (``OffloadedAdamW``, via
:func:`llmtier.plan.optim.chunk_elems_for`).  Time per token or step and the
bottleneck come from a :class:`~llmtier.plan.profile.DeviceProfile`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BudgetError
from ..units import human
from . import kv as kvplan
from . import optim as optplan
from .experts import ExpertLayer, ExpertPlan, split_budget_for_experts
from .memory import ModelMemory
from .pipeline import stream_step
from .profile import DeviceProfile, LayerTiming
from .weights import RUN_OVERHEAD, Plan, make_plan, plan_layers

KV_PAGE = kvplan.DEFAULT_PAGE_TOKENS
KV_PREFETCH = 2
READ_PIECE = 1 << 20  # the engine's request size for a streamed layer's reads
SLACK = 0.03  # of the budget kept free: allocator rounding and what the model does not see


@dataclass
class Workload:
    """Generate ``new_tokens`` after a ``prompt`` for ``batch`` sequences, or train on ``batch`` x ``prompt``."""

    batch: int = 1
    prompt: int = 128
    new_tokens: int = 32
    train: bool = False
    checkpointing: bool = False

    @property
    def context(self) -> int:
        return self.prompt + self.new_tokens


@dataclass
class Prediction:
    """Predicted seconds per decode token (inference) or per step (training), and what bounds it."""

    seconds: float
    compute_s: float
    io_s: float
    bottleneck: str
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class ExpertPlacement:
    """Resident MoE experts: with whole-layer streaming (``experts=None``) every expert stays with its layer,
    ``resident`` lists them; with expert streaming ``split`` is the budget split between the dense weights and the
    expert cache (:func:`llmtier.plan.experts.split_budget_for_experts`, what ``stream_model(experts=...)`` makes)."""

    resident: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts kept in memory
    reason: str = "experts move with their layer"
    split: ExpertPlan | None = None  # expert streaming: dense plan + expert cache bytes
    cached_experts: int = 0  # experts the cache holds at once (expert streaming)


@dataclass
class KVPlan:
    """The KV tier's part of a plan: what ``TieredCache(config, plan=...)`` takes.  ``spilled`` is what the planner
    expects the tier to spill at the longest context (the tier decides at each forward with the same rule,
    :func:`llmtier.plan.kv.choose_spills`, over ``memory``)."""

    memory: int
    page_tokens: int = kvplan.DEFAULT_PAGE_TOKENS
    prefetch: int = 2
    spilled: list[int] = field(default_factory=list)


@dataclass
class OptimPlan:
    """The offloaded optimizer's part of a plan: what ``OffloadedAdamW(params, plan=...)`` takes."""

    memory: int  # DRAM for the chunk pipeline
    chunk_elems: int
    on_ssd: bool = True


@dataclass
class Placement:
    """A plan: budgets per runtime, what they decide from them, predicted memory and time, and why."""

    model: ModelMemory
    workload: Workload
    memory: int  # the whole budget
    base_bytes: int
    activation_bytes: int
    weights_memory: int  # -> stream_model(memory=...)
    weights: Plan
    kv_memory: int  # -> TieredCache(memory=...); 0: no KV (training)
    kv_spilled: list[int]  # KV-holding layers (their index among those) that go to SSD at the longest context
    kv_bytes: int  # what the KV pool holds at its peak
    experts: ExpertPlacement
    optim_memory: int = 0  # -> OffloadedAdamW(memory=...); 0: no optimizer
    chunk_elems: int = 0
    optim_on_ssd: bool = False
    gradient_bytes: int = 0
    prediction: Prediction | None = None
    reasons: list[str] = field(default_factory=list)
    gpu_memory: int | None = None
    overhead_bytes: int = RUN_OVERHEAD  # predicted: what a run adds beyond the model's terms (the profile's measure)
    kv_page: int = KV_PAGE  # tokens per KV page
    layer_timing: LayerTiming | None = None  # a decoder layer of this model timed at this workload (decode's compute)

    @property
    def kv(self) -> KVPlan | None:
        """What ``TieredCache(config, plan=...)`` takes; None when the run has no KV tier (training, no KV layers)."""
        if self.workload.train or not self.model.windows or not self.kv_memory:
            return None
        return KVPlan(self.kv_memory, self.kv_page, KV_PREFETCH, list(self.kv_spilled))

    @property
    def optim(self) -> OptimPlan | None:
        """What ``OffloadedAdamW(params, plan=...)`` takes; None for inference."""
        if not self.workload.train or not self.chunk_elems:
            return None
        return OptimPlan(self.optim_memory, self.chunk_elems, self.optim_on_ssd)

    @property
    def predicted_peak(self) -> int:
        """Predicted peak memory of the whole process."""
        cache = self.experts.split.cache_bytes if self.experts.split is not None else 0
        return (self.base_bytes + self.overhead_bytes + self.activation_bytes + self.weights.memory_bytes + cache
                + self.kv_bytes + self.gradient_bytes + self.optim_memory)

    def breakdown(self) -> list[tuple[str, int]]:
        rows = [("process (python, torch, transformers)", self.base_bytes), ("run overhead (allocator, objects)",
                self.overhead_bytes), ("activations", self.activation_bytes),
                ("weights held (resident + slots)", self.weights.memory_bytes)]
        if not self.workload.train:
            rows.append(("KV cache in DRAM", self.kv_bytes))
        else:
            rows.append(("gradients", self.gradient_bytes))
            rows.append(("optimizer pipeline buffers (state on SSD)", self.optim_memory))
        rows.append(("predicted peak", self.predicted_peak))
        return rows

    def describe(self) -> str:
        w = self.workload
        what = (f"training batch {w.batch} x {w.prompt} tokens" if w.train else
                f"batch {w.batch}, prompt {w.prompt} + {w.new_tokens} new tokens")
        lines = [f"plan for {self.model.model_type} ({self.model.params / 1e9:.3g}B params, {self.model.dtype}), {what}, "
                 f"memory {human(self.memory)}"]
        lines += [f"  {k:<42} {human(v):>10}" for k, v in self.breakdown()]
        lines.append("weights: " + self.weights.describe().replace("\n", "\n  "))
        if not w.train and self.kv_memory:
            nkv = len(self.model.windows)
            lines.append(f"KV: pool of {human(self.kv_memory)}; {nkv - len(self.kv_spilled)} of {nkv} layers in DRAM, "
                         f"{len(self.kv_spilled)} spilled to SSD at {w.context} tokens")
        if self.model.expert_bytes:
            lines.append(f"MoE experts ({human(self.model.expert_bytes)}): {self.experts.reason}")
        if w.train:
            lines.append(f"optimizer: AdamW state on SSD ({human(self.model.training(1, 1).offloaded_state_bytes)}), "
                         f"chunks of {self.chunk_elems} elements")
        if self.prediction is not None:
            p = self.prediction
            unit = "step" if w.train else "token"
            lines.append(f"predicted: {p.seconds * 1e3:.1f} ms per {unit} (compute {p.compute_s * 1e3:.1f} ms, "
                         f"I/O {p.io_s * 1e3:.1f} ms): bound by {p.bottleneck}")
            if not w.train:
                lt = self.layer_timing
                lines.append(f"compute per layer timed on {lt.note}" if lt is not None and lt.batch == w.batch else
                             "compute per layer from the profile's generic rates (no layer of this model timed)")
        lines += [f"why: {r}" for r in self.reasons]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {"memory": self.memory, "predicted_peak": self.predicted_peak, "weights_memory": self.weights_memory,
                "resident_layers": self.weights.resident, "streamed_layers": self.weights.streamed,
                "kv_memory": self.kv_memory, "kv_spilled": self.kv_spilled, "optim_memory": self.optim_memory,
                "optim_on_ssd": self.optim_on_ssd, "chunk_elems": self.chunk_elems,
                "breakdown": dict(self.breakdown()),
                "predicted_s": p.seconds if p else None, "bottleneck": p.bottleneck if p else None}


def _overhead(profile: DeviceProfile | None, train: bool = False, moe: bool = False) -> int:
    """The run overhead to predict with: the profile's measured one (for training a MoE model, its MoE probe's where
    measured), else the budgeted :data:`RUN_OVERHEAD`."""
    got = (profile.train_overhead_bytes if train else profile.run_overhead_bytes) if profile is not None else 0
    if train and moe and profile is not None and profile.moe_train_overhead_bytes > 0:
        got = profile.moe_train_overhead_bytes
    return got if got > 0 else RUN_OVERHEAD


def expert_layers(model: ModelMemory) -> list[ExpertLayer]:
    """The MoE layers' sizes as the expert split takes them (one expert's bytes: the layer's expert bytes / experts)."""
    k = max(1, model.experts_per_token)
    return [ExpertLayer(lay.index, lay.experts, k, lay.expert_bytes // lay.experts)
            for lay in model.layers if lay.experts and lay.expert_bytes]


def choose_experts(model: ModelMemory, weights: Plan, budget: int | None = None, prefetch: int | None = None) -> ExpertPlacement:
    """Resident MoE experts.  ``budget`` None (whole-layer streaming): experts follow their layer.  ``budget`` bytes
    (expert streaming, ``stream_model(experts=...)``): the planner's split of the weights' budget between the dense part
    and the expert cache (:func:`~llmtier.plan.experts.split_budget_for_experts`, the rule the runtime applies to the
    checkpoint's sizes)."""
    if budget is not None and model.expert_bytes:
        dense = [lay.weight_bytes - lay.expert_bytes for lay in model.layers]
        moe = expert_layers(model)
        split = split_budget_for_experts(budget, model.outside_bytes + model.embedding_bytes, dense, moe, prefetch)
        one = max((m.expert_bytes for m in moe), default=1)
        return ExpertPlacement({}, split.reason, split, split.cache_bytes // max(1, one))
    res = {i: list(range(model.layers[i].experts)) for i in weights.resident if model.layers[i].experts}
    why = ("experts move with their layer: resident layers hold all their experts, streamed layers read all "
           "of theirs" if model.expert_bytes else "no routed experts")
    return ExpertPlacement(res, why)


def _kv_need(m: ModelMemory, w: Workload, resident: set[int], page: int = KV_PAGE) -> int:
    wins = m.windows
    if not wins:
        return 0
    geo = _kv_geometry(m, w.batch, page)
    return max(kvplan.need(0, w.prompt, wins, resident, geo, KV_PREFETCH),
               kvplan.need(max(w.context - 1, 1), 1, wins, resident, geo, KV_PREFETCH))


def kv_least(m: ModelMemory, w: Workload, page: int = KV_PAGE) -> int:
    """The least DRAM the KV tier needs for ``w`` with every layer spilled (MLA's compressed layout and sliding
    windows as the memory model counts them)."""
    return _kv_need(m, w, set(), page)


def _kv_geometry(m: ModelMemory, batch: int, page: int = KV_PAGE) -> kvplan.Geometry:
    tok = max((lay.kv_token_bytes for lay in m.layers), default=0)
    elems = tok // m.itemsize
    # one "head" of the token's K and V elements: the budget depends on bytes only
    return kvplan.Geometry(batch, 1, elems // 2, 1, elems - elems // 2, page, None, m.itemsize)


def training_activations(m: ModelMemory, w: Workload, profile: DeviceProfile | None = None) -> int:
    """What a training step of ``w`` saves for backward: the memory model's formula (with or without checkpointing),
    times the profile's measured :attr:`~llmtier.plan.profile.DeviceProfile.train_activation_scale` where it has one
    (within 0.5-1.5: a probe outside that range is taken for a failed one)."""
    t = m.training(w.batch, w.prompt)
    acts = t.activations_checkpointed if w.checkpointing else t.activations
    scale = profile.train_activation_scale if profile is not None else 0.0
    return int(acts * scale) if 0.5 <= scale <= 1.5 else acts


def _reserve(profile: DeviceProfile | None, train: bool = False, moe: bool = False) -> int:
    """What a budget keeps for the run's overhead: the larger of :data:`RUN_OVERHEAD` and the measured one."""
    return max(RUN_OVERHEAD, _overhead(profile, train, moe))


def least_memory(m: ModelMemory, w: Workload, base_bytes: int, profile: DeviceProfile | None = None, *,
                 overhead_bytes: int | None = None) -> int:
    """The smallest whole-process budget :func:`plan_inference` accepts for ``w`` (``overhead_bytes`` as there)."""
    reserve = _reserve(profile) if overhead_bytes is None else max(RUN_OVERHEAD, overhead_bytes)
    acts = m.prefill_activation_bytes(w.batch, w.prompt) + reserve
    nkv = len(m.windows)
    kv_least = min(_kv_need(m, w, set(range(nkv))), _kv_need(m, w, set()))
    w_least = m.outside_bytes + 2 * max(m.layer_bytes, default=0)
    return -(-(base_bytes + acts + w_least + kv_least) * 100 // int(100 * (1 - SLACK))) + 1


def plan_inference(m: ModelMemory, w: Workload, memory: int, profile: DeviceProfile | None = None, *,
                   base_bytes: int | None = None, gpu_memory: int | None = None, experts: str | None = None,
                   layer_timing: LayerTiming | None = None, overhead_bytes: int | None = None) -> Placement:
    """Place ``m`` for generating ``w`` within ``memory`` bytes (the whole process).

    The result's parts are what the runtimes take: ``.weights`` -> ``stream_model(path, plan=...)``, ``.kv`` ->
    ``TieredCache(config, plan=...)``.  ``experts`` (a policy name, a MoE model): the weights' budget is split
    between the dense part and an expert cache (``.experts.split``), as ``stream_model(experts=...)`` streams.
    ``layer_timing``: one of the model's decoder layers timed at this workload (``bench.layerprobe.probe_layer``), the
    compute term of the predicted time; without it the profile's generic rates.  ``overhead_bytes``: what a run of
    this model at this workload keeps beyond the memory model's terms, measured on its own first layers
    (``bench.layerprobe.probe_infer_memory``); without it the profile's run overhead."""
    base = base_bytes if base_bytes is not None else (profile.base_bytes if profile else 0)
    reserve = _reserve(profile) if overhead_bytes is None else max(RUN_OVERHEAD, overhead_bytes)
    acts = m.prefill_activation_bytes(w.batch, w.prompt) + reserve
    room = int(memory * (1 - SLACK)) - base - acts
    nkv = len(m.windows)
    everything = set(range(nkv))
    kv_full = _kv_need(m, w, everything)
    kv_least = min(kv_full, _kv_need(m, w, set()))  # spilling costs staging: at small contexts holding is cheaper
    layers = m.layer_bytes
    slot = max(layers, default=0)
    w_least = m.outside_bytes + 2 * slot
    reasons = []
    if room < w_least + kv_least:
        raise BudgetError(f"a memory budget of {human(memory)} is below the least this run needs: process "
                          f"{human(base)} + activations {human(acts)} + weights streaming {human(w_least)} + KV with "
                          f"its least {human(kv_least)} = {human(base + acts + w_least + kv_least)}, with {SLACK:.0%} kept free")
    if m.weight_bytes + kv_full <= room:
        kv_mem, wmem = kv_full, m.weight_bytes
        reasons.append("everything fits: weights and KV stay in DRAM")
    elif w_least + kv_full <= room and kv_full <= room // 2:
        kv_mem, wmem = kv_full, room - kv_full
        reasons.append("the KV cache is kept in DRAM (each of its bytes is read every token, as a streamed weight's is) "
                       "and the weights stream through the rest")
    else:
        kv_mem = max(kv_least, min(kv_full, room // 4))
        wmem = room - kv_mem
        reasons.append("KV and weights both exceed the budget: the KV pool gets a quarter (at least its least) and "
                       "spills layers to SSD; the weights stream through the rest")
    ex = choose_experts(m, Plan(0, 0, [], [], [], 0, 0, ""), wmem) if experts and m.expert_bytes else None
    wplan = ex.split.dense if ex is not None and ex.split is not None else plan_layers(wmem, m.outside_bytes,
                                                                                      m.embedding_bytes, layers, slot)
    spilled = []
    kv_bytes = 0
    if nkv:
        geo = _kv_geometry(m, w.batch)
        order = kvplan.spill_order(nkv)
        spilled = kvplan.choose_spills(max(w.context - 1, 1), 1, m.windows, everything, order, geo, KV_PREFETCH, kv_mem)
        kv_bytes = _kv_need(m, w, everything - set(spilled))
    p = Placement(m, w, memory, base, acts - reserve, wmem, wplan, kv_mem, spilled, kv_bytes,
                  ex or choose_experts(m, wplan), reasons=reasons, gpu_memory=gpu_memory,
                  overhead_bytes=_overhead(profile) if overhead_bytes is None else overhead_bytes,
                  layer_timing=layer_timing)
    if overhead_bytes is not None:
        reasons.append(f"run overhead {human(overhead_bytes)}, measured on the model's own first layers")
    if profile is not None:
        p.prediction = predict_decode(p, profile)
    return p


def plan_training(m: ModelMemory, w: Workload, memory: int, profile: DeviceProfile | None = None, *,
                  base_bytes: int | None = None, kept_bytes: int | None = None) -> Placement:
    """Place ``m`` for training steps of ``w.batch`` x ``w.prompt`` tokens within ``memory`` bytes: weights,
    gradients and activations in DRAM, the AdamW state in DRAM when it fits, else on SSD through a chunk
    pipeline sized to what is left.  ``kept_bytes``: what a step of this model keeps beyond the process, weights,
    gradients and optimizer buffers, measured (``bench.layerprobe.probe_train_memory``); it replaces the
    activation formula and the profile's run overhead, and the budget keeps a tenth more of it free."""
    base = base_bytes if base_bytes is not None else (profile.base_bytes if profile else 0)
    t = m.training(w.batch, w.prompt)
    reserve = _reserve(profile, train=True, moe=bool(m.expert_bytes))
    acts = training_activations(m, w, profile) + reserve if kept_bytes is None else kept_bytes + kept_bytes // 10
    room = int(memory * (1 - SLACK)) - base - acts - t.weights - t.gradients
    layers = m.layer_bytes
    wplan = make_plan(t.weights, m.outside_bytes + m.embedding_bytes, layers, max(layers, default=0))
    least = optplan.least_budget([m.params])
    largest = optplan.BYTES_PER_ELEM * optplan.round_up(m.params, optplan.ALIGN)
    if room < least:
        raise BudgetError(f"a memory budget of {human(memory)} is below the least training needs: process {human(base)} + "
                          f"activations {human(acts)} + weights {human(t.weights)} + gradients {human(t.gradients)} + "
                          f"optimizer pipeline {human(least)}")
    on_ssd = True
    chunk = optplan.chunk_elems_for(min(room, largest), [m.params])
    omem = optplan.BYTES_PER_ELEM * chunk
    reasons = [f"the AdamW state ({human(t.offloaded_state_bytes)}, fp32 moments + master) lives on SSD; each step "
               f"streams it in chunks of {chunk} elements through {human(omem)} of DRAM, what is left after weights, "
               "gradients and activations"]
    if kept_bytes is not None:
        reasons.append(f"activations and run overhead: {human(kept_bytes)}, measured on the model's own layers")
    p = Placement(m, w, memory, base, kept_bytes if kept_bytes is not None else acts - reserve, t.weights, wplan, 0, [],
                  0, choose_experts(m, wplan), omem, chunk, on_ssd, t.gradients, reasons=reasons,
                  overhead_bytes=0 if kept_bytes is not None else _overhead(profile, train=True, moe=bool(m.expert_bytes)))
    if profile is not None:
        p.prediction = predict_step(p, profile)
    return p


def plan_given(m: ModelMemory, w: Workload, profile: DeviceProfile | None = None, *, weights_memory: int | None = None,
               kv_memory: int | None = None, optim_memory: int | None = None, base_bytes: int | None = None,
               kv_page: int = KV_PAGE, layer_timing: LayerTiming | None = None) -> Placement:
    """The placement the runtimes make from budgets a user gave them directly (``llmtier run --memory``,
    ``llmtier train``'s optimizer budget), with its predicted memory and time: nothing is split here, each runtime
    decides with the planner's rules as it will at run time."""
    base = base_bytes if base_bytes is not None else (profile.base_bytes if profile else 0)
    layers = m.layer_bytes
    slot = max(layers, default=0)
    wmem = weights_memory if weights_memory is not None else m.weight_bytes
    wplan = plan_layers(wmem, m.outside_bytes, m.embedding_bytes, layers, slot)
    if w.train:
        t = m.training(w.batch, w.prompt)
        acts = (t.activations_checkpointed if w.checkpointing else t.activations) + RUN_OVERHEAD
        omem = optim_memory if optim_memory is not None else optplan.least_budget([m.params])
        chunk = optplan.chunk_elems_for(omem, [m.params])
        p = Placement(m, w, 0, base, acts - RUN_OVERHEAD, wmem, wplan, 0, [], 0, choose_experts(m, wplan),
                      optplan.BYTES_PER_ELEM * chunk, chunk, True, t.gradients, reasons=["budgets as given"],
                      overhead_bytes=_overhead(profile, train=True, moe=bool(m.expert_bytes)))
        p.memory = p.predicted_peak
        if profile is not None:
            p.prediction = predict_step(p, profile)
        return p
    acts = m.prefill_activation_bytes(w.batch, w.prompt) + RUN_OVERHEAD
    nkv = len(m.windows)
    everything = set(range(nkv))
    spilled: list[int] = []
    if kv_memory is not None and nkv:
        spilled = kvplan.choose_spills(max(w.context - 1, 1), 1, m.windows, everything, kvplan.spill_order(nkv),
                                       _kv_geometry(m, w.batch, kv_page), KV_PREFETCH, kv_memory)
    kv_bytes = _kv_need(m, w, everything - set(spilled), kv_page)
    p = Placement(m, w, 0, base, acts - RUN_OVERHEAD, wmem, wplan, kv_memory if kv_memory is not None else 0, spilled,
                  kv_bytes, choose_experts(m, wplan), reasons=["budgets as given"], overhead_bytes=_overhead(profile),
                  kv_page=kv_page, layer_timing=layer_timing)
    p.memory = p.predicted_peak
    if profile is not None:
        p.prediction = predict_decode(p, profile)
    return p


# -- time ----------------------------------------------------------------------------------------------------------
def _generic_compute(m: ModelMemory, w: Workload, prof: DeviceProfile) -> float:
    """A decode step's compute from the profile's generic rates: the layers' fixed cost (a tiny model's), the active
    weights at the measured skinny-product rate, the routed experts' dispatch, the attention's reads of the past."""
    active = m.weight_bytes - m.embedding_bytes
    if m.expert_bytes and m.experts_per_token:  # only the routed experts' weights are multiplied
        per_expert = m.expert_bytes / max(1, sum(lay.experts for lay in m.layers))
        used = sum(min(lay.experts, m.experts_per_token * w.batch) for lay in m.layers if lay.experts)
        active = active - m.expert_bytes + used * per_expert
    flops = 2 * (active / m.itemsize) * w.batch
    hits = sum(min(lay.experts, max(1, m.experts_per_token) * w.batch) for lay in m.layers if lay.experts)
    compute = len(m.layers) * prof.layer_overhead_s + hits * prof.expert_overhead_s + prof.step_overhead_s
    compute += prof.weights_s(active, w.batch) if prof.matmul_bw else max(active / prof.gemv_bw, flops / prof.gemm_flops)
    return compute + m.kv_bytes(w.batch, w.context) / prof.dram_copy_bw  # attention reads the past once


def predict_decode(p: Placement, prof: DeviceProfile) -> Prediction:
    """Seconds per decode token: compute (the layers' fixed cost, the weights passing through the CPU) against
    reads (streamed layers, spilled KV), overlapped.  With ``p.layer_timing`` the layers' compute is the measured
    layer's (its weights, attention and dispatch at this batch; for a layer read from the disk, timed with its
    weights in no CPU cache) plus the head and the attention reads beyond the probe's context."""
    m, w = p.model, p.workload
    lt = p.layer_timing
    nl = len(m.layers)
    wp = p.weights
    disk = set(wp.from_disk) if wp.streamed else set()
    if lt is not None and lt.batch == w.batch:
        # per layer: its measured seconds (a layer read from the disk: with its weights in no CPU cache) and its share
        # of attention's reads beyond the probe's context
        kv = max(0, m.kv_bytes(w.batch, w.context) - m.kv_bytes(w.batch, lt.context)) / prof.dram_copy_bw / max(1, nl)
        cold = lt.cold_layer_s if lt.cold_layer_s is not None and wp.device == "cpu" else lt.layer_s
        per_layer = [(cold if i in disk else lt.layer_s) + kv for i in range(nl)]
        after = prof.step_overhead_s + prof.weights_s(m.outside_bytes, w.batch)
    else:
        generic = _generic_compute(m, w, prof)
        per_layer = [(generic - prof.step_overhead_s) / max(1, nl)] * nl
        after = prof.step_overhead_s
    # a layer read from the disk also costs the CPU streamer's own time (its reads submitted and collected, its
    # parameters bound and put back)
    extra = prof.stream_layer_s if wp.device == "cpu" else 0.0
    per_layer = [c + (extra if i in disk else 0.0) for i, c in enumerate(per_layer)]
    compute = sum(per_layer) + after
    # the streamer's reads reach the disk as the engine's pieces (1 MiB), many in flight (a MoE layer's experts as
    # one read per expert projection; in a tiny model those are smaller, and measured they land between the 1 MiB
    # and the 256 KiB rate, docs/PLAN.md)
    rate = prof.read_at(min(READ_PIECE, max(1, wp.slot_bytes)))
    io_w = wp.disk_bytes_per_pass / rate if wp.streamed else 0.0
    io_kv = 0.0
    if p.kv_spilled:
        geo = _kv_geometry(m, w.batch, p.kv_page)
        wins = m.windows
        past = sum(kvplan.staging_tokens(w.context, wins[i], p.kv_page) for i in p.kv_spilled) * geo.token_bytes
        io_kv = past / prof.read_at(geo.slot_bytes)
    io = io_w + io_kv
    # the weights' read-ahead runs under the compute as the streamer's pipeline allows (plan.pipeline: reads wait
    # for free slots, the embedding's rows for the reads queued before them), plus the share of the smaller part
    # that did not hide beyond that on the profile's streamed probe (stream_overlap_loss); the spilled KV is read a
    # layer or two ahead of attention and the two share the disk: its reads add to either
    weights = max(compute, io_w)
    if io_w:
        sizes = wp.host_layer_bytes or wp.layer_bytes
        slots = wp.host_slots if wp.device != "cpu" and wp.host_slots else wp.slots
        weights = stream_step(per_layer, [sizes[i] / rate if i in disk else None for i in range(nl)], slots,
                              after_s=after, rows_first=bool(wp.on_demand_bytes),
                              slowdown=prof.read_slowdown)
    total = io_kv + weights + prof.stream_overlap_loss * min(compute, io_w)
    neck = "compute (CPU)" if compute >= io else ("disk reads of streamed weights" if io_w >= io_kv else "disk reads of spilled KV")
    return Prediction(total, compute, io, neck, {"weights_io_s": io_w, "kv_io_s": io_kv})


def predict_step(p: Placement, prof: DeviceProfile) -> Prediction:
    """Seconds per training step: forward and backward (3 x the forward's FLOPs, 3 x the layers' fixed cost), then
    the AdamW step (its CPU rate, and with the state on SSD its reads and writes overlapped with it)."""
    m, w = p.model, p.workload
    tokens = w.batch * w.prompt
    hits = sum(lay.experts for lay in m.layers if lay.experts)  # a batch of many tokens hits every expert
    active = m.params
    if m.expert_bytes and m.experts_per_token:  # a token runs through k of each layer's experts
        experts = max(1, sum(lay.experts for lay in m.layers))
        per_layer = experts / max(1, sum(1 for lay in m.layers if lay.experts))
        active -= int(m.expert_bytes / m.itemsize * (1 - m.experts_per_token / per_layer))
    # the training probe's rate already holds a small model's per-layer costs; MoE adds its expert dispatch
    fb = 6 * active * tokens / (prof.train_flops or prof.gemm_flops) + 3 * hits * prof.expert_overhead_s
    if w.checkpointing:
        fb *= 4 / 3
    upd = m.params / prof.adam_elems_s
    io = 0.0
    if p.optim_on_ssd:
        state = m.training(1, 1).offloaded_state_bytes
        size = 3 * 4 * p.chunk_elems  # one record per chunk
        io = state / prof.read_at(size) + state / prof.write_at(size)
        opt = max(upd, io) + 0.1 * min(upd, io)
    else:
        opt = upd
    total = fb + opt
    neck = "compute (forward/backward)" if fb >= opt else ("optimizer I/O (SSD)" if io > upd else "optimizer update (CPU)")
    return Prediction(total, fb + upd, io, neck, {"forward_backward_s": fb, "adam_s": upd, "optim_io_s": io})


__all__ = ["ExpertPlacement", "KVPlan", "OptimPlan", "Placement", "Prediction", "Workload", "choose_experts", "expert_layers",
           "kv_least", "least_memory", "plan_given", "plan_inference", "plan_training", "predict_decode", "predict_step"]
