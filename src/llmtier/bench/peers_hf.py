"""Hugging Face accelerate disk offload: the peer of llmtier's weight streaming.

Loaded inside the child processes of ``llmtier bench weights``, which runs
them under a memory cap (:mod:`llmtier.bench.cgroup`), with part of the
decoder layers on ``"disk"``.

The device map (:func:`accelerate_device_map`) keeps the embeddings, the final
norm, ``lm_head`` (everything that is not a decoder layer) and the *first*
decoder layers that fit in the budget on ``"cpu"``, and puts the remaining
layers on ``"disk"``.  The first ones, because that is what accelerate's own
``infer_auto_device_map`` does: it fills devices in module order.  (Unlike it,
we never push ``norm``/``lm_head`` to disk.)

Two loaders, which differ in where the CPU-resident half lives.  What follows
was read from transformers 5.23.0 / accelerate 1.15.0 / safetensors 0.8.0 and
checked by finding the parameters' data pointers in ``/proc/self/maps``:

``loader="hf"`` -- ``AutoModelForCausalLM.from_pretrained(dir, device_map=...,
offload_folder=..., dtype=...)`` (``dtype``; ``torch_dtype`` is only kept for
backward compatibility in 5.x):

* CPU half: every shard is opened with ``safe_open(..., backend="mmap")`` and
  each tensor materialised as ``get_slice(name)[...]``, which on CPU is a
  *view into a private (``MAP_PRIVATE``) mmap of the whole shard file*: no
  copy.  Pages are read on first touch (the first forward), through the page
  cache, and the kernel may drop them under memory pressure and read them
  again later.  Under a cgroup cap they are charged to the group as page cache.
* Disk half: for a plain safetensors checkpoint nothing is re-saved;
  ``transformers.integrations.accelerate.accelerate_disk_offload`` makes an
  offload index that points at the original shards, so ``offload_folder``
  stays empty.  At every forward of an offloaded layer accelerate's
  ``AlignDevicesHook`` gets each weight from ``OffloadedWeightsLoader``, which
  does ``safe_open(shard).get_tensor(name)`` -- again a view into a fresh mmap
  of the shard -- and puts the parameter back on ``meta`` after the layer.
  So on a CPU-only machine both halves are read from the original files through
  the page cache; "disk" differs from "cpu" only in that the mapping is not
  kept between forwards.

``loader="dispatch"`` -- an ``init_empty_weights`` skeleton, then
``accelerate.load_checkpoint_and_dispatch(model, dir, device_map=...,
offload_folder=..., dtype=..., offload_state_dict=True)`` (``True`` is also
accelerate's default when the map contains ``"disk"``):

* Disk half: ``load_checkpoint_in_model`` re-saves every disk-mapped weight
  as a raw file ``<offload_folder>/<name>.dat`` (``np.memmap``, bf16 stored as
  int16) plus ``index.json`` -- a full copy of the disk half, written through
  the page cache at load time.  At every forward, ``load_offloaded_weight``
  opens the ``.dat`` with ``np.memmap`` and copies it with ``torch.tensor``
  into anonymous memory, freed after the layer.
* CPU half: written to a temporary folder (``tempfile.mkdtemp()``, so under
  ``$TMPDIR``) as ``.dat`` files, read back with ``torch.tensor(np.memmap(...))``
  -- a *copy into anonymous memory* -- and the folder deleted.  The CPU
  half is then resident RAM that only swap could take away.
  (``offload_state_dict=False`` would leave it as mmap views of the
  safetensors, like ``"hf"``; not offered here.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import LLMTierError
from ..offload.hf import decoder_layers

__all__ = ["LOADERS", "HFPeerError", "Plan", "accelerate_device_map", "load_accelerate", "plan_device_map"]

LOADERS = ("hf", "dispatch")


class HFPeerError(LLMTierError, ValueError):
    """A job the accelerate peer cannot run: unknown loader, bad job field, no decoder layer list."""


def _skeleton(model_dir: str, dtype: torch.dtype) -> Any:
    """The model of ``model_dir``'s config with every parameter on ``meta`` (buffers real)."""
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _nbytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters (tied ones once) and buffers of ``module``."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class Plan:
    """A device map and the sizes it was made from."""

    device_map: dict[str, str]
    layers: str  # name of the decoder ModuleList, e.g. "model.layers"
    layer_bytes: tuple[int, ...]
    other_bytes: int  # everything that is not a decoder layer (always on "cpu")
    cpu_layers: int

    @property
    def disk_layers(self) -> int:
        """How many decoder layers are on ``"disk"``."""
        return len(self.layer_bytes) - self.cpu_layers


def plan_device_map(model_dir: str, budget_bytes: int, dtype: torch.dtype = torch.bfloat16) -> Plan:
    """:func:`accelerate_device_map` with the sizes behind it (see there)."""
    if budget_bytes < 0:
        raise HFPeerError(f"budget_bytes must be >= 0, got {budget_bytes}")
    model = _skeleton(model_dir, dtype)
    layers_name, layers = decoder_layers(model)
    layer_bytes = tuple(_nbytes(layer) for layer in layers)
    other = _nbytes(model) - sum(layer_bytes)
    room, cpu_layers = budget_bytes - other, 0
    for size in layer_bytes:  # the first layers, as infer_auto_device_map fills in module order
        if size > room:
            break
        room -= size
        cpu_layers += 1
    device_map: dict[str, str] = {}

    def cover(module: torch.nn.Module, prefix: str) -> None:
        for pname, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            device_map[prefix + pname] = "cpu"
        for cname, child in module.named_children():
            full = prefix + cname
            if full == layers_name:
                for i in range(len(layers)):
                    device_map[f"{full}.{i}"] = "cpu" if i < cpu_layers else "disk"
            elif layers_name.startswith(full + "."):
                cover(child, full + ".")
            elif _nbytes(child) > 0 or any(True for _ in child.buffers()):
                device_map[full] = "cpu"

    cover(model, "")
    return Plan(device_map, layers_name, layer_bytes, other, cpu_layers)


def accelerate_device_map(model_dir: str, budget_bytes: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """A device map for accelerate: what fits in ``budget_bytes`` on ``"cpu"``, the rest on ``"disk"``.

    ``budget_bytes`` counts every weight kept in RAM: the non-layer modules
    (embeddings, final norm, ``lm_head``, rotary buffers) always stay on
    ``"cpu"`` and are counted first, even when they alone exceed the budget;
    then whole decoder layers, the *first* ones (as accelerate's
    ``infer_auto_device_map`` would), while they fit; the other layers go to
    ``"disk"``.  Sizes come from a skeleton built with ``init_empty_weights``
    in ``dtype``; tied parameters are counted once.  Keys follow module order.

    Raises:
        HFPeerError: negative budget, or no decoder layer list in the model.
    """
    return plan_device_map(model_dir, budget_bytes, dtype).device_map


def load_accelerate(
    model_dir: str,
    budget_bytes: int,
    loader: str = "hf",
    offload_dir: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    device_map: dict[str, str] | None = None,
) -> Any:
    """Load ``model_dir`` with accelerate disk offload; the model is ready for ``generate()``.

    ``loader`` is ``"hf"`` (``from_pretrained`` with the device map: the CPU
    half stays an mmap of the safetensors, read lazily) or ``"dispatch"``
    (``load_checkpoint_and_dispatch`` with ``offload_state_dict=True``: the
    CPU half is copied into RAM and the disk half re-saved as ``.dat`` files in
    ``offload_dir``); the module docstring says what each does in detail.
    ``device_map`` defaults to :func:`accelerate_device_map` of the budget.

    Raises:
        HFPeerError: unknown loader, or layers on disk but no ``offload_dir``.
    """
    if loader not in LOADERS:
        raise HFPeerError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    dm = device_map if device_map is not None else accelerate_device_map(model_dir, budget_bytes, dtype)
    if "disk" in dm.values() and not offload_dir:
        raise HFPeerError("the device map puts layers on disk: an offload_dir is needed")
    if loader == "hf":
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=dm, offload_folder=offload_dir, dtype=dtype)
    else:
        model = _skeleton(model_dir, dtype)
        model.tie_weights()
        model = load_checkpoint_and_dispatch(model, model_dir, device_map=dm, offload_folder=offload_dir, dtype=dtype,
                                             offload_state_dict=True)
    return model.eval()
