"""``llmtier bench moe``: a MoE model larger than its budget -- expert-granular
streaming (LRU, LFU, profile; prediction on) against whole-layer streaming of
the same model, accelerate disk offload at the same budget, and the model in
memory, whose tokens every run is checked against.

Models are Mixtral- and Qwen3-MoE-shaped, random bf16 weights scaled to a
few GiB, routed ``uniform`` (the random routers) or with a documented
synthetic ``skew`` (:mod:`llmtier.bench.moe_models`).

Each system runs in a fresh child process (page cache dropped) under a
cgroup v1 memory cap of ``budget + OVERHEAD``; the child generates once to
warm up, then ``rounds`` times with different prompts (the same for every
system).  fio reads the file the streamed systems read (1 MiB, QD 32,
O_DIRECT, its first GiB) right before each streamed child: the I/O bound of a
round is its bytes read per decode step (a token per row) divided by the
bandwidth fio measured just before it, so the drifts of this VM's disk between
children are paired.

``experts-<policy>-oracle<d>`` systems (not in the default list) read ahead
exactly the experts the next ``d`` MoE layer calls will route to, as the
in-memory system recorded them: the ceiling of any prediction on this machine
(:mod:`llmtier.bench.moe_oracle`).  They need ``memory`` earlier in the list.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..units import human
from .moe_models import QUICK, SHAPES, _weights_bytes, apply_skew, ensure_model, ensure_store

OVERHEAD = 1 << 30
SYSTEMS = ("memory", "layers", "experts-lru", "experts-lfu", "experts-profile", "experts-lru-nopredict", "experts-lru-auto",
           "accelerate")
ORACLE = re.compile(r"experts-(lru|lfu|profile)-oracle([1-9])$")


@dataclass
class MoEBenchConfig:
    """Knobs of :func:`run_moe_bench`."""

    directory: str = os.path.join(tempfile.gettempdir(), "llmtier-bench-moe")
    models: tuple[str, ...] = ("mixtral", "qwen3_moe")
    routings: tuple[str, ...] = ("skew", "uniform")
    budgets: tuple[float, ...] = (0.5, 0.25)
    batches: tuple[int, ...] = (1, 4)
    systems: tuple[str, ...] = SYSTEMS
    rounds: int = 3  # per pass
    passes: int = 2  # each system runs this many times in turn (rounds each): slow drifts of the VM hit all alike
    prompt_len: int = 16
    new_tokens: int = 8
    alpha: float = 1.5
    threads: int = 2
    overhead: int = OVERHEAD
    quick: bool = False

    @classmethod
    def quick_config(cls, directory: str | None = None, **kw: Any) -> MoEBenchConfig:
        base = {"models": ("mixtral",), "routings": ("skew",), "budgets": (0.5,), "batches": (1,), "rounds": 1, "passes": 1,
                "new_tokens": 4, "systems": ("memory", "layers", "experts-lru", "experts-profile"), "quick": True,
                "overhead": 2 << 30}
        return cls(**({"directory": directory} if directory else {}), **{**base, **kw})


# -- the child -------------------------------------------------------------------------------------------------------
def child_main(job: dict[str, Any]) -> dict[str, Any]:
    """Load one system, generate ``1 + rounds`` times, return per-round figures."""
    import resource  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ..offload.generate import generate_timed  # noqa: PLC0415

    torch.set_num_threads(job["threads"])
    system = job["system"]
    oracle = ORACLE.match(system)
    t0 = time.perf_counter()
    if system == "memory":
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16).eval()
        if job.get("routing_out"):
            from .moe_oracle import record_routing  # noqa: PLC0415

            calls, _ = record_routing(model)
    elif system == "accelerate":
        from .peers_hf import load_accelerate  # noqa: PLC0415

        model = load_accelerate(job["model"], job["budget"], "hf", job["offload_dir"])
    else:
        from ..offload import stream_model  # noqa: PLC0415

        if system == "profile-calibrate":
            model = stream_model(job["model"], "100%", experts="lru", predict=False, verify="never")
        elif system == "layers":
            model = stream_model(job["model"], job["budget"], verify="never")
        else:
            policy = system.split("-")[1]
            predict = False if "nopredict" in system or oracle else "auto" if system.endswith("-auto") else True
            model = stream_model(job["model"], job["budget"], experts=policy, predict=predict, verify="never")
            if oracle:
                from .moe_oracle import Oracle, load_routing  # noqa: PLC0415

                routing = load_routing(job["routing"])
                seer = Oracle(model.llmtier, int(oracle.group(2)))
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    streamed = hasattr(model, "llmtier")

    def snap() -> dict[str, Any]:
        if not streamed:
            return {}
        d = model.llmtier.stats().as_dict()
        if "total_bytes_read" not in d:  # whole layers
            d["total_bytes_read"] = d["bytes_read"] + d["embedding_bytes_read"]
        return d

    runs = []
    recorded: list[Any] = []
    for rnd in range(job["rounds"] + 1):  # round 0 warms up
        g = torch.Generator().manual_seed(job["seed"] + rnd)
        ids = torch.randint(1, vocab, (job["batch"], job["prompt_len"]), generator=g)
        marks: dict[str, Any] = {}
        if system == "memory" and job.get("routing_out"):
            calls.clear()
        elif oracle:
            seer.start(routing[rnd] if rnd < len(routing) else [])

        def on_token(k: int, _t: float, marks: dict[str, Any] = marks) -> None:
            if k == 1:
                marks["after_prefill"] = snap()

        timed = generate_timed(model, ids, job["new_tokens"], on_token=on_token)
        end = snap()
        rec = timed.record()
        tokens = rec.pop("tokens")
        rec["digest"] = hashlib.sha256(str(tokens).encode()).hexdigest()[:16]
        if streamed and marks.get("after_prefill"):
            a = marks["after_prefill"]
            steps = rec["decode_steps"] * job["batch"]
            for k in ("total_bytes_read", "analytic_bytes", "expert_hits", "expert_misses", "prefetch_hits",
                      "predicted", "predicted_right", "routed_with_prediction", "prefetch_wasted_bytes",
                      "expert_stall_s", "stall_s", "active_missing_bytes"):
                if k in end:
                    rec["decode_" + k] = end[k] - a[k]
            rec["decode_bytes_per_token"] = rec["decode_total_bytes_read"] / steps if steps else None
        runs.append(rec)
        if system == "memory" and job.get("routing_out"):
            recorded.append(list(calls))
    out: dict[str, Any] = {"load_s": load_s, "runs": runs[1:], "warmup": runs[0],
                           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if recorded:
        from .moe_oracle import save_routing  # noqa: PLC0415

        save_routing(job["routing_out"], recorded)
    if oracle:
        out["oracle"] = {"read_ahead": seer.read_ahead, "mismatches": seer.mismatches, "no_room": seer.no_room}
    if streamed:
        out["stats"] = snap()
        plan = model.llmtier.plan
        out["streamed_bytes_per_pass"] = plan.streamed_bytes_per_pass
        if system == "profile-calibrate":
            out["profile_path"] = model.llmtier.profile().save(job["model"])
            out["gini"] = gini([c for cs in model.llmtier.expert_counts().values() for c in cs])
        model.close()
    return out


def gini(counts: list[int]) -> float:
    """The Gini coefficient of ``counts`` (0: every expert used alike, towards 1: a few take all)."""
    xs = sorted(counts)
    n, total = len(xs), sum(xs)
    if n == 0 or total == 0:
        return 0.0
    return sum((2 * i - n + 1) * x for i, x in enumerate(xs)) / (n * total)


def _child(job: dict[str, Any], limit: int | None, timeout: float = 3600.0) -> dict[str, Any]:
    from .cgroup import run_json_child  # noqa: PLC0415

    return run_json_child("llmtier.bench.moe", job, limit, timeout=timeout)


def _largest_file(directory: str) -> str:
    names = [os.path.join(directory, f) for f in os.listdir(directory)]
    return max((p for p in names if os.path.isfile(p)), key=os.path.getsize)


def _fio(path: str) -> float | None:
    from .fio import FioError, fio_available, run_fio  # noqa: PLC0415

    if not fio_available()[0]:
        return None
    size = min(os.path.getsize(path), 1 << 30)
    try:
        return run_fio(path, "read", 1 << 20, 32, size - size % (1 << 20)).gib_per_s * 2**30
    except FioError:
        return None


# -- the study ---------------------------------------------------------------------------------------------------------
def _med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")


def _row(system: str, res: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    if not res.get("ok"):
        return {"system": system, "ok": False, "error": res.get("error"), "stderr": res.get("stderr", "")[-300:]}
    runs = res["runs"]
    tok = [r["decode_tok_s"] for r in runs]
    row: dict[str, Any] = {"system": system, "ok": True, "decode_tok_s": _med(tok),
                           "decode_tok_s_range": (min(tok), max(tok)), "prefill_s": _med([r["prefill_s"] for r in runs]),
                           "cgroup_peak_bytes": res.get("cgroup_peak_bytes"), "peak_rss_bytes": res["peak_rss_bytes"]}
    if ref is not None and ref.get("ok"):
        row["tokens_match"] = all(a["digest"] == b["digest"] for a, b in zip(runs, ref["runs"]))
    if "decode_bytes_per_token" in runs[0]:
        bpt = _med([r["decode_bytes_per_token"] for r in runs])
        row["bytes_per_token"] = bpt
        if runs[0].get("decode_analytic_bytes"):
            row["bytes_vs_analytic"] = _med([r["decode_total_bytes_read"] / r["decode_analytic_bytes"]
                                             for r in runs if r.get("decode_analytic_bytes")])
        paired = [r for r in runs if r.get("fio_bytes_per_s") and r.get("decode_tok_s") and r.get("decode_steps")]

        def io_s(r: dict[str, Any]) -> float:
            """The reads of one decode step (a token per row) at the disk rate fio measured right before the
            round's child; ``decode_tok_s`` counts steps, so the bound is per step too."""
            return r["decode_total_bytes_read"] / r["decode_steps"] / r["fio_bytes_per_s"]
        if paired:
            row["io_bound_s"] = _med([io_s(r) for r in paired])
            row["io_efficiency"] = _med([io_s(r) * r["decode_tok_s"] for r in paired])
            if ref is not None and ref.get("ok") and ref["runs"]:
                # the binding bound: the reads at fio's rate or the in-memory model's compute, whichever is longer
                compute_s = 1 / _med([r["decode_tok_s"] for r in ref["runs"]])
                row["bound_s"] = max(row["io_bound_s"], compute_s)
                row["bound_efficiency"] = _med([max(io_s(r), compute_s) * r["decode_tok_s"] for r in paired])
        hits = sum(r.get("decode_expert_hits", 0) for r in runs)
        routed = hits + sum(r.get("decode_expert_misses", 0) + r.get("decode_prefetch_hits", 0) for r in runs)
        if routed:
            row["hit_rate"] = hits / routed
            pred = sum(r.get("decode_routed_with_prediction", 0) for r in runs)
            guessed = sum(r.get("decode_predicted", 0) for r in runs)
            right = sum(r.get("decode_predicted_right", 0) for r in runs)
            row["recall"] = right / pred if pred else None
            row["precision"] = right / guessed if guessed else None
            row["wasted_bytes_per_token"] = _med([r["decode_prefetch_wasted_bytes"] / max(1, r["decode_steps"])
                                                  for r in runs])
            row["expert_stall_s"] = _med([r["decode_expert_stall_s"] for r in runs])
    if res.get("oracle"):
        row["oracle"] = res["oracle"]
    return row


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The runs of two passes of one system as one result (a failed pass fails the system)."""
    if old is None or not old.get("ok"):
        return old or new
    if not new.get("ok"):
        return new
    out = {**new, "runs": old["runs"] + new["runs"]}
    for k in ("cgroup_peak_bytes", "peak_rss_bytes"):
        if old.get(k) is not None or new.get(k) is not None:
            out[k] = max(old.get(k) or 0, new.get(k) or 0)
    if old.get("oracle") and new.get("oracle"):
        out["oracle"] = {k: old["oracle"][k] + new["oracle"][k] for k in new["oracle"]}
    return out


def run_moe_bench(cfg: MoEBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run the study; a JSON-able dict of one table per (model, routing, budget, batch)."""
    from tqdm import tqdm  # noqa: PLC0415

    from .cgroup import memory_cgroup_available  # noqa: PLC0415

    for n, system in enumerate(cfg.systems):
        if system not in SYSTEMS and not ORACLE.match(system):
            raise ValueError(f"unknown system {system!r}: one of {', '.join(SYSTEMS)} or experts-<lru|lfu|profile>-oracle<1-9>")
        if ORACLE.match(system) and "memory" not in cfg.systems[:n]:
            raise ValueError(f"{system} reads ahead what the in-memory system routed: put 'memory' before it in the systems")
    os.makedirs(cfg.directory, exist_ok=True)
    capped, why = memory_cgroup_available()
    notes = ["2 cores and one virtio disk whose host cache makes O_DIRECT reads swing from run to run: compare ratios within a table"]
    if not capped:
        notes.append(f"no memory cgroup ({why}): runs are NOT capped")
    tables = []
    cells = [(m, r, f, b) for m in cfg.models for r in cfg.routings for f in cfg.budgets for b in cfg.batches]
    bar = tqdm(total=len(cells) * len(cfg.systems) * max(1, cfg.passes), desc="bench moe", disable=not progress)
    for model_type in cfg.models:
        for routing in cfg.routings:
            path = ensure_model(cfg.directory, model_type, routing, cfg, progress)
            store = ensure_store(path)  # what llmtier streams from; memory and accelerate load the HF directory
            total = _weights_bytes(path)
            base = {"model": path, "threads": cfg.threads, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
                    "seed": 1000, "offload_dir": os.path.join(cfg.directory, "accelerate-offload")}
            calib = _child({**base, "model": store, "system": "profile-calibrate", "batch": 4, "rounds": 1, "budget": total, "seed": 7},
                           None)  # other prompts than the measured ones
            for frac in cfg.budgets:
                for batch in cfg.batches:
                    budget = int(total * frac)
                    results: dict[str, dict[str, Any]] = {}
                    fios: list[float] = []
                    routing_path = os.path.join(cfg.directory, f"routing-{os.path.basename(path)}-b{batch}.json")
                    for npass in range(max(1, cfg.passes)):
                        for system in cfg.systems:
                            bar.set_postfix_str(f"{model_type} {routing} {frac:.0%} b{batch} {system} pass {npass + 1}")
                            job = {**base, "system": system, "budget": budget, "batch": batch, "rounds": cfg.rounds}
                            if system == "memory" and any(ORACLE.match(s) for s in cfg.systems):
                                job["routing_out"] = routing_path
                            if ORACLE.match(system):
                                job["routing"] = routing_path
                            fio_bw = None
                            if system not in ("memory", "accelerate"):
                                job["model"] = store
                                fio_bw = _fio(_largest_file(store))  # right before the child: paired with its rounds
                                if fio_bw:
                                    fios.append(fio_bw)
                            limit = None if system == "memory" or not capped else budget + cfg.overhead
                            res = _child(job, limit)
                            for r in res.get("runs", []):
                                r["fio_bytes_per_s"] = fio_bw
                            results[system] = _merge(results.get(system), res)
                            bar.update(1)
                    ref = results.get("memory")
                    fio_bw = _med(fios) if fios else None
                    rows = [_row(s, results[s], ref if s != "memory" else None) for s in cfg.systems]
                    layers = next((r for r in rows if r["system"] == "layers" and r.get("ok")), None)
                    for r in rows:
                        if layers and r.get("ok") and r["system"].startswith("experts"):
                            r["vs_layers"] = r["decode_tok_s"] / layers["decode_tok_s"]
                            if layers.get("bytes_per_token"):
                                r["bytes_vs_layers"] = r["bytes_per_token"] / layers["bytes_per_token"]
                    stats = results.get("experts-lru", {}).get("stats") or {}
                    tables.append({"model": model_type, "routing": routing, "budget": frac, "batch": batch,
                                   "weights_bytes": total, "fio_bytes_per_s": fio_bw,
                                   "fio_range": (min(fios), max(fios)) if fios else None, "rows": rows,
                                   "calibration_gini": calib.get("gini"), "expert_cache_bytes": stats.get("expert_cache_bytes"),
                                   "raw": results})
    bar.close()
    return {"config": asdict(cfg), "tables": tables, "notes": notes, "capped": capped}


def _span(rng: Any) -> str:
    """The range of fio rates (bytes/s) of a cell, as " (lo-hi before each streamed child)"."""
    return f" ({rng[0] / 2**30:.2f}-{rng[1] / 2**30:.2f} before each streamed child)" if rng else ""


def format_report(res: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    out = []
    for t in res["tables"]:
        fio = t["fio_bytes_per_s"]
        out += ["", f"### {t['model']} ({human(t['weights_bytes'])}), {t['routing']} routing, budget {t['budget']:.0%}, "
                f"batch {t['batch']}; fio {f(fio and fio / 2**30, '.2f')} GiB/s{_span(t.get('fio_range'))}; "
                "expert Gini (calibration) "
                f"{f(t.get('calibration_gini'), '.2f')}", "",
                "| system | decode steps/s (min-max) | vs whole layers | bytes/token | vs layers' bytes | read / analytic | "
                "I/O bound s/step | of I/O bound | of max(I/O, compute) | hit rate | recall | precision | wasted/token | "
                "tokens = in-memory | cgroup peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            if not r.get("ok"):
                out.append(f"| {r['system']} | failed: {r.get('error')} |" + " - |" * 13)
                continue
            lo, hi = r["decode_tok_s_range"]
            bpt = r.get("bytes_per_token")
            out.append(f"| {r['system']} | {f(r['decode_tok_s'], '.2f')} ({lo:.2f}-{hi:.2f}) | "
                       f"{f(r.get('vs_layers'), '.2f')} | {human(bpt) if bpt is not None else '-'} | "
                       f"{f(r.get('bytes_vs_layers'), '.3f')} | {f(r.get('bytes_vs_analytic'), '.3f')} | "
                       f"{f(r.get('io_bound_s'), '.3f')} | {f(r.get('io_efficiency'), '.2f')} | "
                       f"{f(r.get('bound_efficiency'), '.2f')} | {f(r.get('hit_rate'), '.2f')} | "
                       f"{f(r.get('recall'), '.2f')} | {f(r.get('precision'), '.2f')} | "
                       f"{human(r['wasted_bytes_per_token']) if r.get('wasted_bytes_per_token') is not None else '-'} | "
                       f"{r.get('tokens_match', '-')} | "
                       f"{human(r['cgroup_peak_bytes']) if r.get('cgroup_peak_bytes') else '-'} |")
    out += [f"note: {n}" for n in res["notes"]]
    return "\n".join(out)


def add_cli(bench: Any) -> None:
    p = bench.add_parser("moe", help="MoE expert streaming (LRU/LFU/profile, prediction) vs whole-layer streaming, "
                                     "accelerate and in-memory (memory-capped)")
    p.add_argument("--quick", action="store_true", help="a small model, one budget, one round")
    p.add_argument("--dir", help="where the synthetic models go")
    p.add_argument("--models", help="comma list of mixtral,qwen3_moe")
    p.add_argument("--routings", help="comma list of skew,uniform")
    p.add_argument("--budgets", help="comma list of shares of the weights, e.g. 0.5,0.25")
    p.add_argument("--batches", help="comma list, e.g. 1,4")
    p.add_argument("--systems", help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--rounds", type=int, help="counted rounds per pass (default 3, after a warm-up)")
    p.add_argument("--passes", type=int, help="run every system this many times in turn (default 2), rounds each")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cli_main)


def cli_main(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {}
    for name in ("models", "routings", "systems"):
        if getattr(args, name):
            kw[name] = tuple(getattr(args, name).split(","))
    if args.budgets:
        kw["budgets"] = tuple(float(x) for x in args.budgets.split(","))
    if args.batches:
        kw["batches"] = tuple(int(x) for x in args.batches.split(","))
    if args.rounds:
        kw["rounds"] = args.rounds
    if args.passes:
        kw["passes"] = args.passes
    if args.new_tokens:
        kw["new_tokens"] = args.new_tokens
    cfg = MoEBenchConfig.quick_config(args.dir, **kw) if args.quick else \
        MoEBenchConfig(**({"directory": args.dir} if args.dir else {}), **kw)
    res = run_moe_bench(cfg, progress=not args.no_progress)
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m llmtier.bench.moe --child JOB_JSON (used by `llmtier bench moe`)")


__all__ = ["QUICK", "MoEBenchConfig", "SHAPES", "SYSTEMS", "apply_skew", "ensure_model", "format_report", "gini", "run_moe_bench"]
