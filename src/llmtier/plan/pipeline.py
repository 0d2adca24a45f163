"""A streamed decode pass as the streamer runs it: the time of one step.

``max(compute, reads)`` is a step when the one entirely hides the other.  The streamer's pipeline cannot quite get
there; this model follows it event by event:

* a layer's read starts only when a slot is free, i.e. after the layer that held the slot has computed, so at most
  ``slots - 1`` reads are ahead of the layer computing;
* a plan that does not hold the input embedding reads the rows of each step's tokens at the start of the pass,
  after the next layers' reads were queued: the disk serves them in order, so the tiny read (and the pass) waits for
  what is ahead of it.  On the development VM a 4 KiB read issued behind two streamed layers' reads took 1.4 ms
  (median, up to 7 ms), and a four-layer model streamed through three slots ran 9.7 ms per step where
  ``max(compute, reads)`` said 8.3 (docs/BENCHMARKS.md, "Where a streamed step's time goes");
* compute runs ``slowdown`` times longer while the disk is busy (the profile's ``read_slowdown``: on the
  development VM the layers computed 1.15-1.6x slower with reads beside them).

The disk is one queue at a fixed rate (the profile's, for the reads' request size); compute is the layers' own
seconds in order, then what a step does beyond them (the head, generate's bookkeeping).  Several passes are
simulated and the steady state's mean step returned.
"""
from __future__ import annotations

from collections.abc import Sequence

PASSES = 12  # simulated decode steps: the first few fill the pipeline and are left out
WARM = 4


def stream_step(layer_s: Sequence[float], read_s: Sequence[float | None], slots: int, *, after_s: float = 0.0,
                rows_first: bool = False, slowdown: float = 1.0) -> float:
    """Seconds per decode step of layers computing ``layer_s[i]`` each, those with a ``read_s[i]`` (not None) read from
    the disk for every pass through ``slots`` buffers, ``after_s`` of compute after the last layer; ``rows_first``: each
    pass starts with a small read queued behind the reads already issued (the embedding's rows); ``slowdown``: compute
    runs this many times longer while the disk is busy (the profile's ``read_slowdown``)."""
    if len(layer_s) != len(read_s):
        raise ValueError(f"{len(layer_s)} layers' compute against {len(read_s)} layers' reads")
    cycle = [i for i, r in enumerate(read_s) if r is not None]
    if not cycle:
        return float(sum(layer_s)) + after_s
    order = [(p, i) for p in range(PASSES + 1 + slots) for i in cycle]
    ready: dict[tuple[int, int], float] = {}
    disk = 0.0  # when the disk has served everything queued so far
    queued = 0

    def issue(at: float) -> None:
        nonlocal disk, queued
        key = order[queued]
        queued += 1
        disk = max(at, disk) + float(read_s[key[1]])  # type: ignore[arg-type]
        ready[key] = disk

    def compute(t: float, work: float) -> float:  # ``work`` seconds of compute from ``t``, slower while reads run
        if slowdown > 1.0 and disk > t:
            span = min(work * slowdown, disk - t)
            t, work = t + span, work - span / slowdown
        return t + work

    for _ in range(max(1, slots)):
        issue(0.0)
    t, starts = 0.0, []
    for p in range(PASSES):
        starts.append(t)
        if rows_first:
            t = max(t, disk)
        for i, c in enumerate(layer_s):
            if read_s[i] is not None:
                t = max(t, ready[(p, i)])
            t = compute(t, c)
            if read_s[i] is not None:  # its slot is free again: the next read in the cycle starts
                issue(t)
        t = compute(t, after_s)
    starts.append(t)
    return (starts[-1] - starts[WARM]) / (len(starts) - 1 - WARM)


__all__ = ["stream_step"]
