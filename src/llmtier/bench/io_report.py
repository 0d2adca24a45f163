"""Present the bandwidth study: a text table, JSON records, a PNG plot, verdicts."""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

from .io import Cell

LLMTIER = ("posix", "threads", "uring", "uring-pages")
URING_ROWS = ("uring", "uring-pages")  # the per-request and the pages-API rows of the uring engine


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def best_deepnvme(cells: Iterable[Cell]) -> dict[tuple[str, int], Cell]:
    """DeepNVMe's best tuning for each (op, size)."""
    best: dict[tuple[str, int], Cell] = {}
    for c in cells:
        if c.engine == "deepnvme" and ((c.op, c.size_bytes) not in best or c.gib_per_s > best[(c.op, c.size_bytes)].gib_per_s):
            best[(c.op, c.size_bytes)] = c
    return best


def format_table(cells: list[Cell], notes: list[str]) -> str:
    """One block per op: rows are sizes, columns engines (median GiB/s [min-max])."""
    by_op: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_op[c.op].append(c)
    dn = best_deepnvme(cells)
    out = []
    for op, group in by_op.items():
        random = op.startswith("randread")
        engines = [e for e in dict.fromkeys(c.engine for c in group) if e != "deepnvme"]
        header = ["size"] + engines + (["deepnvme*"] if any(k[0] == op for k in dn) else []) + ["fio", "best/fio"]
        rows = []
        for size in sorted({c.size_bytes for c in group}):
            row_cells = {c.engine: c for c in group if c.size_bytes == size and c.engine != "deepnvme"}
            if (op, size) in dn:
                row_cells["deepnvme*"] = dn[(op, size)]
            row = [human_size(size)]
            for e in header[1:-2]:
                c = row_cells.get(e)
                row.append(_fmt(c, random) if c else "-")
            ref = next(iter(row_cells.values()))
            fio = ref.fio_iops if random else ref.fio_gib_per_s
            best = max((c.iops if random else c.gib_per_s) for e, c in row_cells.items() if e in LLMTIER)
            row.append("-" if fio is None else (f"{fio / 1e3:.1f}K" if random else f"{fio:.2f}"))
            row.append("-" if not fio else f"{best / fio:.2f}x")
            rows.append(row)
        unit = "kIOPS (CPU us/IO)" if random else "GiB/s median [min-max]"
        out.append(f"\n{op} — {unit}")
        out.append(_grid(header, rows))
    if dn:
        out.append("deepnvme*: DeepNVMe aio_handle at its best tuning for that size: "
                   + ", ".join(sorted({f'{human_size(c.block_size)}/qd{c.queue_depth}' for c in dn.values()})))
    out.extend(f"note: {n}" for n in notes)
    return "\n".join(out)


def _fmt(c: Cell, random: bool) -> str:
    if random:
        return f"{c.iops / 1e3:.1f}K ({c.cpu_us_per_io:.1f})"
    return f"{c.gib_per_s:.2f} [{c.gib_per_s_min:.2f}-{c.gib_per_s_max:.2f}]"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def verdicts(cells: list[Cell], min_size: int = 1 << 20) -> list[str]:
    """The issue's acceptance ratios, computed from the cells (text lines)."""
    out = []
    dn = best_deepnvme(cells)
    seq = [c for c in cells if not c.op.startswith("randread") and c.size_bytes >= min_size]
    for op, size in sorted({(c.op, c.size_bytes) for c in seq}):
        ours = [c for c in seq if c.op == op and c.size_bytes == size and c.engine in LLMTIER]
        if not ours:
            continue
        best = max(ours, key=lambda c: c.gib_per_s)
        parts = [f"{op:11s} {human_size(size):>7s}: best={best.engine} {best.gib_per_s:.2f} GiB/s"]
        if best.fio_gib_per_s:
            parts.append(f"{best.gib_per_s / best.fio_gib_per_s:.2f}x fio")
        if (op, size) in dn and dn[(op, size)].gib_per_s:
            parts.append(f"{best.gib_per_s / dn[(op, size)].gib_per_s:.2f}x deepnvme-best")
        out.append(", ".join(parts))
    out.extend(random_verdict(cells))
    return out


def random_verdict(cells: list[Cell]) -> list[str]:
    """4 KiB random reads at depth 32: the better uring row (per-request or
    pages API) against fio, naming which, with the other row beside it."""
    rows = [c for c in cells if c.op == "randread-qd32" and c.engine in URING_ROWS and c.fio_iops]
    if not rows:
        return []
    best = max(rows, key=lambda c: c.iops)
    line = (f"randread 4 KiB qd32: best uring row = {best.engine} {best.iops / 1e3:.1f}K IOPS = "
            f"{best.iops / best.fio_iops:.2f}x fio ({best.fio_iops / 1e3:.1f}K), CPU/IO {best.cpu_us_per_io:.1f} us")
    for c in rows:
        if c is not best:
            line += f"; {c.engine} {c.iops / 1e3:.1f}K = {c.iops / c.fio_iops:.2f}x fio ({c.cpu_us_per_io:.1f} us)"
    thr = next((t for t in cells if t.op == "randread-qd32" and t.engine == "threads"), None)
    if thr:
        line += f"; threads {thr.cpu_us_per_io:.1f} us CPU/IO"
    return [line]


def write_json(cells: list[Cell], path: str) -> None:
    with open(path, "w") as fh:
        json.dump([c.record() for c in cells], fh, indent=1)


def plot(cells: list[Cell], path: str) -> None:
    """Bandwidth vs tensor size, one line per engine, fio dashed as the ceiling."""
    import matplotlib  # noqa: PLC0415 - optional ([bench] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ops = [op for op in dict.fromkeys(c.op for c in cells) if not op.startswith("randread")]
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    dn = best_deepnvme(cells)
    for ax, op in zip(axes[0], ops):
        group = [c for c in cells if c.op == op]
        series: dict[str, list[Cell]] = defaultdict(list)
        for c in group:
            if c.engine != "deepnvme":
                series[c.engine].append(c)
        series["deepnvme (best)"] = [c for (o, _), c in dn.items() if o == op]
        for name, cs in series.items():
            cs = sorted(cs, key=lambda c: c.size_bytes)
            if cs:
                ax.plot([c.size_bytes for c in cs], [c.gib_per_s for c in cs], marker="o", label=name)
        ref = sorted({c.size_bytes: c for c in group if c.fio_gib_per_s}.values(), key=lambda c: c.size_bytes)
        if ref:
            ax.plot([c.size_bytes for c in ref], [c.fio_gib_per_s for c in ref], "k--", label="fio (ceiling)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor size (bytes)")
        ax.set_ylabel("GiB/s")
        ax.set_title(op)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
