"""Expert-granular streaming of MoE models: hot experts in DRAM, cold ones
read on demand, the next layer's experts predicted and prefetched.

The dense part of every layer (attention, router, shared experts, norms)
streams or stays resident as in :mod:`llmtier.offload.weights`; the routed
experts do not stream with their layer.  The resident experts lie in a pool of
expert-sized slots shared by the MoE layers, or at their own rows of sparse
full-size buffers where slots would not be exact (:mod:`llmtier.offload.expert_place`).
A forward pre-hook on the experts module sees the router's choice
(``top_k_index``) before any expert computes; the missing experts are read,
each extent of each expert straight to its place, and the experts compute
only after they arrived.  The experts that run have their true weights and
transformers' own expert forward computes them, so the output is the
in-memory model's, bit for bit.

Prediction: the next MoE layer's router applied to this layer's expert
input guesses the next layer's experts; their reads start before this
layer's experts compute.  A wrong guess costs bytes, never correctness: the
next layer's hook reads what its own router chose.  ``predict="auto"`` (the
default of :func:`~llmtier.offload.stream_model`) keeps guessing but reads a
guess only where guesses like it were right often enough: each guess has a
confidence, the margin of its router score over the best expert not chosen,
and the recent guesses of its confidence band (:data:`CONFIDENCE_BANDS`) must
have been at least :data:`AUTO_PRECISION` right (until a band has
:data:`AUTO_MIN_JUDGED` judged guesses, the last :data:`AUTO_WINDOW` layer
passes' guesses as a whole decide).  On a model whose next-layer guess is
poor, every wrong guess would be a whole expert read for nothing; its
confident guesses are still worth reading.  While no band is read, only one
layer pass in :data:`AUTO_SAMPLE` guesses (to keep judging): the router
product and its bookkeeping are then not paid on every layer.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import ChecksumError
from ..store.format import crc32c
from ..units import resolve_size
from .expert_place import ExpertRows, ExpertSlots, slots_apply
from .experts import (
    ExpertCache,
    ExpertError,
    ExpertPlan,
    ExpertProfile,
    Key,
    MoELayer,
    find_experts,
    layer_quotas,
    make_policy,
    split_budget_for_experts,
)
from .layout import Layout
from .stats import WeightStats
from .weights import WeightStreamer

#: ``predict="auto"``: guesses are read while this share of the recent guesses was right ...
AUTO_PRECISION = 0.9
#: ... over the guesses of this many MoE layer passes (read from the start, until that many were judged)
AUTO_WINDOW = 32
#: Confidence bands of a guess: lower edges of its router-score margin over the best expert not guessed (for
#: softmax routers a margin of 0.5 means the guessed expert is 1.65x as likely as that one)
CONFIDENCE_BANDS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
#: A band decides alone once this many of its guesses were judged (the last AUTO_BAND_WINDOW count)
AUTO_MIN_JUDGED = 16
AUTO_BAND_WINDOW = 64
#: ``predict="auto"`` while no band's guesses are read: one MoE layer pass in this many still guesses, so that
#: the guesses keep being judged (guessing costs a router product and its bookkeeping per layer)
AUTO_SAMPLE = 8


@dataclass(frozen=True)
class MoEStats(WeightStats):
    """:class:`WeightStats` of the dense part plus the expert cache's counters."""

    policy: str = ""
    predict: bool | str = False  # True, False or "auto"
    expert_cache_bytes: int = 0
    expert_cache_used: int = 0
    expert_hits: int = 0  # routed experts found resident
    expert_misses: int = 0  # routed experts read on demand (the compute waited)
    prefetch_hits: int = 0  # routed experts read ahead by the prediction
    expert_hit_rate: float = 0.0  # hits / routed experts
    expert_bytes_read: int = 0  # demand reads and prefetches, as the disk moves them (widened to 4 KiB)
    expert_payload_read: int = 0  # the experts' own bytes in those reads
    expert_reads: int = 0  # experts read
    expert_stall_s: float = 0.0
    expert_layout: str = ""  # "slots" (a shared pool of expert-sized slots) or "rows" (expert_place)
    expert_overlap: bool = False  # resident experts computed while the missing ones of their layer are read
    expert_bytes_released: int = 0  # whole pages of evicted experts given back to the system
    expert_bytes_recycled: int = 0  # memory of evicted experts reused by the expert read in their place
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0  # prefetched for a layer that did not route to them
    prefetch_paused: int = 0  # guesses not read: ``predict="auto"`` found recent guesses of their confidence too often wrong
    unguessed_passes: int = 0  # MoE layer passes that did not guess: ``predict="auto"`` read no band (AUTO_SAMPLE)
    predicted: int = 0  # experts guessed
    predicted_right: int = 0  # guessed and routed to
    routed_with_prediction: int = 0  # routed experts of the layers that had a guess
    prediction_recall: float = 0.0
    prediction_precision: float = 0.0
    tokens: int = 0  # token positions through the first MoE layer
    active_missing_bytes: int = 0  # routed experts not resident when routed to (demand + prefetched)
    analytic_bytes: int = 0  # active_missing_bytes + dense streamed bytes + embedding rows
    total_bytes_read: int = 0  # everything read after the start
    bytes_per_token: float = 0.0


class MoEStreamer(WeightStreamer):
    """A :class:`WeightStreamer` of the dense part and the expert cache of the routed experts."""

    def __init__(self, layout: Layout, eplan: ExpertPlan, moe: list[MoELayer], dense_groups: list, *, policy: str,
                 predict: bool | str, profile: ExpertProfile | None, verify: str, tag: str = "weights",
                 slots: bool | None = None) -> None:
        if predict not in (True, False, "auto"):
            raise ExpertError(f"predict must be True, False or 'auto', not {predict!r}")
        if slots is None:
            slots = slots_apply(moe) is None
        self.moe = moe
        self.expert_plan = eplan
        self.predict = predict
        self._judged: deque[tuple[int, int]] = deque(maxlen=AUTO_WINDOW)  # (guessed, right) of recent layer passes
        self._bands = [deque(maxlen=AUTO_BAND_WINDOW) for _ in CONFIDENCE_BANDS]  # right (1) or not, per band
        self._paused = 0
        self._sample = 0  # layer passes since the last guess while no band reads (``predict="auto"``)
        self._unguessed = 0  # layer passes that did not guess for that reason
        self.place: ExpertRows | ExpertSlots | None = None
        self._ereads: dict[Key, list] = {}  # expert reads in flight
        self._routers: dict[int, tuple[Any, Any]] = {}
        self._guess: dict[int, tuple[dict[int, int], set[int]]] = {}  # layer -> ({guessed: band}, prefetched)
        self._counts = {m.layer: [0] * m.num_experts for m in moe}
        self._everified: set[Key] = set()
        self._c = dict.fromkeys(("hits", "misses", "prefetch_hits", "bytes", "reads", "prefetch_bytes", "wasted",
                                 "predicted", "right", "routed_pred", "tokens", "missing_bytes", "payload"), 0)
        self._read_bytes = [m.read_bytes for m in moe]
        self._stall = 0.0
        sizes = {m.layer: m.expert_bytes for m in moe}
        pol = make_policy(policy, profile, eplan.cache_bytes, sizes)
        self.cache = ExpertCache(eplan.cache_bytes, pol, layer_quotas(eplan.cache_bytes, moe))
        super().__init__(layout.source, layout.model, dense_groups, layout.outside, eplan.dense,
                         layers_prefix=layout.layers_prefix, verify=verify, tag=tag, embedding=layout.embedding)
        try:
            self._bind_experts(slots)
            if predict:
                self._load_routers()
        except BaseException:
            self.close()
            raise

    # -- set-up --------------------------------------------------------------------------------------------------------
    def _bind_experts(self, slots: bool) -> None:
        self.place = (ExpertSlots(self._torch, self.moe, self.cache.capacity) if slots
                      else ExpertRows(self._torch, self.moe))
        self.place.bind(self._placeholders)
        if isinstance(self.place, ExpertSlots):
            self.place.wait, self.place.pending, self.place.wait_all = self._wait_expert, self._pending, self._wait_layer
        for i, m in enumerate(self.moe):
            self._hooks.append(m.module.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: self._experts_before(i, mod, args, kwargs), with_kwargs=True))

    def _load_routers(self) -> None:
        for i, m in enumerate(self.moe):
            if m.router is None:
                continue
            w, bias = m.router
            # get_torch: the tensors' real dtype (bf16 is stored as 16-bit words; a numpy view would be integers)
            weight = self.source.get_torch(w, verify=self.verify != "never").float()
            b = self.source.get_torch(bias, verify=self.verify != "never").float() if bias else None
            self._routers[i] = (weight, b)

    # -- the hook ------------------------------------------------------------------------------------------------------
    def _experts_before(self, i: int, module: Any, args: tuple, kwargs: dict) -> None:
        self._check_grad(module, args)
        torch = self._torch
        m = self.moe[i]
        hidden = args[0] if args else kwargs["hidden_states"]
        top = args[1] if len(args) > 1 else kwargs["top_k_index"]
        need = [e for e in torch.unique(top).tolist() if 0 <= e < m.num_experts]
        if i == 0:
            self._c["tokens"] += int(top.shape[0]) if top.dim() > 1 else 1
        keys = [(m.layer, e) for e in need]
        guess = self._guess.pop(m.layer, None)
        if guess is not None:
            bands, fetched = guess
            guessed = set(bands)
            self._c["predicted"] += len(guessed)
            self._c["right"] += len(guessed & set(need))
            self._judged.append((len(guessed), len(guessed & set(need))))
            for e, b in bands.items():
                self._bands[b].append(int(e in need))
            self._c["routed_pred"] += len(need)
            self._c["wasted"] += m.expert_bytes * len(fetched - set(need))
        keep = set(keys)
        missing = []
        for k in keys:
            if k in self._ereads:
                self._c["prefetch_hits"] += 1
            elif k in self.cache:
                self._c["hits"] += 1
            else:
                self._c["misses"] += 1
                missing.append(k)
        self._c["missing_bytes"] += m.expert_bytes * (len(missing) + sum(1 for k in keys if k in self._ereads))
        for k in missing:
            self._admit(k, m.expert_bytes, keep, demand=True)
            self._read(i, k, prefetched=False)
        if self.predict and i + 1 < len(self.moe) and self._guessing():
            self._prefetch(i + 1, hidden, keep)
        if not (isinstance(self.place, ExpertSlots) and self.place.overlap is not False):
            self._wait_layer(i)  # else the experts' forward waits for each expert when its turn comes
        counts = self._counts[m.layer]
        for k in keys:
            self.cache.policy.touch(k)
            counts[k[1]] += 1

    def _wait_expert(self, layer: int, e: int) -> None:
        """Wait for the read of expert ``e`` of ``layer`` if one is in flight."""
        if (layer, e) in self._ereads:
            t0 = time.perf_counter()
            self._finish((layer, e))
            self._stall += time.perf_counter() - t0

    def _wait_layer(self, i: int) -> None:
        """Wait for every read in flight for MoE layer ``i``: its routed experts and the guesses it did not route
        to (those land as plain residents)."""
        layer = self.moe[i].layer
        for k in [k for k in self._ereads if k[0] == layer]:
            self._wait_expert(*k)

    def _pending(self, layer: int, e: int) -> int:
        """0 for an expert not being read; else its place in the order the reads were submitted, from 1."""
        for n, k in enumerate(self._ereads, 1):
            if k == (layer, e):
                return n
        return 0

    def _admit(self, key: Key, nbytes: int, keep: set[Key], *, demand: bool) -> bool:
        """Make room for ``key`` (evicting others by the policy) and reserve it; False when a prefetch finds no room."""
        busy = keep | set(self._ereads)
        victims = self.cache.victims(nbytes, busy, key[0])
        if victims is None and demand:  # prefetches in flight hold the room: let them land, then choose again
            for k in list(self._ereads):
                if k not in keep:
                    self._finish(k)
            victims = self.cache.victims(nbytes, keep | set(self._ereads), key[0])
        if victims is None:
            if demand:
                raise ExpertError(f"the expert cache ({self.cache.capacity} bytes) cannot hold the experts one layer "
                                  "routes to at once")
            return False
        for n, v in enumerate(victims):
            self._evict(v, into=key if n == 0 else None)
        self.cache.add(key, nbytes)
        self.place.place(key)
        return True

    def _prefetch(self, j: int, hidden: Any, keep: set[Key]) -> None:
        r = self._routers.get(j)
        if r is None:
            return
        nxt = self.moe[j]
        weight, bias = r
        h = hidden.reshape(-1, weight.shape[1]).float()
        scores = h @ weight.T
        if bias is not None:
            scores = scores.sigmoid() + bias
        k = min(nxt.top_k, nxt.num_experts)
        top = scores.topk(min(k + 1, nxt.num_experts), dim=-1)
        # confidence of a guess: its score's margin over the best expert not guessed (largest over the batch);
        # a router that routes to all its experts leaves none unguessed: the highest band
        if k < nxt.num_experts:
            margin = top.values[:, :k] - top.values[:, k:]
        else:
            margin = self._torch.full_like(top.values, float("inf"))
        bands: dict[int, int] = {}
        for e, mg in zip(top.indices[:, :k].reshape(-1).tolist(), margin.reshape(-1).tolist()):
            b = bisect_right(CONFIDENCE_BANDS, mg, lo=1) - 1 if mg == mg else 0  # the edges above 0 it reaches
            bands[e] = max(b, bands.get(e, 0))
        fetched: set[int] = set()
        self._guess[nxt.layer] = (bands, fetched)
        hold = keep | {(nxt.layer, e) for e in bands}
        for e in sorted(bands, key=lambda e: (-bands[e], e)):  # the most confident first
            key = (nxt.layer, e)
            if key in self.cache or key in self._ereads:
                continue
            if not self._reading(bands[e]):
                self._paused += 1
                continue
            if not self._admit(key, nxt.expert_bytes, hold, demand=False):
                break
            self._read(j, key, prefetched=True)
            fetched.add(e)

    def _guessing(self) -> bool:
        """Whether this layer pass guesses the next layer's experts: always with ``predict=True``; with ``"auto"``
        while some band's guesses are read, else one pass in :data:`AUTO_SAMPLE`."""
        if self.predict is True or any(self._reading(b) for b in range(len(CONFIDENCE_BANDS))):
            self._sample = 0
            return True
        self._sample += 1
        if self._sample >= AUTO_SAMPLE:
            self._sample = 0
            return True
        self._unguessed += 1
        return False

    def _reading(self, band: int) -> bool:
        """Whether a guess of confidence ``band`` is read: always with ``predict=True``; with ``"auto"`` while
        the recent guesses of that band were right often enough (see the module doc)."""
        if self.predict is True:
            return True
        judged = self._bands[band]
        if len(judged) >= AUTO_MIN_JUDGED:
            return sum(judged) >= AUTO_PRECISION * len(judged)
        if len(self._judged) < AUTO_WINDOW:
            return True
        guessed = sum(g for g, _ in self._judged)
        return guessed == 0 or sum(r for _, r in self._judged) >= AUTO_PRECISION * guessed

    # -- reading -------------------------------------------------------------------------------------------------------
    def _read(self, i: int, key: Key, *, prefetched: bool) -> None:
        m = self.moe[i]
        e = key[1]
        by_file: dict[str, tuple[list, list]] = {}
        rows = m.row_bytes
        for x in m.extents[e]:
            views, offs = by_file.setdefault(x.file, ([], []))
            at = x.dst - e * rows[x.param]
            views.append(self.place.row(i, x.param, e)[at:at + x.nbytes])
            offs.append(x.offset)
        tag = f"{self.tag}:{m.name}.{e}"
        futs = [self.source.file(f).pread_many(v, o, tags=[tag] * len(v)) for f, (v, o) in by_file.items()]
        self._ereads[key] = [i, futs]
        self._c["reads"] += 1
        self._c["bytes"] += self._read_bytes[i][e]
        self._c["payload"] += m.expert_bytes
        if prefetched:
            self._c["prefetch_bytes"] += m.expert_bytes

    def _finish(self, key: Key) -> None:
        """Wait for the reads of ``key`` and check them; on failure the expert leaves the cache."""
        i, futs = self._ereads.pop(key)
        errors = []
        for f in futs:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finished
                errors.append(exc)
        try:
            if errors:
                raise errors[0]
            if self.verify == "always" or (self.verify == "first" and key not in self._everified):
                self._check(i, key[1])
            self._everified.add(key)
        except BaseException:
            self._evict(key)
            raise

    def _check(self, i: int, e: int) -> None:
        rows = self.moe[i].row_bytes
        for src, spans in self.moe[i].checks[e] if self.moe[i].checks else []:
            crc = 0
            for pi, dst, n in spans:
                at = dst - e * rows[pi]
                crc = crc32c(self.place.row(i, pi, e)[at:at + n], crc)
            if crc != src.crc32c:
                raise ChecksumError(f"tensor {src.name!r}: CRC-32C mismatch (the data on disk is damaged)",
                                    path=src.file, field=src.name)

    def _evict(self, key: Key, into: Key | None = None) -> None:
        """Drop ``key`` from the cache; its memory goes to ``into`` (the expert about to be read in its place)
        where the layout can (:mod:`~llmtier.offload.expert_place`)."""
        if key in self.cache:
            self.cache.remove(key)
        self.place.evict(key, into)

    # -- public --------------------------------------------------------------------------------------------------------
    def expert_counts(self) -> dict[int, list[int]]:
        """How often each expert of each MoE layer was routed to (layer -> count per expert)."""
        return {k: list(v) for k, v in self._counts.items()}

    def profile(self) -> ExpertProfile:
        """The expert frequencies measured so far, to save beside the model for the ``profile`` policy."""
        return ExpertProfile(self.expert_counts(), self._c["tokens"])

    def stats(self) -> MoEStats:
        """The dense counters and the expert cache's (hit rate, bytes per token, prediction recall, stalls)."""
        base = super().stats().as_dict()
        c = self._c
        routed = c["hits"] + c["misses"] + c["prefetch_hits"]
        total = base["bytes_read"] + base["embedding_bytes_read"] + c["bytes"]
        return MoEStats(**base, policy=self.cache.policy.name, predict=self.predict,
                        expert_cache_bytes=self.cache.capacity, expert_cache_used=self.cache.used,
                        expert_hits=c["hits"], expert_misses=c["misses"], prefetch_hits=c["prefetch_hits"],
                        expert_hit_rate=c["hits"] / routed if routed else 0.0, expert_bytes_read=c["bytes"],
                        expert_payload_read=c["payload"],
                        expert_reads=c["reads"], expert_stall_s=self._stall,
                        expert_layout=self.place.kind if self.place else "",
                        expert_overlap=bool(getattr(self.place, "overlap", False)),
                        expert_bytes_released=self.place.released if self.place else 0,
                        expert_bytes_recycled=self.place.recycled if self.place else 0,
                        prefetch_bytes=c["prefetch_bytes"],
                        prefetch_wasted_bytes=c["wasted"], prefetch_paused=self._paused, unguessed_passes=self._unguessed,
                        predicted=c["predicted"],
                        predicted_right=c["right"],
                        routed_with_prediction=c["routed_pred"],
                        prediction_recall=c["right"] / c["routed_pred"] if c["routed_pred"] else 0.0,
                        prediction_precision=c["right"] / c["predicted"] if c["predicted"] else 0.0,
                        tokens=c["tokens"], active_missing_bytes=c["missing_bytes"],
                        analytic_bytes=c["missing_bytes"] + base["bytes_read"] + base["embedding_bytes_read"],
                        total_bytes_read=total, bytes_per_token=total / c["tokens"] if c["tokens"] else 0.0)

    def close(self) -> None:
        """Wait for expert reads in flight, then close as :meth:`WeightStreamer.close`."""
        if getattr(self, "_closed", True) is False:
            for key in list(getattr(self, "_ereads", {})):
                _, futs = self._ereads.pop(key)
                for f in futs:
                    try:
                        f.result()
                    except Exception:  # noqa: BLE001 - discarded reads: only their end matters
                        pass
        super().close()
        if getattr(self, "place", None) is not None:
            self.place.close()


def bind_moe_streamer(layout: Layout, memory: int | str, *, policy: str = "lru", predict: bool | str = "auto",
                      profile: ExpertProfile | str | None = None, prefetch: int | None = None,
                      verify: str = "first", slots: bool | None = None) -> MoEStreamer:
    """The expert-granular streamer of ``layout`` within ``memory`` bytes (see the module doc).

    ``profile``: an :class:`ExpertProfile` or a path to one (default for the
    ``profile`` policy: the one saved beside the model).  ``slots``: resident
    experts in a shared slot pool (True) or at their own rows (False); default:
    slots where they are exact (:func:`~llmtier.offload.expert_place.slots_apply`)."""
    budget = resolve_size(memory, whole=layout.total_bytes, what="the weights")
    moe, dense = find_experts(layout)
    if policy == "profile" and not isinstance(profile, ExpertProfile):
        src = layout.source.path
        where = profile if profile is not None else (src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)))
        profile = ExpertProfile.load(where)
    eplan = split_budget_for_experts(budget, layout.outside.nbytes + layout.embedding_bytes, [g.nbytes for g in dense],
                                     moe, prefetch)
    eplan.dense.reason += "\n" + eplan.reason
    return MoEStreamer(layout, eplan, moe, dense, policy=policy, predict=predict,
                       profile=profile if isinstance(profile, ExpertProfile) else None, verify=verify, slots=slots)


__all__ = ["AUTO_MIN_JUDGED", "AUTO_PRECISION", "AUTO_SAMPLE", "AUTO_WINDOW", "CONFIDENCE_BANDS", "MoEStats", "MoEStreamer",
           "bind_moe_streamer"]
