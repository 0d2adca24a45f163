"""``llmtier run``: generate with a model larger than its memory budget."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from typing import Any

from .units import human, parse_size


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"llmtier run: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if not ids:
            raise SystemExit("llmtier run: --prompt-ids is empty")
        return ids
    if tokenizer is None:
        raise SystemExit(f"llmtier run: {args.model} has no tokenizer; give --prompt-ids 1,2,3 instead of --prompt")
    return tokenizer(args.prompt).input_ids


def _tokenizer(path: str) -> Any:
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f))
                                          for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(path)


def _kv_setup(args: argparse.Namespace, model: Any, stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """The KV cache (tiered, or transformers' own) and the prefix store the flags ask for."""
    cache = store = None
    if args.kv_offload:
        from .offload.kv import TieredCache  # noqa: PLC0415

        cache = stack.enter_context(TieredCache(model.config, memory=args.kv_memory, path=args.kv_dir,
                                                page_tokens=args.kv_page_tokens))
    if args.prefix_cache:
        from .offload.kv import PrefixStore  # noqa: PLC0415

        store = stack.enter_context(PrefixStore(args.prefix_cache, capacity=args.prefix_capacity,
                                                chunk_tokens=args.kv_page_tokens, admit=args.prefix_admit))
        if cache is None:
            from transformers import DynamicCache  # noqa: PLC0415

            cache = DynamicCache(config=model.config)
    return cache, store


def _kv_record(cache: Any, store: Any, loaded: int, fetch_s: float, prefill_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cache is not None and hasattr(cache, "stats"):
        s = cache.stats()
        out["kv"] = {"memory": cache.memory, "bytes_read": s.bytes_read + s.discarded_bytes,
                     "bytes_written": s.bytes_written, "discarded_bytes": s.discarded_bytes,
                     "resident_layers": s.resident_layers, "spilled_layers": s.spilled_layers,
                     "peak_dram_bytes": s.peak_dram_bytes, "ssd_bytes": s.ssd_bytes, "stall_s": s.stall_s}
    if store is not None:
        m = store.metrics()
        out["prefix"] = {"loaded_tokens": loaded, "fetch_s": fetch_s, "ttft_s": fetch_s + prefill_s,
                         **m.as_dict()}
    return out


def _kv_lines(kv: dict[str, Any]) -> list[str]:
    lines = []
    if "kv" in kv:
        k = kv["kv"]
        lines.append(f"KV: {k['spilled_layers']} of {k['spilled_layers'] + k['resident_layers']} layers on SSD; "
                     f"read {human(k['bytes_read'])}, wrote {human(k['bytes_written'])}; peak DRAM "
                     f"{human(k['peak_dram_bytes'])} of {human(k['memory'])}; compute waited {k['stall_s']:.2f} s")
    if "prefix" in kv:
        p = kv["prefix"]
        lines.append(f"prefix cache: {p['loaded_tokens']} tokens loaded in {p['fetch_s']:.3f} s (time to first token "
                     f"{p['ttft_s']:.2f} s); hits {p['hits']}, misses {p['misses']}, stored {p['chunks']} chunks "
                     f"({human(p['stored_bytes'])}), evictions {p['evictions']}, corrupt {p['corrupt']}")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .offload import stream_model  # noqa: PLC0415
    from .offload.generate import generate_timed  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = _tokenizer(args.model)
    ids = _prompt_ids(args, tokenizer)
    input_ids = torch.tensor([ids] * args.batch)
    sample = None
    if args.sample:
        torch.manual_seed(args.seed)
        sample = {"temperature": args.temperature, "top_k": args.top_k}
    trace = contextlib.nullcontext()
    if args.trace:
        from .trace import record  # noqa: PLC0415

        trace = record(args.trace, device_path=args.model, label=f"llmtier run {os.path.basename(args.model)}")
    t0 = time.perf_counter()
    with trace, stream_model(args.model, args.memory, args.device, host_memory=args.host_memory,
                             prefetch=args.prefetch, verify=args.verify) as model, \
            contextlib.ExitStack() as kv_stack:
        load_s = time.perf_counter() - t0
        input_ids = input_ids.to(model.device)
        st = model.llmtier
        if not args.json:
            print(st.plan.describe(), file=sys.stderr)
        bar = None
        if not args.json and not args.no_progress:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generate", file=sys.stderr)
        start_bytes = st.stats()["bytes_read"]

        def on_token(k: int, elapsed: float) -> None:
            if bar is None:
                return
            s = st.stats()
            gib = (s["bytes_read"] - start_bytes) / 2**30 / max(elapsed, 1e-9)
            bar.set_postfix_str(f"{gib:.2f} GiB/s streamed, {st.plan.resident_share:.0%} resident", refresh=False)
            bar.update(1)

        cache, store = _kv_setup(args, model, kv_stack)
        loaded, fetch_s = 0, 0.0
        if store is not None:
            t1 = time.perf_counter()
            loaded = store.fetch(model, input_ids, cache)
            fetch_s = time.perf_counter() - t1
        try:
            timed = generate_timed(model, input_ids, args.max_new_tokens, sample=sample, on_token=on_token,
                                   past_key_values=cache)
        finally:
            if bar is not None:
                bar.close()
        if store is not None:
            if not loaded:
                store.observe_prefill(model, len(ids) * args.batch, timed.prefill_s)
            whole = torch.cat([input_ids.cpu(), torch.tensor(timed.tokens, dtype=input_ids.dtype)], dim=1)
            store.save(model, whole, cache, prompt_tokens=len(ids))
        stats = st.stats()
        plan = st.plan
        kv_out = _kv_record(cache, store, loaded, fetch_s, timed.prefill_s)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {
        "model": args.model, "memory_budget": plan.budget, "batch": args.batch, "prompt_tokens": len(ids),
        "new_tokens": args.max_new_tokens, **timed.record(), "load_s": load_s,
        "bytes_read": stats["bytes_read"], "resident_bytes": stats["resident_bytes"],
        "weights_memory_bytes": stats["weights_memory_bytes"], "resident_share": stats["resident_share"],
        "streamed_bytes_per_pass": stats["streamed_bytes_per_pass"], "stall_s": stats["stall_s"],
        "resident_layers": plan.resident, "streamed_layers": plan.streamed, "slots": plan.slots,
        "peak_rss_bytes": rss,
    }
    if tokenizer is not None:
        out["text"] = [tokenizer.decode(row) for row in timed.tokens]
    out.update(kv_out)
    if args.trace:
        out["trace"] = args.trace
    if args.json:
        print(json.dumps(out))
        return 0
    total = stats["bytes_read"]
    seconds = timed.prefill_s + timed.decode_s
    print(f"prefill {timed.prefill_s:.2f} s ({len(ids)} tokens x {args.batch}); decode {timed.decode_tok_s:.2f} "
          f"tok/s ({timed.decode_steps} steps); streamed {human(total)} ({total / 2**30 / max(seconds, 1e-9):.2f} "
          f"GiB/s), compute waited {stats['stall_s']:.2f} s for reads; resident {human(plan.resident_bytes)} "
          f"({plan.resident_share:.0%} of the model); peak RSS {human(rss)}")
    for line in _kv_lines(kv_out):
        print(line)
    for i, row in enumerate(out.get("text") or timed.tokens):
        print(f"[{i}] {row}")
    if args.trace:
        print(f"trace saved to {args.trace}; `llmtier report {args.trace} -o DIR` explains it", file=sys.stderr)
    return 0


def add_cli(sub: Any) -> None:
    run = sub.add_parser("run", help="generate with a model larger than its memory budget (weights stream from SSD)")
    run.add_argument("--model", required=True, help="Hugging Face model directory, or a store made by `llmtier convert`")
    run.add_argument("--memory", required=True, type=parse_size,
                     help="memory budget for the weights (resident layers + stream buffers), e.g. 4GiB")
    group = run.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a tokenizer beside the model)")
    group.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--batch", type=int, default=1, help="rows of the same prompt (default 1)")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--top-k", type=int, default=50)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu", help="where the layers compute: cpu (default) or cuda[:N]; on a GPU "
                     "--memory is GPU memory")
    run.add_argument("--host-memory", type=parse_size, help="with --device cuda: pinned host memory that caches "
                     "streamed layers (default: none, every streamed layer is read from the disk)")
    run.add_argument("--prefetch", type=int, help="layers read ahead (default: from the budget)")
    run.add_argument("--verify", choices=("first", "always", "never"), default="first",
                     help="CRC-32C checks of store tensors (default: the first time each is read)")
    run.add_argument("--threads", type=int, help="torch compute threads (default: torch's)")
    run.add_argument("--kv-offload", action="store_true", help="KV cache in a DRAM pool of --kv-memory, the rest on SSD")
    run.add_argument("--kv-memory", type=parse_size, default=parse_size("2GiB"),
                     help="DRAM pool of the KV cache with --kv-offload (default 2GiB)")
    run.add_argument("--kv-dir", help="directory of the KV spill file (default $LLMTIER_KV_DIR or the temp dir)")
    run.add_argument("--kv-page-tokens", type=int, default=256, help="tokens per KV page and prefix chunk")
    run.add_argument("--prefix-cache", metavar="DIR",
                     help="reuse the KV of earlier prompts stored in DIR, and store this prompt's")
    run.add_argument("--prefix-capacity", type=parse_size, default=parse_size("10GiB"),
                     help="SSD capacity of the prefix cache (default 10GiB; least recently used chunks go first)")
    run.add_argument("--prefix-admit", choices=("prompt", "all"), default="prompt",
                     help="what the prefix cache stores: the prompt's KV (default) or the answer's too")
    run.add_argument("--trace", help="record the I/O to this trace file (.npz)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)


__all__ = ["add_cli", "cmd_run"]
