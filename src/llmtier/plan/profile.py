"""A device profile: what this machine's tiers and CPU do, saved by ``llmtier bench io --save-profile``.

The planner predicts time from it: disk read and write bandwidth at the
request sizes the runtimes issue (weight slots, KV page groups, optimizer
chunks), DRAM copy bandwidth, pinned host -> GPU bandwidth where CUDA exists,
and the CPU's rates (matrix multiply, a decoder layer's fixed cost, AdamW
elements per second) plus the memory a process takes before any model
(Python, torch, transformers).  Measuring is :mod:`llmtier.bench.profile`'s
job; here it is only a record, loaded and saved as JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LLMTierError

VERSION = 1


class ProfileError(LLMTierError, ValueError):
    """A saved device profile that cannot be read."""


@dataclass
class DeviceProfile:
    """One machine's measured rates (bytes/s, FLOP/s, seconds, bytes)."""

    read_bw: dict[int, float]  # request size (bytes) -> O_DIRECT read bandwidth through the engine
    write_bw: dict[int, float]  # request size -> O_DIRECT write bandwidth
    dram_copy_bw: float
    gemm_flops: float  # bf16 matrix multiply on the CPU (torch, its threads)
    gemv_bw: float  # bytes of bf16 weights a batch-1 matrix-vector product passes per second
    layer_overhead_s: float  # fixed cost of one decoder layer's forward (a small HF model, batch 1, one token)
    adam_elems_s: float  # fp32 AdamW updates per second (one thread of work as OffloadedAdamW runs it)
    base_bytes: int  # a process with torch and transformers imported, before any model
    h2d_bw: float | None = None  # pinned host -> GPU, where CUDA exists
    threads: int = 1
    directory: str = ""
    measured_at: str = ""
    host: str = ""
    notes: list[str] = field(default_factory=list)
    quick: bool = False
    run_overhead_bytes: int = 0  # a small generation's peak RSS beyond base + weights + KV + activations (0: unknown)
    train_overhead_bytes: int = 0  # the same for a small training step
    expert_overhead_s: float = 0.0  # per routed expert a decode step hits in one layer, beyond a dense layer
    train_flops: float = 0.0  # a small bf16 model's forward + backward, FLOP/s (0: use gemm_flops)
    # batch -> bytes of bf16 weights a [batch, k] x [k, n] product passes per second (decode's skinny products: on a
    # CPU they run on other kernels than a square GEMM, and their rate, not gemm_flops, sets a decode step's time)
    matmul_bw: dict[int, float] = field(default_factory=dict)
    step_overhead_s: float = 0.0  # a generate() decode step beyond its layers (embedding, head, logits, cache)
    # a small MoE model's training step beyond the same terms (0: unknown, use train_overhead_bytes): on a CPU with
    # bf16 oneDNN kernels the expert products, whose shapes change with every routing, keep far more (+65 MiB measured)
    moe_train_overhead_bytes: int = 0
    # the share of the smaller of a streamed decode step's compute and weight reads that does not hide under the other
    # (0: perfect overlap, 1: none): measured on a small streamed model (``bench.plan.stream_overlap``); on a 2-core
    # VM the I/O threads, page pinning and completions take the CPU the layers would use
    stream_overlap_loss: float = 0.0
    # what a dense training step saves for backward per token, measured on a small model (two batch sizes, the
    # difference of their peaks), over the memory model's formula for it (0: not measured, take the formula as it
    # is): the formula counts transformers' fp32 upcasts, which some CPUs' bf16 kernels do not keep
    train_activation_scale: float = 0.0
    # how much longer a decoder layer's compute takes while the disk reads beside it (the engine's direct reads,
    # another thread), as a streamed model's layers compute under their read-ahead: on a 2-core VM the reads'
    # completions and the host's side of the virtual disk take CPU time from the layers (1.0: not measured)
    read_slowdown: float = 1.0
    # the weight streamer's own CPU per streamed layer and pass (submitting its reads, collecting them, binding its
    # parameters and putting them back), measured on a small streamed Llama (0: not measured)
    stream_layer_s: float = 0.0

    def weights_s(self, nbytes: float, batch: int) -> float:
        """Seconds to multiply ``batch`` rows by ``nbytes`` of bf16 weights: the time per weight byte measured at
        the batch sizes of :attr:`matmul_bw`, interpolated between them and growing with the batch beyond the
        largest (compute-bound there); without those, the larger of the GEMV and the GEMM bound."""
        if not self.matmul_bw:
            return max(nbytes / self.gemv_bw, nbytes * batch / self.gemm_flops)  # 2 FLOP per bf16 weight (2 bytes) and row
        sizes = sorted(self.matmul_bw)
        per = {b: 1.0 / self.matmul_bw[b] for b in sizes}
        if batch <= sizes[0]:
            t = per[sizes[0]]
        elif batch >= sizes[-1]:
            t = per[sizes[-1]] * batch / sizes[-1]
        else:
            lo = max(b for b in sizes if b <= batch)
            hi = min(b for b in sizes if b >= batch)
            t = per[lo] if lo == hi else per[lo] + (batch - lo) / (hi - lo) * (per[hi] - per[lo])
        return nbytes * t

    @staticmethod
    def _at(table: dict[int, float], size: int) -> float:
        if not table:
            raise ProfileError("the profile holds no disk bandwidth")
        sizes = sorted(table)
        if size <= sizes[0]:
            return table[sizes[0]]
        if size >= sizes[-1]:
            return table[sizes[-1]]
        lo = max(s for s in sizes if s <= size)
        hi = min(s for s in sizes if s >= size)
        if lo == hi:
            return table[lo]
        f = (size - lo) / (hi - lo)
        return table[lo] + f * (table[hi] - table[lo])

    def read_at(self, size: int) -> float:
        """Read bandwidth at requests of ``size`` bytes (interpolated between the sizes measured)."""
        return self._at(self.read_bw, size)

    def write_at(self, size: int) -> float:
        return self._at(self.write_bw, size)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["read_bw"] = {str(k): v for k, v in self.read_bw.items()}
        d["write_bw"] = {str(k): v for k, v in self.write_bw.items()}
        d["matmul_bw"] = {str(k): v for k, v in self.matmul_bw.items()}
        d["version"] = VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        try:
            d = dict(d)
            d.pop("version", None)
            d["read_bw"] = {int(k): float(v) for k, v in d["read_bw"].items()}
            d["write_bw"] = {int(k): float(v) for k, v in d["write_bw"].items()}
            d["matmul_bw"] = {int(k): float(v) for k, v in (d.get("matmul_bw") or {}).items()}
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"not a device profile: {e}") from e


@dataclass(frozen=True)
class LayerTiming:
    """Seconds one decoder layer of a given model adds to a decode step of ``batch`` sequences after ``context``
    tokens, measured on that model's own architecture (:func:`llmtier.bench.layerprobe.probe_layer`): the planner's
    compute term for decode, where a generic profile's rates miss the kernels a layer's shapes get."""

    layer_s: float
    batch: int
    context: int
    note: str = ""
    #: the same layer with its weights in no CPU cache, as a streamed layer's are (None: not measured, layer_s)
    cold_layer_s: float | None = None


def default_path() -> str:
    """Where the profile is kept: ``$LLMTIER_PROFILE``, else ``~/.cache/llmtier/device-profile.json``."""
    return os.environ.get("LLMTIER_PROFILE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmtier",
        "device-profile.json")


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str] | None = None) -> str:
    """Write ``profile`` (atomically) to ``path`` (default :func:`default_path`); returns the path."""
    p = os.fspath(path) if path is not None else default_path()
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(profile.as_dict(), f, indent=1)
    os.replace(tmp, p)
    return p


def load_profile(path: str | os.PathLike[str] | None = None) -> DeviceProfile | None:
    """The saved profile at ``path`` (default :func:`default_path`), or None when there is none."""
    p = os.fspath(path) if path is not None else default_path()
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            return DeviceProfile.from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise ProfileError(f"{p}: {e}") from e


__all__ = ["DeviceProfile", "LayerTiming", "ProfileError", "default_path", "load_profile", "save_profile"]
