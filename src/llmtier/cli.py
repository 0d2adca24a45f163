"""``llmtier <verb>``: a thin layer; every verb calls one library function."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

from . import __version__
from .cli_store import _size
from .errors import LLMTierError

# optional dependencies and the extra that installs each
_EXTRAS = {"torch": "hf", "transformers": "hf", "tokenizers": "hf", "accelerate": "hf", "safetensors": "hf",
           "matplotlib": "bench", "psutil": "bench", "deepspeed": "peers"}


def cmd_bench_io(args: argparse.Namespace) -> int:
    from .bench import io_report  # noqa: PLC0415 - keep `llmtier --help` fast
    from .bench.io import OPS, StudyConfig, run_io_study  # noqa: PLC0415
    from .engine import current_settings  # noqa: PLC0415

    directory = args.dir or tempfile.gettempdir()
    if getattr(args, "save_profile", None) is not None:
        from .bench.profile import cmd_save_profile  # noqa: PLC0415
        return cmd_save_profile(args, directory)
    if args.device != "cpu":
        return _bench_io_device(args, directory)
    overrides = {k: v for k, v in (("chunk_size", args.chunk_size), ("queue_depth", args.queue_depth),
                                   ("threads", args.threads)) if v is not None}
    kw = {"settings": current_settings(**overrides)}
    if args.engines:
        kw["engines"] = tuple(args.engines.split(","))
    if args.sizes:
        kw["sizes"] = tuple(_size(s) for s in args.sizes.split(","))
    if args.ops:
        kw["ops"] = tuple(args.ops.split(","))
        unknown = set(kw["ops"]) - set(OPS)
        if unknown:
            print(f"llmtier bench io: unknown op(s) {','.join(sorted(unknown))}; choose from {','.join(OPS)}",
                  file=sys.stderr)
            return 2
    if args.rounds:
        kw["rounds"] = args.rounds
    cfg = StudyConfig.quick(directory, **kw) if args.quick else StudyConfig(directory, **kw)
    print(f"llmtier bench io: {'quick' if args.quick else 'full'} study in {directory}, "
          f"{cfg.rounds} rounds + warm-up, engines {','.join(cfg.engines)}", file=sys.stderr)
    cells, notes = run_io_study(cfg, progress=not args.no_progress)
    print(io_report.format_table(cells, notes))
    print("\nverdicts (tensors >= 1 MiB):")
    for line in io_report.verdicts(cells):
        print("  " + line)
    if args.json:
        io_report.write_json(cells, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        io_report.plot(cells, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _bench_io_device(args: argparse.Namespace, directory: str) -> int:
    """``bench io --device cuda``: SSD <-> GPU memory per path (the study's GPU half)."""
    import json  # noqa: PLC0415

    from .bench.io_cuda import QUICK_SIZES, SIZES, format_table, run_device_study  # noqa: PLC0415
    from .engine.cuda import require_cuda  # noqa: PLC0415

    require_cuda(f"bench io --device {args.device}")
    sizes = tuple(_size(s) for s in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    ops = tuple(o for o in (args.ops or "read,write").split(",") if o in ("read", "write")) or ("read", "write")
    rounds = args.rounds or (3 if args.quick else 5)
    volume = (256 << 20) if args.quick else (1 << 30)
    print(f"llmtier bench io --device {args.device}: {rounds} rounds + warm-up in {directory}", file=sys.stderr)
    cells, notes = run_device_study(directory, device=args.device, sizes=sizes, ops=ops, rounds=rounds,
                                    volume=volume, progress=not args.no_progress)
    print(format_table(cells, notes))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cells": [c.record() for c in cells], "notes": notes}, fh, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_engines(_: argparse.Namespace) -> int:
    from .engine import available_engines, open_engine  # noqa: PLC0415

    for name, why_not in available_engines().items():
        print(f"{name:8s} {'ok' if not why_not else 'unavailable: ' + why_not}")
    with open_engine("auto") as eng:
        print(f"auto  -> {eng.name}: {eng.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmtier", description=__doc__)
    p.add_argument("--version", action="version", version=f"llmtier {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    sub.add_parser("engines", help="list engine backends and which one 'auto' picks").set_defaults(func=cmd_engines)

    bench = sub.add_parser("bench", help="measurements").add_subparsers(dest="study", required=True)
    io = bench.add_parser("io", help="tensor-transfer bandwidth per engine vs fio (CHEOPS '25 Q1)")
    io.add_argument("--quick", action="store_true", help="3 sizes, 3 rounds, 128 MiB per cell (under a minute)")
    io.add_argument("--dir", help="directory on the file system to measure (default: the temp dir)")
    io.add_argument("--engines", help="comma list of posix,threads,uring,deepnvme")
    io.add_argument("--sizes", help="comma list of tensor sizes, e.g. 4k,1m,1g")
    io.add_argument("--ops", help="comma list of read,write,write-fresh,randread (4 KiB random reads, "
                    "queue depth 1 and 32); default all")
    io.add_argument("--rounds", type=int, help="measured rounds per cell (median reported)")
    io.add_argument("--chunk-size", type=_size, help="engine piece size (default from settings)")
    io.add_argument("--queue-depth", type=int, help="engine queue depth")
    io.add_argument("--threads", type=int, help="threads of the threads engine")
    io.add_argument("--json", metavar="PATH", help="write one JSON record per cell")
    io.add_argument("--plot", metavar="PATH", help="write a PNG of bandwidth vs tensor size")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    io.add_argument("--device", default="cpu", help="'cuda' (or 'cuda:N'): the GPU half -- tensors between the SSD "
                    "and GPU memory per path (llmtier pinned pipeline, host, naive .cuda(), kvikio, DeepNVMe, fio)")
    io.add_argument("--save-profile", nargs="?", const="", metavar="PATH", help="measure the device profile the planner "
                    "uses (disk at the runtimes' request sizes, DRAM, CPU rates) and save it (default path: llmtier plan's)")
    io.set_defaults(func=cmd_bench_io)

    from .cli_store import add_store_verbs  # noqa: PLC0415

    add_store_verbs(sub, bench)
    from .bench.checkpoint import add_cli as add_bench_checkpoint  # noqa: PLC0415
    from .bench.demo import add_cli as add_demo  # noqa: PLC0415
    from .bench.kv import add_cli as add_bench_kv  # noqa: PLC0415
    from .bench.weights import add_cli as add_bench_weights  # noqa: PLC0415
    from .cli_run import add_cli as add_run  # noqa: PLC0415

    add_run(sub)
    from .cli_plan import add_cli as add_plan  # noqa: PLC0415
    add_plan(sub, bench)
    from .bench.train import add_cli as add_train  # noqa: PLC0415
    add_train(sub)
    add_demo(sub)
    add_bench_weights(bench)
    add_bench_kv(bench)
    add_bench_checkpoint(bench)
    from .bench.trainbench import add_cli as add_bench_train  # noqa: PLC0415
    add_bench_train(bench)
    from .bench.moe import add_cli as add_bench_moe  # noqa: PLC0415
    add_bench_moe(bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmtier ... | head`: the reader left; nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"llmtier: error: this needs {exc.name}, which is not installed: pip install 'llmtier[{extra}]'",
              file=sys.stderr)
        return 1
    except (LLMTierError, OSError, ValueError) as exc:
        print(f"llmtier: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
