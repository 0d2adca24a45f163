"""Checkpoint names -> model parameters, through transformers' own conversion mapping.

transformers 5 renames and fuses checkpoint tensors while it loads them
(``transformers.conversion_mapping``: ``WeightRenaming``, ``WeightConverter``):
GPT-NeoX's ``embed_out`` is the model's ``lm_head``; Mixtral's per-expert
``experts.{e}.w1/w3/w2`` become one fused ``experts.gate_up_proj`` [E, 2I, H]
and ``experts.down_proj`` [E, H, I].  The streamer reads checkpoint bytes
straight into the parameters' places, so it must know the same mapping.  It
asks transformers (:func:`get_model_conversion_mapping`, ``rename_source_key``)
and keeps no table of its own.

A fusion made of stacks and concatenations (``MergeModulelist``,
``Concatenate``) -- or splits (``Chunk``, ``Split``) -- moves whole runs of
elements: in row-major order the fused tensor is pieces of the sources one
after another.  :func:`source_map` works those pieces out on *virtual*
tensors (shapes and element runs, no data), so a fused parameter becomes a
list of byte ranges of the checkpoint, each read straight to its offset in
the parameter.  Any other operation (a transpose, an interleave, a
dequantization) changes bytes, not places: it is refused, naming it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from .hf import ModelLayoutError


@dataclass
class Piece:
    """``nbytes`` of checkpoint tensor ``source`` from byte ``src`` go to byte ``dst`` of the parameter."""

    source: str
    src: int
    dst: int
    nbytes: int


@dataclass
class Fused:
    """A parameter assembled from pieces of checkpoint tensors."""

    name: str  # the parameter's name in the model's state dict
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    converter: str = ""

    @property
    def sources(self) -> list[str]:
        return sorted({p.source for p in self.pieces})


# -- virtual tensors ---------------------------------------------------------------------------------------------
@dataclass
class _VT:
    """Shape and, in row-major order, runs ``(start, n, source, source start)`` of elements."""

    shape: tuple[int, ...]
    runs: list[tuple[int, int, str, int]]

    def take(self, start: int, n: int) -> list[tuple[int, str, int]]:
        """Elements ``[start, start + n)`` as ``(n, source, source start)`` runs."""
        out: list[tuple[int, str, int]] = []
        k = max(0, bisect.bisect_right(self.runs, (start, math.inf)) - 1)
        end = start + n
        while start < end and k < len(self.runs):
            r0, rn, src, s0 = self.runs[k]
            lo, hi = max(start, r0), min(end, r0 + rn)
            if lo < hi:
                out.append((hi - lo, src, s0 + lo - r0))
                start = hi
            k += 1
        return out


def _build(shape: tuple[int, ...], parts: list[tuple[int, str, int]]) -> _VT:
    runs: list[tuple[int, int, str, int]] = []
    pos = 0
    for n, src, s0 in parts:
        if runs and runs[-1][2] == src and runs[-1][3] + runs[-1][1] == s0 and runs[-1][0] + runs[-1][1] == pos:
            a, m, _, b = runs[-1]
            runs[-1] = (a, m + n, src, b)
        else:
            runs.append((pos, n, src, s0))
        pos += n
    return _VT(tuple(shape), runs)


def _cat(vts: list[_VT], dim: int) -> _VT:
    base = vts[0].shape
    for v in vts:
        if len(v.shape) != len(base) or any(a != b for i, (a, b) in enumerate(zip(v.shape, base)) if i != dim):
            raise ValueError(f"cannot concatenate shapes {[v.shape for v in vts]} along {dim}")
    outer = math.prod(base[:dim])
    blocks = [math.prod(v.shape[dim:]) for v in vts]
    parts: list[tuple[int, str, int]] = []
    for p in range(outer):
        for v, blk in zip(vts, blocks):
            parts += v.take(p * blk, blk)
    shape = list(base)
    shape[dim] = sum(v.shape[dim] for v in vts)
    return _build(tuple(shape), parts)


def _stack(vts: list[_VT], dim: int) -> _VT:
    return _cat([_VT(v.shape[:dim] + (1,) + v.shape[dim:], v.runs) for v in vts], dim)


def _split(v: _VT, sizes: list[int], dim: int) -> list[_VT]:
    outer, inner = math.prod(v.shape[:dim]), math.prod(v.shape[dim + 1:])
    blk = v.shape[dim] * inner
    out, at = [], 0
    for s in sizes:
        parts: list[tuple[int, str, int]] = []
        for p in range(outer):
            parts += v.take(p * blk + at * inner, s * inner)
        shape = list(v.shape)
        shape[dim] = s
        out.append(_build(tuple(shape), parts))
        at += s
    return out


def _run_ops(conv: Any, collected: dict[str, list[_VT]], layer_name: str, model: Any) -> dict[str, _VT]:
    """The converter's operations, on virtual tensors (mirroring what each op does to real ones)."""
    from transformers import core_model_loading as cml  # noqa: PLC0415

    Chunk, Concatenate, MergeModulelist = cml.Chunk, cml.Concatenate, cml.MergeModulelist
    splits = tuple(op for op in (Chunk, getattr(cml, "Split", None)) if op is not None)  # Split: newer versions only

    d: dict[str, Any] = dict(collected)
    sources, targets = list(conv.source_patterns), list(conv.target_patterns)
    for op in conv.operations:
        kind = type(op)
        if kind is MergeModulelist:
            size = len(d)
            out: dict[str, Any] = {}
            for pattern, xs in d.items():
                key = targets[0] if size == 1 and len(targets) == 1 else pattern
                out[key] = xs if isinstance(xs, _VT) else _stack(xs, op.dim)
            d = out
        elif kind is Concatenate:
            parts: list[_VT] = []
            for pattern in sources:
                if pattern in d:
                    xs = d.pop(pattern)
                    parts += xs if isinstance(xs, list) else [xs]
            parts += [x for xs in d.values() for x in (xs if isinstance(xs, list) else [xs])]
            d = {targets[0]: _cat(parts, op.dim)}
        elif kind in splits:
            if len(d) != 1:
                raise ValueError("a split of several inputs")
            x = next(iter(d.values()))
            x = x[0] if isinstance(x, list) else x
            names = targets
            if kind is Chunk and hasattr(op, "get_target_patterns"):  # newer versions may expand the targets
                names = op.get_target_patterns(targets, config=model.config)
            if kind is Chunk:
                n = len(names)
                sizes = [x.shape[op.dim] // n] * n
                if sum(sizes) != x.shape[op.dim]:
                    raise ValueError(f"chunks of {x.shape[op.dim]} into {n}")
            else:
                sizes = [model.get_parameter(layer_name.replace(targets[0], t)).shape[op.dim] for t in names]
            d = dict(zip(names, _split(x, sizes, op.dim)))
        else:
            raise ModelLayoutError(
                f"{layer_name}: transformers converts these checkpoint tensors with {kind.__name__}, which changes "
                f"their bytes rather than their places; weight streaming reads bytes in place and cannot apply it "
                f"(convert the checkpoint with transformers' save_pretrained first)")
    return {k: (v[0] if isinstance(v, list) else v) for k, v in d.items()}


def conversion_rules(model: Any) -> tuple[list, list] | None:
    """transformers' renamings and converters for ``model`` (None where this
    transformers has no conversion mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
        from transformers.core_model_loading import WeightConverter, WeightRenaming  # noqa: PLC0415
    except ImportError:
        return None
    rules = get_model_conversion_mapping(model)
    return ([r for r in rules if isinstance(r, WeightRenaming)], [r for r in rules if isinstance(r, WeightConverter)])


def source_map(model: Any, names: set[str], shape_of: Any, itemsize_of: Any) -> dict[str, str | Fused]:
    """Which checkpoint tensor (or which pieces of which) each model state-dict
    entry comes from, as ``from_pretrained`` would load it.  Entries the
    mapping does not name are left out (the caller matches them by name)."""
    rules = conversion_rules(model)
    if rules is None:
        return {}
    from transformers.core_model_loading import dot_natural_key, rename_source_key  # noqa: PLC0415

    renamings, converters = rules
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    plain: dict[str, str] = {}
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for name in sorted(names, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if renamed not in meta and name in meta:
            renamed, pattern = name, None
        if renamed not in meta:
            continue
        if pattern is None:
            plain.setdefault(renamed, name)
        else:
            conv, collected = groups.setdefault(renamed, (by_pattern[pattern], {}))
            collected.setdefault(pattern, []).append(name)
    out: dict[str, str | Fused] = dict(plain)
    for layer_name, (conv, collected) in groups.items():
        vts = {p: [_VT(tuple(shape_of(n)), [(0, math.prod(shape_of(n)), n, 0)]) for n in ns]
               for p, ns in collected.items()}
        sizes = {itemsize_of(n) for ns in collected.values() for n in ns}
        if len(sizes) != 1:
            raise ModelLayoutError(f"{layer_name}: its checkpoint tensors differ in dtype; cannot place them in one")
        isz = sizes.pop()
        try:
            results = _run_ops(conv, vts, layer_name, model)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelLayoutError(f"{layer_name}: cannot place the tensors of {type(conv).__name__}"
                                   f"({conv.source_patterns} -> {conv.target_patterns}): {exc}") from exc
        full = layer_name.replace("*.", "0.")
        hit = next((k for k in results if k in full), None)
        pre, _, post = full.partition(hit) if hit is not None else ("", "", "")
        ops = "+".join(type(op).__name__ for op in conv.operations)
        for key, vt in results.items():
            target = pre + key + post if hit is not None else key
            if target not in meta:
                continue
            pieces = [Piece(src, s0 * isz, start * isz, n * isz) for start, n, src, s0 in vt.runs]
            out[target] = Fused(target, vt.shape, pieces, ops)
    return out


__all__ = ["Fused", "Piece", "conversion_rules", "source_map"]
