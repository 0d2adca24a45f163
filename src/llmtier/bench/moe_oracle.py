"""The prediction ceiling of a ``llmtier bench moe`` cell: guesses that are always right.

``llmtier bench moe`` asks how close expert streaming comes to the I/O bound.
Where a token's compute and its reads take about as long as each other, the
answer depends on how early the reads of missing experts can start, that is
on how well the experts can be guessed ahead of their router.  The
``experts-lru-oracle<d>`` systems measure the best any guess could do on the
machine and disk of the run: the in-memory system records which experts each
MoE layer routes to, call by call (:func:`record_routing`; the prompts are
the same for every system and the model is exact, so a streamed run routes
alike), and the oracle streamer reads, at each MoE layer, the experts the next
``d`` MoE layer calls will route to (:class:`Oracle`).  Nothing else changes:
the streamer's own hook still reads on demand whatever its router chose and
was not read ahead, so outputs stay exact.

A benchmark instrument, not a user feature: no model has a recording of its
future.  It reaches into the streamer's reading and admission steps, which is
why it lives next to the benchmark that uses it.
"""
from __future__ import annotations

import json
import os
from typing import Any

#: one forward call of one MoE layer: (index of the MoE layer, experts routed to, ascending)
Call = tuple[int, list[int]]


def record_routing(model: Any) -> tuple[list[Call], Any]:
    """Record the experts every MoE layer of the in-memory ``model`` routes to; (the calls so far, a remover).

    Clear the list between generations to record one generation's calls."""
    import torch  # noqa: PLC0415

    from .moe_models import moe_blocks  # noqa: PLC0415

    calls: list[Call] = []

    def hook(i: int) -> Any:
        def before(_mod: Any, args: tuple, kwargs: dict) -> None:
            top = args[1] if len(args) > 1 else kwargs["top_k_index"]
            calls.append((i, torch.unique(top).tolist()))
        return before

    handles = [block.experts.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(moe_blocks(model))]

    def remove() -> None:
        for h in handles:
            h.remove()
    return calls, remove


def save_routing(path: str, rounds: list[list[Call]]) -> None:
    """Write the recorded calls of each generation (round 0 first) to ``path`` (JSON), atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rounds, fh)
    os.replace(tmp, path)


def load_routing(path: str) -> list[list[Call]]:
    with open(path) as fh:
        return [[(int(i), [int(e) for e in es]) for i, es in calls] for calls in json.load(fh)]


class Oracle:
    """Read ahead, at each MoE layer call, the experts of the next ``depth`` calls as recorded.

    :meth:`start` gives the calls of the generation about to run; a call that
    does not match the recording (another layer than recorded) stops the
    oracle for that generation and is counted in ``mismatches``."""

    def __init__(self, streamer: Any, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.s = streamer
        self.depth = depth
        self.calls: list[Call] | None = None
        self.n = 0
        self.mismatches = 0
        self.read_ahead = 0
        self.no_room = 0
        inner = streamer._experts_before

        def before(i: int, module: Any, args: tuple, kwargs: dict) -> None:
            inner(i, module, args, kwargs)  # demand reads first, as the streamer's own guesses come after them
            self._ahead(i)

        streamer._experts_before = before  # the hook looks the method up on every call

    def start(self, calls: list[Call]) -> None:
        self.calls, self.n = calls, 0

    def _ahead(self, i: int) -> None:
        calls, n = self.calls, self.n
        if calls is None:
            return
        self.n += 1
        if n >= len(calls) or calls[n][0] != i:
            self.mismatches += 1
            self.calls = None
            return
        s = self.s
        window = [(s.moe[j].layer, e, j) for j, es in calls[n:n + 1 + self.depth] for e in es]
        hold = {(layer, e) for layer, e, _ in window}
        for layer, e, j in window[len(calls[n][1]):]:  # the calls after this one, in their order
            key = (layer, e)
            if key in s.cache or key in s._ereads:
                continue
            if not s._admit(key, s.moe[j].expert_bytes, hold, demand=False):
                self.no_room += 1
                return
            s._read(j, key, prefetched=True)
            self.read_ahead += 1


__all__ = ["Oracle", "load_routing", "record_routing", "save_routing"]
