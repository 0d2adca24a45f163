"""Kill trials: a process saving checkpoints is SIGKILLed at random moments; every resume must find a
complete checkpoint, bitwise equal to what was saved, and never one older than the last save that returned.

``python -m llmtier.bench.checkpoint_kill DIR MODE`` is the child: it resumes
from the newest complete checkpoint in DIR (checking it), then saves steps
after it in a loop (``sync`` or ``async``), printing ``committed N`` after each
save returns.  :func:`run_kill_trials` is the parent.  The state is numpy only
(the child starts in well under a second) and a deterministic function of the
step, so any loaded checkpoint can be checked against what was saved.
"""
from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint import Checkpointer, CheckpointWarning


def make_state(step: int, size: int = 1 << 20) -> dict[str, Any]:
    """The state saved at ``step``: a few arrays (``size`` bytes in all) and plain data."""
    rng = np.random.default_rng(step)
    n = size // 4
    return {"model": {"w": rng.standard_normal(n // 2, dtype=np.float32),
                      "b": rng.integers(0, 2**16, n // 4, dtype=np.uint16)},
            "optim": {"m": rng.standard_normal(n // 4, dtype=np.float32), "lr": 1e-3 * step},
            "step": step, "data": {"epoch": step // 10, "offset": step * 4096}}


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of two states."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@dataclass
class KillResult:
    """Outcome of :func:`run_kill_trials`."""

    trials: int = 0
    corrupt: int = 0  # a resume found a checkpoint that differs from what was saved
    lost: int = 0  # a resume found nothing, or a step older than the last save that returned
    steps: list[int] = field(default_factory=list)  # the step each resume found
    killed_mid_save: int = 0  # kills that left an incomplete step directory behind
    problems: list[str] = field(default_factory=list)


def run_kill_trials(directory: str, trials: int, *, seed: int = 0, size: int = 1 << 20, max_delay: float = 0.4,
                    modes: tuple[str, ...] = ("sync", "async")) -> KillResult:
    """Run ``trials`` kill trials in ``directory`` (created; left for inspection)."""
    os.makedirs(directory, exist_ok=True)
    rnd = random.Random(seed)
    with Checkpointer(directory, keep_last=2) as ck:
        ck.save(make_state(0, size), step=0)
    res = KillResult()
    committed = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for t in range(trials):
        mode = modes[t % len(modes)]
        p = subprocess.Popen([sys.executable, "-m", __name__, directory, mode, str(size)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        try:
            committed = max(committed, _read_until_kill(p, rnd.uniform(0.0, max_delay)))
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
        if p.returncode not in (-signal.SIGKILL, 0):
            res.problems.append(f"trial {t}: child exited {p.returncode}: {p.stderr.read()[-500:] if p.stderr else ''}")
        if p.stderr:
            p.stderr.close()
        res.trials += 1
        res.killed_mid_save += int(any(not os.path.exists(os.path.join(directory, e, "manifest.json"))
                                       for e in os.listdir(directory) if e.startswith("step-")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                with Checkpointer(directory) as rd:
                    got = rd.load()
                    step = rd.loaded.step if rd.loaded else -1
            except Exception as exc:  # noqa: BLE001 - counted, never hidden
                res.lost += 1
                res.problems.append(f"trial {t}: no checkpoint could be loaded: {exc}")
                continue
        res.steps.append(step)
        if not same(got, make_state(step, size)):
            res.corrupt += 1
            res.problems.append(f"trial {t}: step {step} differs from what was saved")
        if step < committed:
            res.lost += 1
            res.problems.append(f"trial {t}: resumed at step {step}, but step {committed} had been committed")
    return res


def _read_until_kill(p: subprocess.Popen[str], delay: float) -> int:
    """Wait for the child to start saving, then ``delay`` seconds more, then SIGKILL it.  Returns the last
    step it reported committed."""
    last = 0
    deadline = None
    if p.stdout is None:
        raise ValueError("the child needs stdout=PIPE")
    fd = p.stdout.fileno()
    buf = b""
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        r, _, _ = select.select([fd], [], [], 0.01 if deadline is None else max(0.0, deadline - now))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"committed "):
                    last = int(line.split()[1])
                elif line == b"saving" and deadline is None:
                    deadline = time.monotonic() + delay
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rest = os.read(fd, 1 << 20) if p.stdout else b""  # lines written just before the kill count too
    for line in (buf + rest).split(b"\n"):
        if line.startswith(b"committed "):
            last = int(line.split()[1])
    p.stdout.close()
    return last


def _child(directory: str, mode: str, size: int) -> None:
    with Checkpointer(directory, keep_last=2) as ck:
        state = ck.load()
        step = ck.loaded.step if ck.loaded else 0
        if not same(state, make_state(step, size)):
            print(f"resumed state of step {step} differs", file=sys.stderr, flush=True)
            sys.exit(3)
        print("saving", flush=True)
        for s in range(step + 1, step + 10_000):
            if mode == "async":
                done = ck.wait()  # the previous background save
                if done is not None:
                    print(f"committed {done.step}", flush=True)
                ck.save_async(make_state(s, size), step=s)
            else:
                ck.save(make_state(s, size), step=s)
                print(f"committed {s}", flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
