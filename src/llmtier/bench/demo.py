"""``llmtier demo`` (``make demo``): the main job in about a minute, on built-in defaults.

It builds a random-weight Llama-shaped model of about 180 MiB with a local
tokenizer (nothing is downloaded), plans it at a budget well below its
weights, and answers two requests that share a long prefix, with the weights
streamed from SSD, the KV cache of every layer spilled to SSD (a pool of the least DRAM) and
a prefix cache on SSD (the second request loads the first one's prompt KV
instead of recomputing it).  Everything is traced; the HTML report and a
short summary (tok/s, bytes streamed, what stayed resident, the report's
path) come out at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import human

# ~180 MiB of bf16 weights: 8 layers of ~21 MiB, a 1000-token vocabulary (the local tokenizer's)
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
         "max_position_embeddings": 2048}


@dataclass
class DemoConfig:
    """What the demo runs; the defaults fit in about a minute on 2 cores."""

    directory: str
    layers: int = 8
    budget_share: float = 0.6  # of the weights
    new_tokens: int = 16
    prompt_repeats: int = 1  # the built-in text (repeated): ~170 tokens of shared prefix per repeat
    page_tokens: int = 16  # KV pages: small, so that this short context already fills several
    chunk_tokens: int = 32  # prefix-cache chunks
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL))  # shape overrides of hfmodels' llama


@dataclass
class DemoResult:
    """What the demo measured (``--json`` writes it)."""

    model_bytes: int = 0
    budget: int = 0
    resident_layers: list[int] = field(default_factory=list)
    streamed_layers: list[int] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    kv: dict[str, Any] = field(default_factory=dict)
    prefix: dict[str, Any] = field(default_factory=dict)
    trace: str = ""
    report: str = ""
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _model(cfg: DemoConfig, progress: bool) -> str:
    from .hfmodels import make_model  # noqa: PLC0415

    path = os.path.join(cfg.directory, "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if progress:
        print(f"demo: building a random-weight model of {cfg.layers} layers in {path} ...", file=sys.stderr)
    return make_model(path, "llama", layers=cfg.layers, vocab=1000, **cfg.model)


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> DemoResult:
    """Run the demo in ``cfg.directory`` (see the module doc)."""
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from ..offload import stream_model  # noqa: PLC0415
    from ..offload.generate import generate_timed  # noqa: PLC0415
    from ..offload.kv import PrefixStore, TieredCache  # noqa: PLC0415
    from ..offload.layout import open_layout  # noqa: PLC0415
    from ..trace import load, record  # noqa: PLC0415
    from ..trace.report import write_report  # noqa: PLC0415
    from .hfmodels import TEXT  # noqa: PLC0415

    t_start = time.perf_counter()
    os.makedirs(cfg.directory, exist_ok=True)
    path = _model(cfg, progress)
    lay = open_layout(path)
    total = lay.total_bytes
    lay.source.close()
    budget = max(int(total * cfg.budget_share), 0)
    tok = AutoTokenizer.from_pretrained(path)
    shared = " ".join([TEXT] * cfg.prompt_repeats)
    prompts = [shared + "\nQuestion: what limits the speed?", shared + "\nQuestion: where did the time go?"]
    res = DemoResult(model_bytes=total, budget=budget)
    trace_path = os.path.join(cfg.directory, "demo.trace.npz")
    prefix_dir = os.path.join(cfg.directory, "prefix")
    shutil.rmtree(prefix_dir, ignore_errors=True)  # a fresh cache: the first request misses, the second hits
    with record(trace_path, device_path=cfg.directory, label="llmtier demo"), \
            stream_model(path, budget) as model, PrefixStore(prefix_dir, chunk_tokens=cfg.chunk_tokens) as store:
        plan = model.llmtier.plan
        res.resident_layers, res.streamed_layers = list(plan.resident), list(plan.streamed)
        if progress:
            print(plan.describe(), file=sys.stderr)
        kv_memory = _kv_memory(model, len(tok(prompts[0]).input_ids) + cfg.new_tokens + 16, cfg.page_tokens)
        for i, text in enumerate(prompts):
            ids = torch.tensor([tok(text).input_ids])
            before = model.llmtier.stats().bytes_read
            with TieredCache(model.config, memory=kv_memory, path=os.path.join(cfg.directory, "kv"),
                             page_tokens=cfg.page_tokens, spill_all=True) as cache:
                t0 = time.perf_counter()
                loaded = store.fetch(model, ids, cache, force=True)
                fetch_s = time.perf_counter() - t0
                timed = generate_timed(model, ids, cfg.new_tokens, cache=cache)
                store.save(model, ids, cache)
                kv = cache.stats()
            res.requests.append({"prompt_tokens": ids.shape[1], "loaded_tokens": loaded, "fetch_s": fetch_s,
                                 "ttft_s": fetch_s + timed.prefill_s, "decode_tok_s": timed.decode_tok_s,
                                 "new_tokens": len(timed.tokens[0]),
                                 "bytes_streamed": model.llmtier.stats().bytes_read - before,
                                 "text": tok.decode(timed.tokens[0], skip_special_tokens=True)})
            res.kv = {"memory": kv_memory, "spilled_layers": kv.spilled_layers, "resident_layers": kv.resident_layers,
                      "bytes_written": kv.bytes_written, "bytes_read": kv.bytes_read}
            if progress:
                r = res.requests[-1]
                print(f"demo: request {i + 1}: {r['loaded_tokens']} of {r['prompt_tokens']} prompt tokens from the "
                      f"prefix cache, first token after {r['ttft_s']:.2f} s, {r['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr)
        res.prefix = store.metrics().as_dict()
    res.trace = trace_path
    report = write_report(load(trace_path), os.path.join(cfg.directory, "report"), title="llmtier demo: a model "
                          "larger than its budget, weights and KV on SSD, a prefix cache")
    res.report, res.findings = report.get("html", ""), list(report.get("findings") or [])
    res.seconds = time.perf_counter() - t_start
    return res


def _kv_memory(model: Any, tokens: int, page_tokens: int) -> int:
    """The least KV pool that decodes ``tokens`` with every layer on SSD.  (At the demo's short context the
    whole cache would cost less DRAM than a spilled layer's staging, so the demo asks for ``spill_all``.)"""
    from ..offload.kv import min_memory  # noqa: PLC0415

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return min_memory(c.num_hidden_layers, 1, c.num_key_value_heads, head_dim, 2, tokens, page_tokens=page_tokens)


def summary(res: DemoResult) -> list[str]:
    """The lines ``llmtier demo`` prints."""
    a, b = res.requests[0], res.requests[-1]
    streamed = sum(r["bytes_streamed"] for r in res.requests)
    n = len(res.resident_layers) + len(res.streamed_layers)
    return [
        f"model: {human(res.model_bytes)} of weights, budget {human(res.budget)} "
        f"({res.budget / max(res.model_bytes, 1):.0%}): {len(res.resident_layers)} of {n} layers stay resident, "
        f"{len(res.streamed_layers)} stream from SSD on every forward pass",
        f"generated {a['new_tokens']} + {b['new_tokens']} tokens at {a['decode_tok_s']:.1f} / {b['decode_tok_s']:.1f} "
        f"tok/s; {human(streamed)} of weights streamed",
        f"KV cache: {res.kv['spilled_layers']} of {res.kv['spilled_layers'] + res.kv['resident_layers']} layers "
        f"spilled to SSD (pool {human(res.kv['memory'])}); wrote {human(res.kv['bytes_written'])}, "
        f"read {human(res.kv['bytes_read'])}",
        f"prefix cache: request 2 loaded {b['loaded_tokens']} of its {b['prompt_tokens']} prompt tokens; first token "
        f"after {b['ttft_s']:.2f} s instead of {a['ttft_s']:.2f} s",
        f"report: {res.report}  (trace {res.trace}); {res.seconds:.0f} s in all",
    ]


def cmd_demo(args: argparse.Namespace) -> int:
    directory = args.dir
    tmp = None
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="llmtier-demo-")
        directory = tmp
    res = run_demo(DemoConfig(directory), progress=not args.no_progress)
    for line in summary(res):
        print(line)
    for f in res.findings[:3]:
        print(f"  - {f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(res), f, indent=1)
    if tmp is not None:  # the model and caches go; the report and trace stay
        for name in ("model", "prefix", "kv"):
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.join(tmp, name))
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("demo", help="the main job in about a minute: a model larger than its budget, traced, "
                       "with an HTML report")
    p.add_argument("--dir", help="where the model, caches, trace and report go (default: a new temp directory; the "
                   "model is kept there and reused)")
    p.add_argument("--json", metavar="PATH", help="write what was measured as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_demo)


__all__ = ["DemoConfig", "DemoResult", "add_cli", "cmd_demo", "run_demo", "summary"]
