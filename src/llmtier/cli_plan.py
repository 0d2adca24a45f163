"""``llmtier plan``: the memory model, the placement and the predicted speed of a model under budgets."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from .errors import LLMTierError
from .units import human, parse_size


def seed_table(m: Any, batch: int = 1, seq: int = 2048) -> str:
    """The training-memory table the way the seed counts it (decimal GB), from the memory model."""
    t = m.training(batch, seq)
    gb = 1e9

    def row(name: str, n: int) -> str:
        return f"| {name:<22} | {f'{n / gb:g} GB':<12} |"

    return "\n".join(["| Component              | Memory Usage |", "|------------------------|--------------|",
                      row("Model Weights", t.weights), row("Gradients", t.gradients),
                      row("Optimizer State (Adam)", t.optimizer), f"| **Total per GPU**      | {f'**{t.total / gb:g} GB**':<12} |"])


def describe_memory(m: Any, batch: int, context: int) -> str:
    """The memory model as lines: weights, KV, activations, training state."""
    t = m.training(batch, context)
    lines = [f"model: {m.model_type}, {m.params:,} parameters, {m.dtype} ({m.itemsize} bytes)"
             f"{', bytes as stored in the checkpoint' if m.from_checkpoint else ''}"]
    lines += [f"  {k:<52} {human(v):>10}" for k, v in m.table()]
    lines.append(f"  {'KV cache at batch ' + str(batch) + ' x ' + str(context) + ' tokens':<52} "
                 f"{human(m.kv_bytes(batch, context)):>10}")
    lines.append(f"  {'prefill activation peak (batch ' + str(batch) + ')':<52} "
                 f"{human(m.prefill_activation_bytes(batch, context)):>10}")
    lines.append("training (one step of batch x context):")
    for name, n in (("weights", t.weights), ("gradients", t.gradients), ("Adam (master + 2 moments, weights' dtype)",
                    t.optimizer), ("activations, no checkpointing", t.activations),
                    ("activations, per-layer checkpointing", t.activations_checkpointed),
                    ("OffloadedAdamW state on SSD (fp32)", t.offloaded_state_bytes)):
        lines.append(f"  {name:<52} {human(n):>10}")
    lines.append("\nthe textbook table (decimal GB):\n" + seed_table(m, batch, context))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """``llmtier plan``: print the memory model, and with ``--memory`` the plan and its prediction."""
    from .plan import load_profile, model_memory, plan_inference, plan_training  # noqa: PLC0415
    from .plan.planner import Workload  # noqa: PLC0415

    m = model_memory(args.model, dtype=args.dtype)
    context = args.context if args.context is not None else (2048 if args.train else 512)
    out: dict[str, Any] = {}
    print(describe_memory(m, args.batch, context))
    if args.memory:
        if args.dir:  # the scratch directory of the profile and the probes: made where it is missing
            os.makedirs(args.dir, exist_ok=True)
        prof = load_profile(args.profile) if not args.no_profile else None
        if prof is None and not args.no_profile:
            from .bench.profile import measure_profile  # noqa: PLC0415

            print("no saved device profile (llmtier bench io --save-profile): measuring a quick one (about a minute) ...",
                  file=sys.stderr)
            prof = measure_profile(args.dir or "/tmp", quick=True)
        new = args.new_tokens if args.new_tokens is not None else 32
        w = Workload(args.batch, max(1, context - (0 if args.train else new)), 0 if args.train else new, args.train,
                     args.checkpointing)
        memory = parse_size(args.memory)
        gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
        timing = None
        if prof is not None and not args.train and not args.no_probe:
            from .bench.layerprobe import probe_layer  # noqa: PLC0415

            timing = probe_layer(args.model, w.batch, w.prompt, weight_bytes=max(m.layer_bytes, default=0))
        from .bench.layerprobe import CREEP_STEPS, probe_infer_memory, probe_train_memory  # noqa: PLC0415

        kept = _probe(args, m, f"what its training steps keep ({CREEP_STEPS} steps of its first layer, then of its "
                      "first two)", lambda d: probe_train_memory(args.model, w.batch, w.prompt, d)) \
            if args.train and not args.checkpointing and m.expert_bytes else None
        over = None if args.train else _probe(
            args, m, "its run overhead (its first layer, then its first two, generating)" if m.expert_bytes else
            "its run overhead (its first layer, generating)",
            lambda d: probe_infer_memory(args.model, w.batch, w.prompt, w.new_tokens, d, per_layer=bool(m.expert_bytes)))
        p = plan_training(m, w, memory, prof, kept_bytes=kept) if args.train else plan_inference(
            m, w, memory, prof, gpu_memory=gpu, layer_timing=timing, overhead_bytes=over)
        print()
        print(p.describe())
        if gpu is not None:
            print(f"note: --gpu-memory {human(gpu)} is recorded; CUDA placement uses stream_model(device='cuda') with "
                  "the weights' budget as GPU memory (no GPU on this machine to measure it)")
        out = p.as_dict()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": m.params, "weight_bytes": m.weight_bytes, "kv_token_bytes": m.kv_token_bytes,
                       "plan": out}, f, indent=1, default=str)
    return 0


def _probe(args: argparse.Namespace, m: Any, what: str, probe: Any) -> int | None:
    """``probe(scratch directory)``: the model's memory measured on its own first layers in fresh processes
    (``bench.layerprobe``); None with ``--no-probe`` or without a config to build from."""
    if args.no_probe or not os.path.exists(os.path.join(args.model, "config.json")):
        return None
    print(f"measuring {what}, in fresh processes ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="llmtier-probe-", dir=args.dir) as tmp:
        return probe(tmp)


def saved_profile() -> Any:
    """The saved device profile, or None when there is none or it cannot be read (no time prediction then)."""
    from .plan import load_profile  # noqa: PLC0415

    try:
        return load_profile()
    except LLMTierError:
        return None


def given_placement(model: Any, *, batch: int, prompt: int, new_tokens: int = 0, train: bool = False,
                    weights_memory: int | str | None = None, kv_memory: int | None = None,
                    optim_memory: int | None = None, kv_page: int | None = None, dtype: Any = None) -> Any:
    """The planner's placement for budgets a user gave (``llmtier run --memory``, ``llmtier train``'s optimizer
    budget), with the saved profile's prediction: the plan the runtimes are then given (``.weights``, ``.kv``,
    ``.optim``)."""
    from .plan import model_memory  # noqa: PLC0415
    from .plan.planner import KV_PAGE, Workload, plan_given  # noqa: PLC0415
    from .units import resolve_size  # noqa: PLC0415

    m = model_memory(model, dtype=dtype)
    if isinstance(weights_memory, str):  # "4GiB", "50%" of the weights, "25%ram"
        weights_memory = resolve_size(weights_memory, whole=m.weight_bytes, what="the weights")
    return plan_given(m, Workload(batch, prompt, new_tokens, train), saved_profile(), weights_memory=weights_memory,
                      kv_memory=kv_memory, optim_memory=optim_memory, kv_page=kv_page or KV_PAGE)


def format_prediction(p: Any, measured_s: float | None = None, measured_peak: int | None = None) -> str:
    """One line: a placement's predicted peak and time per token/step beside the measured ones."""
    unit = "step" if p.workload.train else "token"
    parts = [f"plan: predicted peak {human(p.predicted_peak)}"
             + (f" (measured {human(measured_peak)}, {p.predicted_peak / measured_peak - 1:+.0%})" if measured_peak else "")]
    if p.prediction is None:
        parts.append("no time prediction: no saved device profile (llmtier bench io --save-profile)")
    else:
        parts.append(f"{p.prediction.seconds * 1e3:.1f} ms per {unit}"
                     + (f" (measured {measured_s * 1e3:.1f} ms, {p.prediction.seconds / measured_s - 1:+.0%})"
                        if measured_s else "") + f", bound by {p.prediction.bottleneck}")
    return "; ".join(parts)


def prediction_line(model: Any, *, batch: int, prompt: int, new_tokens: int = 0, train: bool = False,
                    weights_memory: int | None = None, kv_memory: int | None = None, optim_memory: int | None = None,
                    measured_s: float | None = None, measured_peak: int | None = None) -> str:
    """:func:`format_prediction` of :func:`given_placement`: the planner's prediction for the budgets given, beside the
    measurement.  Uses the saved device profile only (``llmtier bench io --save-profile``); says so when there is none."""
    p = given_placement(model, batch=batch, prompt=prompt, new_tokens=new_tokens, train=train,
                        weights_memory=weights_memory, kv_memory=kv_memory, optim_memory=optim_memory)
    return format_prediction(p, measured_s, measured_peak)


def add_cli(sub: Any, bench: Any) -> None:
    """The ``llmtier plan`` verb and ``llmtier bench plan``."""
    p = sub.add_parser("plan", help="memory model of a model, and with --memory where each byte lives and how fast "
                       "it will run (predicted from the device profile)")
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a config.json")
    p.add_argument("--memory", help="DRAM budget of the whole process, e.g. 4GiB")
    p.add_argument("--gpu-memory", help="GPU memory budget (a CUDA run)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--context", type=int, help="tokens per sequence: prompt + new (default 512; 2048 with --train)")
    p.add_argument("--new-tokens", type=int, help="of the context, tokens generated (default 32)")
    p.add_argument("--train", action="store_true", help="a training step of batch x context (AdamW state on SSD)")
    p.add_argument("--checkpointing", action="store_true", help="with --train: per-layer activation checkpointing")
    p.add_argument("--dtype", help="count the weights in this dtype (default: the config's)")
    p.add_argument("--profile", help="device profile JSON (default: the saved one)")
    p.add_argument("--no-profile", action="store_true", help="no time prediction (do not measure a profile)")
    p.add_argument("--no-probe", action="store_true",
                   help="predict decode's compute from the profile's generic rates, without timing a few of the "
                        "model's own decoder layers built from its config (seconds; skipped for layers over 256 MiB); "
                        "and take the run overhead (generation; any model) or the training memory (--train; a MoE model) "
                        "from the formula and the profile instead of running the model's first layers in fresh "
                        "processes (seconds; with --train 200 steps each, tens of seconds)")
    p.add_argument("--dir", help="where to measure a quick profile when none is saved")
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    p.set_defaults(func=cmd_plan)
    from .bench.plan import add_cli as add_bench_plan  # noqa: PLC0415

    add_bench_plan(bench)


__all__ = ["add_cli", "cmd_plan", "describe_memory", "format_prediction", "given_placement", "prediction_line", "saved_profile",
           "seed_table"]
