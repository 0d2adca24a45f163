"""``llmtier run``: generate with a model larger than its memory budget.

It behaves like ``model.generate()`` (and llama.cpp's ``llama-cli``): the
model directory's ``generation_config.json`` gives the defaults (sampling,
temperature, EOS ids ...), options override them, generation stops at EOS or
a ``--stop`` string, and the answer streams to the terminal as it is made.
What llmtier adds is the budget (``--memory``), the KV tier, the prefix
cache and the I/O summary.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .cli_store import _size
from .errors import LLMTierError
from .units import human, parse_size, resolve_size, total_ram

DEFAULT_MEMORY = "50%ram"


class RunError(LLMTierError, ValueError):
    """An option or input of ``llmtier run`` that cannot work (said before any work is done)."""


# -- argparse types --------------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _budget(text: str) -> str:
    """A size (4GiB), a share of the weights (50%) or of the memory available (25%ram); checked now, resolved later."""
    try:
        resolve_size(text, whole=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- inputs --------------------------------------------------------------------------------------------------------
def _tokenizer(path: str) -> Any:
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f))
                                          for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(path)


def _encode(text: str, tokenizer: Any, args: argparse.Namespace, history: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids of ``text`` (with the chat template and earlier turns under ``--chat``)."""
    if tokenizer is None:
        raise RunError(f"{args.model} has no tokenizer; give --prompt-ids 1,2,3 instead of --prompt")
    if not text.strip() and not history:
        raise RunError("the prompt is empty; give some text (or --prompt-ids)")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RunError(f"the tokenizer of {args.model} has no chat template; run without --chat")
        messages = [*(history or []), {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(map(int, ids))
    ids = list(tokenizer(text).input_ids)
    if not ids:
        raise RunError("the prompt makes no tokens; give some text (or --prompt-ids)")
    return ids


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise RunError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if not ids:
            raise RunError("--prompt-ids is empty")
        return ids
    return _encode(args.prompt, tokenizer, args)


def _check_ids(ids: list[int], config: Any, new_tokens: int) -> None:
    """Token ids inside the vocabulary; prompt + new tokens inside the model's positions."""
    vocab = getattr(config, "vocab_size", None)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise RunError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1 if vocab else '?'})")
    most = getattr(config, "max_position_embeddings", None)
    if most is not None and len(ids) + new_tokens > most:
        raise RunError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {new_tokens} = {len(ids) + new_tokens} "
                       f"tokens is more than the model's {most} positions; shorten the prompt or lower "
                       f"--max-new-tokens to {max(0, most - len(ids))}")


def _kv_need(config: Any, dtype: Any, batch: int, tokens: int, page_tokens: int) -> int:
    """The least DRAM the KV tier needs for ``tokens`` of context (every layer spilled), from the planner's memory
    model (GQA, MLA's compressed cache, sliding windows)."""
    from .plan import model_memory  # noqa: PLC0415
    from .plan.planner import Workload, kv_least  # noqa: PLC0415

    m = model_memory(config, dtype=str(dtype).replace("torch.", "") if dtype is not None else None)
    return kv_least(m, Workload(batch, max(1, tokens - 1), 1), page_tokens)


def _placement(args: argparse.Namespace, ids: list[int]) -> Any:
    """The planner's placement for this run's budgets (built once; its parts go to ``stream_model`` and
    ``TieredCache``), or None where the runtimes take budgets (a GPU, expert streaming, -i, a model the memory model
    cannot read)."""
    if args.device != "cpu" or args.experts is not None or args.interactive:
        return None
    from .cli_plan import given_placement  # noqa: PLC0415

    try:
        return given_placement(args.model, batch=args.batch, prompt=max(1, len(ids)), new_tokens=args.max_new_tokens,
                               weights_memory=args.memory or DEFAULT_MEMORY,
                               kv_memory=args.kv_memory if args.kv_offload else None, kv_page=args.kv_page_tokens,
                               dtype=args.dtype)
    except (LLMTierError, ValueError):
        return None


# -- generation options ------------------------------------------------------------------------------------------------
def _options(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``generate()`` keywords from the options given; the rest comes from generation_config.json."""
    opts: dict[str, Any] = {}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        v = getattr(args, name)
        if v is not None:
            opts[name] = v
    if args.greedy:
        opts = {k: v for k, v in opts.items() if k == "repetition_penalty"}
        opts["do_sample"] = False
    elif args.sample or set(opts) - {"repetition_penalty"}:
        opts["do_sample"] = True
    if args.stop:
        if tokenizer is None:
            raise RunError("--stop needs a tokenizer beside the model (stop strings are text)")
        opts["stop_strings"] = list(args.stop)
        opts["tokenizer"] = tokenizer
    return opts


class _Printer:
    """Streams new text to stdout as tokens come (a transformers streamer: ``put`` / ``end``)."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tok, self.skip, self.ids, self.shown = tokenizer, True, [], ""

    def put(self, value: Any) -> None:
        if self.skip:  # the first call is the prompt
            self.skip = False
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[len(self.shown):] + "\n")
        sys.stdout.flush()


@dataclass
class _Turn:
    timed: Any
    loaded: int
    fetch_s: float
    warnings: list[str]
    cache: Any = None


def _warn(msg: str) -> str:
    print(f"llmtier run: warning: {msg}", file=sys.stderr)
    return msg


def _generate(model: Any, ids: list[int], args: argparse.Namespace, opts: dict[str, Any], stack: contextlib.ExitStack,
              store: Any, tokenizer: Any, on_token: Any, stream: bool) -> _Turn:
    """One request: fetch the stored prefix, generate, store the prefix (a failing save is a warning)."""
    import torch  # noqa: PLC0415

    from .offload.generate import generate_timed  # noqa: PLC0415

    input_ids = torch.tensor([ids] * args.batch, device=model.device)
    cache = _cache(args, model, stack, store)
    loaded, fetch_s, warnings = 0, 0.0, []
    if store is not None:
        t1 = time.perf_counter()
        try:
            loaded = store.fetch(model, input_ids, cache)
        except (LLMTierError, OSError) as exc:
            warnings.append(_warn(f"the prefix cache could not be read ({exc}); computing the prompt instead"))
            cache = _cache(args, model, stack, store)
        fetch_s = time.perf_counter() - t1
    streamer = _Printer(tokenizer, len(ids)) if stream else None
    torch.manual_seed(args.seed)  # as `torch.manual_seed(seed); model.generate(...)` would
    timed = generate_timed(model, input_ids, args.max_new_tokens, on_token=on_token, cache=cache, exact=False,
                           options=opts, streamer=streamer)
    if store is not None:
        try:
            if not loaded:
                store.observe_prefill(model, len(ids) * args.batch, timed.prefill_s)
            whole = torch.cat([input_ids.cpu(), torch.tensor(timed.tokens, dtype=input_ids.dtype)], dim=1)
            store.save(model, whole, cache, prompt_tokens=len(ids))
        except (LLMTierError, OSError) as exc:  # the answer is made: keep it
            warnings.append(_warn(f"the prefix cache could not be saved ({exc}); the answer is not affected"))
    return _Turn(timed, loaded, fetch_s, warnings, cache)


def _cache(args: argparse.Namespace, model: Any, stack: contextlib.ExitStack, store: Any) -> Any:
    if args.kv_offload:
        from .offload.kv import TieredCache  # noqa: PLC0415

        kv = getattr(args, "placement", None) and args.placement.kv  # the planner's KV part when there is one
        if kv is not None:
            return stack.enter_context(TieredCache(model.config, plan=kv, path=args.kv_dir))
        return stack.enter_context(TieredCache(model.config, memory=args.kv_memory, path=args.kv_dir,
                                               page_tokens=args.kv_page_tokens))
    if store is not None:
        from transformers import DynamicCache  # noqa: PLC0415

        return DynamicCache(config=model.config)
    return None


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


# -- the verb ------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    if not args.interactive and args.prompt is None and args.prompt_ids is None:
        raise RunError("give --prompt TEXT, --prompt-ids 1,2,3 or -i (interactive)")
    if args.interactive and args.json:
        raise RunError("-i (interactive) and --json do not go together")
    if args.interactive and args.prompt_ids is not None:
        raise RunError("-i reads text turns; it needs a tokenizer, not --prompt-ids")
    if args.greedy and args.sample:
        raise RunError("--greedy and --sample contradict each other")
    if args.memory is not None and "%" not in args.memory:
        if parse_size(args.memory) > total_ram():
                raise RunError(f"--memory {args.memory} is more than this machine's RAM ({human(total_ram())}); "
                               f"give a size below it, a share of the weights (50%) or of the memory available (50%ram)")


def cmd_run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .offload import stream_model  # noqa: PLC0415

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = _tokenizer(args.model)
    if args.interactive and tokenizer is None:
        raise RunError(f"{args.model} has no tokenizer; -i needs one")
    ids = _prompt_ids(args, tokenizer) if not args.interactive else []
    opts = _options(args, tokenizer)
    stream = tokenizer is not None and args.batch == 1 and not args.json
    trace_cm: Any = None
    if args.trace:
        from .trace import record  # noqa: PLC0415

        trace_cm = record(args.trace, device_path=args.model, label=f"llmtier run {os.path.basename(args.model)}")
        trace_cm.__enter__()
    t0 = time.perf_counter()
    args.placement = _placement(args, ids) if args.prefetch is None else None  # built once, given to the runtimes
    budget = {"plan": args.placement.weights} if args.placement is not None else {"memory": args.memory or DEFAULT_MEMORY}
    try:
        with stream_model(args.model, device=args.device, host_memory=args.host_memory,
                          prefetch=args.prefetch, verify=args.verify, experts=args.experts,
                          predict=False if args.no_predict else "auto", dtype=args.dtype,
                          **budget) as model, contextlib.ExitStack() as stack:
            load_s = time.perf_counter() - t0
            st = model.llmtier
            if not args.json:
                print(st.plan.describe(), file=sys.stderr)
            store = None
            store_dir = args.prefix_cache
            if args.interactive and store_dir is None:  # turns reuse the KV of the turns before
                store_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="llmtier-chat-"))
            if store_dir is not None:
                from .offload.kv import PrefixStore  # noqa: PLC0415

                store = stack.enter_context(PrefixStore(store_dir, capacity=args.prefix_capacity,
                                                        chunk_tokens=args.kv_page_tokens,
                                                        admit="all" if args.interactive else args.prefix_admit))
            if args.interactive:
                return _interactive(model, args, opts, stack, store, tokenizer)
            _check_ids(ids, model.config, args.max_new_tokens)
            if args.kv_offload:
                need = _kv_need(model.config, model.dtype, args.batch, len(ids) + args.max_new_tokens,
                                args.kv_page_tokens)
                if args.kv_memory < need:
                    raise RunError(f"--kv-memory {human(args.kv_memory)} cannot hold {len(ids)} prompt + "
                                   f"{args.max_new_tokens} new tokens x batch {args.batch}: the KV tier needs at least "
                                   f"{human(need)} ({need} bytes); raise --kv-memory or lower --max-new-tokens")
            bar = None
            if not args.json and not args.no_progress and not stream:
                from tqdm import tqdm  # noqa: PLC0415

                bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generate", file=sys.stderr)
            start_bytes = st.stats().bytes_read

            def on_token(k: int, elapsed: float) -> None:
                if bar is None:
                    return
                gib = (st.stats().bytes_read - start_bytes) / 2**30 / max(elapsed, 1e-9)
                bar.set_postfix_str(f"{gib:.2f} GiB/s streamed, {st.plan.resident_share:.0%} resident", refresh=False)
                bar.update(1)

            try:
                turn = _generate(model, ids, args, opts, stack, store, tokenizer, on_token, stream)
            finally:
                if bar is not None:
                    bar.close()
            stats = st.stats()
            plan = st.plan
            kv_out = _kv_record(turn.cache, store, turn.loaded, turn.fetch_s, turn.timed.prefill_s)
    except BaseException:
        if trace_cm is not None:
            with contextlib.suppress(Exception):
                trace_cm.__exit__(*sys.exc_info())
        raise
    warnings = list(turn.warnings)
    if trace_cm is not None:
        try:
            trace_cm.__exit__(None, None, None)
        except (LLMTierError, OSError, ValueError) as exc:  # the answer is made: keep it
            warnings.append(_warn(f"the trace could not be written to {args.trace} ({exc})"))
    timed = turn.timed
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {
        "model": args.model, "memory_budget": plan.budget, "batch": args.batch, "prompt_tokens": len(ids),
        "new_tokens": args.max_new_tokens, **timed.record(), "load_s": load_s,
        "bytes_read": stats.bytes_read, "resident_bytes": stats.resident_bytes,
        "weights_memory_bytes": stats.weights_memory_bytes, "resident_share": stats.resident_share,
        "streamed_bytes_per_pass": stats.streamed_bytes_per_pass, "stall_s": stats.stall_s,
        "resident_layers": plan.resident, "streamed_layers": plan.streamed, "slots": plan.slots,
        "peak_rss_bytes": rss,
    }
    if tokenizer is not None:
        out["text"] = [tokenizer.decode(row, skip_special_tokens=True) for row in timed.tokens]
    if hasattr(stats, "expert_hit_rate"):  # --experts: the expert cache's counters
        out["experts"] = {k: v for k, v in stats.as_dict().items() if k not in out}
    out.update(kv_out)
    if args.trace and not any("trace" in w for w in warnings):
        out["trace"] = args.trace
    if warnings:
        out["warnings"] = warnings
    if args.json:
        print(json.dumps(out))
        return 0
    if not stream:
        for i, row in enumerate(out.get("text") or timed.tokens):
            print(f"[{i}] {row}")
    total = stats.bytes_read
    seconds = timed.prefill_s + timed.decode_s
    print(f"prefill {timed.prefill_s:.2f} s ({len(ids)} tokens x {args.batch}); decode {timed.decode_tok_s:.2f} "
          f"tok/s ({timed.decode_steps} steps); streamed {human(total)} ({total / 2**30 / max(seconds, 1e-9):.2f} "
          f"GiB/s), compute waited {stats.stall_s:.2f} s for reads; resident {human(plan.resident_bytes)} "
          f"({plan.resident_share:.0%} of the model); peak RSS {human(rss)}", file=sys.stderr)
    if "experts" in out:
        e = out["experts"]
        print(f"experts ({e['policy']}): hit rate {e['expert_hit_rate']:.2f}, {human(e['expert_bytes_read'])} read "
              f"({e['expert_reads']} experts), prediction recall {e['prediction_recall']:.2f} precision "
              f"{e['prediction_precision']:.2f}, {human(e['bytes_per_token'])} per token", file=sys.stderr)
    for line in _kv_lines(kv_out):
        print(line, file=sys.stderr)
    if args.placement is not None and timed.decode_steps:  # the planner's prediction beside the measurement
        from .cli_plan import format_prediction  # noqa: PLC0415
        print(format_prediction(args.placement, timed.decode_s / timed.decode_steps, rss), file=sys.stderr)
    if "trace" in out:
        print(f"trace saved to {args.trace}; `llmtier report {args.trace} -o DIR` explains it", file=sys.stderr)
    return 0


def _interactive(model: Any, args: argparse.Namespace, opts: dict[str, Any], stack: contextlib.ExitStack, store: Any,
                 tokenizer: Any) -> int:
    """Turns read from stdin until EOF (or an empty line); each turn's prompt is the conversation so far,
    whose stored KV the prefix store gives back."""
    history: list[dict[str, str]] = []
    text_so_far = ""
    print("interactive: type a message, an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if args.chat:
            ids = _encode(line.strip(), tokenizer, args, history)
        else:
            text_so_far += line
            ids = _encode(text_so_far, tokenizer, args)
        _check_ids(ids, model.config, args.max_new_tokens)
        turn = _generate(model, ids, args, opts, stack, store, tokenizer, None, True)
        answer = tokenizer.decode(turn.timed.tokens[0], skip_special_tokens=True)
        if args.chat:
            history += [{"role": "user", "content": line.strip()}, {"role": "assistant", "content": answer}]
        else:
            text_so_far += answer + "\n"
        print(f"[{len(turn.timed.tokens[0])} tokens, {turn.loaded} from the prefix cache, "
              f"{turn.timed.decode_tok_s:.1f} tok/s]", file=sys.stderr)


def add_cli(sub: Any) -> None:
    run = sub.add_parser("run", help="generate with a model larger than its memory budget (weights stream from SSD)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="Hugging Face model directory, or a store made by `llmtier convert`")
    run.add_argument("--memory", type=_budget,
                     help="memory budget for the weights (resident layers + stream buffers): a size (4GiB), a share "
                          f"of the weights (50%%) or of the memory available (25%%ram); default {DEFAULT_MEMORY}")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="prompt text (needs a tokenizer beside the model)")
    group.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    run.add_argument("-i", "--interactive", action="store_true",
                     help="a multi-turn session on stdin; each turn reuses the KV of the conversation so far")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    run.add_argument("--max-new-tokens", type=_positive, default=32, help="most tokens to generate per row (default 32)")
    run.add_argument("--stop", action="append", metavar="TEXT", help="stop when the output ends with TEXT (repeatable)")
    run.add_argument("--batch", type=_positive, default=1, help="rows of the same prompt (default 1)")
    run.add_argument("--sample", action="store_true", help="sample (default: as generation_config.json says)")
    run.add_argument("--greedy", action="store_true", help="greedy decoding, whatever generation_config.json says")
    run.add_argument("--temperature", type=float, help="sampling temperature (default: generation_config.json's)")
    run.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: generation_config.json's)")
    run.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: generation_config.json's)")
    run.add_argument("--repetition-penalty", type=float, help="penalty of repeated tokens, 1.0 = none "
                     "(default: generation_config.json's)")
    run.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    run.add_argument("--dtype", help="compute dtype, e.g. bf16, fp16, fp32 (default: the checkpoint's); cast at load")
    run.add_argument("--device", default="cpu", help="where the layers compute: cpu (default) or cuda[:N]; on a GPU "
                     "--memory is GPU memory")
    run.add_argument("--host-memory", type=parse_size, help="with --device cuda: pinned host memory that caches "
                     "streamed layers (default: none, every streamed layer is read from the disk)")
    run.add_argument("--prefetch", type=_positive, help="layers read ahead (default: from the budget)")
    run.add_argument("--experts", choices=("lru", "lfu", "profile"), help="a MoE model: stream by experts with this "
                     "cache policy (default: whole layers)")
    run.add_argument("--no-predict", action="store_true",
                     help="with --experts: no prediction and prefetch (default: prefetch while the guesses are mostly right)")
    run.add_argument("--verify", choices=("first", "always", "never"), default="first",
                     help="CRC-32C checks of store tensors (default: the first time each is read)")
    run.add_argument("--threads", type=_positive, help="torch compute threads (default: torch's)")
    run.add_argument("--kv-offload", action="store_true", help="KV cache in a DRAM pool of --kv-memory, the rest on SSD")
    run.add_argument("--kv-memory", type=_size, default=parse_size("2GiB"),
                     help="DRAM pool of the KV cache with --kv-offload (default 2GiB)")
    run.add_argument("--kv-dir", help="directory of the KV spill file (default $LLMTIER_KV_DIR or the temp dir)")
    run.add_argument("--kv-page-tokens", type=_positive, default=256, help="tokens per KV page and prefix chunk (default 256)")
    run.add_argument("--prefix-cache", metavar="DIR",
                     help="reuse the KV of earlier prompts stored in DIR, and store this prompt's")
    run.add_argument("--prefix-capacity", type=_size, default=parse_size("10GiB"),
                     help="SSD capacity of the prefix cache (default 10GiB; least recently used chunks go first)")
    run.add_argument("--prefix-admit", choices=("prompt", "all"), default="prompt",
                     help="what the prefix cache stores: the prompt's KV (default) or the answer's too")
    run.add_argument("--trace", help="record the I/O to this trace file (.npz)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)


__all__ = ["DEFAULT_MEMORY", "RunError", "add_cli", "cmd_run"]
