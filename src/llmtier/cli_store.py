"""CLI verbs of the store (``convert``, ``inspect``, ``bench store``) and ``trace``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .units import human, parse_size


def _size(text: str) -> int:
    """argparse type of a size: the reason, not "invalid value", when it is not one."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

_gib = human


def cmd_convert(args: argparse.Namespace) -> int:
    from .store.convert import convert  # noqa: PLC0415

    r = convert(args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.shard_size,
                progress=not args.no_progress)
    print(f"converted {r.tensors} tensors, {_gib(r.bytes_read)} read, {_gib(r.bytes_written)} written in "
          f"{r.seconds:.1f} s ({r.gbps:.2f} GB/s) -> {r.path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .store.convert import describe  # noqa: PLC0415

    d = describe(args.path, verify=args.verify)
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        print()
        return 0 if not d.get("bad_tensors") else 2
    print(f"{d['path']}: {d['format']} store, {d['files']} file(s), {d['file_bytes']:,} bytes on disk")
    print(f"  tensors    {d['tensors']}, {_gib(d['bytes'])} of data")
    print(f"  alignment  {d['aligned_tensors']} of {d['tensors']} tensors start on a 4 KiB boundary"
          + ("" if d["aligned_tensors"] == d["tensors"] else " (the rest need widened reads)"))
    print(f"  checksums  {d['checksums']}")
    print("  dtypes     " + ", ".join(f"{k} {_gib(v)}" for k, v in sorted(d["per_dtype"].items())))
    print("  kinds      " + ", ".join(f"{k} {_gib(v)}" for k, v in sorted(d["per_kind"].items())))
    layers = d["per_layer"]
    numbered = sorted((int(k), v) for k, v in layers.items() if k != "-")
    if numbered:
        sizes = sorted({v for _, v in numbered})
        span = _gib(sizes[0]) if len(sizes) == 1 else f"{_gib(sizes[0])}..{_gib(sizes[-1])}"
        print(f"  layers     {len(numbered)} decoder layers of {span} each; outside layers {_gib(layers.get('-', 0))}")
    if d.get("bad_tensors"):
        print("  DAMAGED    " + ", ".join(d["bad_tensors"][:20]))
    if args.tensors:
        print(f"\n  {'name':60s} {'dtype':14s} {'shape':22s} {'offset':>14s} {'bytes':>12s}  tags")
        for t in d["tensor_list"]:
            shape = "x".join(map(str, t["shape"])) or "scalar"
            print(f"  {t['name'][:60]:60s} {t['dtype']:14s} {shape:22s} {t['offset']:14,d} {t['nbytes']:12,d}  "
                  f"{json.dumps(t['tags'])}")
    return 0 if not d.get("bad_tensors") else 2


def add_store_verbs(sub: Any, bench: Any) -> None:
    add_trace_verb(sub)
    conv = sub.add_parser("convert", help="convert a safetensors file / Hugging Face model directory to a store")
    conv.add_argument("src", help="a .safetensors file, a model directory (config + shards), or a store")
    conv.add_argument("dst", help="the store to write (a file, or a directory with --shard-size)")
    conv.add_argument("--dtype", help="cast floating-point tensors, e.g. bf16, fp16, fp32")
    conv.add_argument("--shard-size", type=_size, help="write a sharded directory, shards of about this size (4G)")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    ins = sub.add_parser("inspect", help="describe a store or safetensors file: tensors, layers, alignment, checksums")
    ins.add_argument("path")
    ins.add_argument("--tensors", action="store_true", help="list every tensor")
    ins.add_argument("--verify", action="store_true", help="read everything and check the checksums")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=cmd_inspect)

    from .bench.store import add_cli  # noqa: PLC0415 - imports only the stdlib at load time

    add_cli(bench, _size)


def cmd_trace(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    from .trace import app_trace_paths, load, record  # noqa: PLC0415

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("llmtier trace: give a command after --, e.g. llmtier trace -o run.npz -- python -m mymodule",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.output)
    if not os.path.isdir(os.path.dirname(out)):
        print(f"llmtier trace: {os.path.dirname(out)} is not a directory", file=sys.stderr)
        return 2
    # The command's processes record their engine operations into app_path;
    # this process captures the block layer and device counters around it.
    app_path = f"{out}.app-{os.getpid()}.npz"
    for stale in (app_path, app_path + ".claim"):
        if os.path.exists(stale):
            os.unlink(stale)
    env = dict(os.environ, LLMTIER_TRACE=app_path, LLMTIER_TRACE_SOURCES="app")
    device_path = os.path.abspath(args.device_path) if args.device_path else os.path.dirname(out)
    try:
        with record(out, device_path=device_path, block=not args.no_block, app_from=app_path,
                    label=" ".join(cmd)):
            rc = _run_to_the_end(cmd, env)
    finally:
        for tmp in [*app_trace_paths(app_path), app_path + ".claim"]:
            if os.path.exists(tmp):
                os.unlink(tmp)
    t = load(out)
    app = t.app
    print(f"llmtier trace: {len(t)} application operations, {int(app['size'].sum()):,} bytes "
          f"({int(app['size'][app['op'] == 0].sum()):,} read, {int(app['size'][app['op'] == 1].sum()):,} written)",
          file=sys.stderr)
    if t.has_block:
        blk = t.block
        print(f"llmtier trace: {len(blk['size'])} block requests on {', '.join(t.meta['block_devices'])}, "
              f"{int(blk['size'][blk['op'] <= 1].sum()):,} bytes", file=sys.stderr)
    for m in t.missing:
        print(f"llmtier trace: not recorded: {m}", file=sys.stderr)
    for m in t.notes:
        print(f"llmtier trace: note: {m}", file=sys.stderr)
    print(f"llmtier trace: wrote {out}   (llmtier report {args.output} -o DIR)", file=sys.stderr)
    return rc


def _run_to_the_end(cmd: list[str], env: dict[str, str]) -> int:
    """Run the traced command; Ctrl-C goes to it (same process group) and this process
    waits for it to finish writing its records instead of dying first."""
    import subprocess  # noqa: PLC0415

    try:
        proc = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        print(f"llmtier trace: cannot run {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            print("llmtier trace: interrupted; waiting for the command to exit and the trace to be written",
                  file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from .errors import FormatError  # noqa: PLC0415
    from .trace import load  # noqa: PLC0415
    from .trace.report import ReportError, write_report  # noqa: PLC0415

    try:
        t = load(args.trace)
    except FileNotFoundError:
        print(f"llmtier report: {args.trace}: no such file", file=sys.stderr)
        return 2
    except FormatError as exc:
        print(f"llmtier report: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write_report(t, args.output, title=args.title)
    except ReportError as exc:
        print(f"llmtier report: {exc}", file=sys.stderr)
        return 1
    print("\n".join(f"- {f}" for f in paths["findings"]))
    print(f"\nllmtier report: wrote {paths['html']}, {paths['markdown']}, {paths['json']}", file=sys.stderr)
    return 0


def add_trace_verb(sub: Any) -> None:
    p = sub.add_parser("trace", help="run a command with I/O recording on: its engine operations (if it uses "
                       "llmtier), the block requests (root) and the counters of the device")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.npz)")
    p.add_argument("--device-path", help="trace the device holding this path (default: the trace's directory)")
    p.add_argument("--no-block", action="store_true", help="do not capture block-layer requests")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=cmd_trace)
    r = sub.add_parser("report", help="turn a trace into an HTML page with plots and a Markdown summary")
    r.add_argument("trace", help="a trace written by llmtier trace / llmtier.trace.record")
    r.add_argument("-o", "--output", required=True, help="directory for index.html, summary.md, summary.json")
    r.add_argument("--title", help="the page's title (default: the traced command)")
    r.set_defaults(func=cmd_report)
