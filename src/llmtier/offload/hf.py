"""Hugging Face glue for the runtimes: the config of a model directory or
store, a model skeleton whose parameters are on the meta device, its decoder
layers, and which checkpoint tensor each parameter is.

Nothing here reads tensor data; :mod:`llmtier.offload.weights` does.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, LLMTierError


class ModelLayoutError(LLMTierError, ValueError):
    """The model or checkpoint does not fit what the runtime needs (no decoder
    layer list, a parameter with no tensor in the checkpoint, a shape that
    differs)."""


def check_model_path(path: str) -> None:
    """Refuse, with the fix, the paths people give by mistake: a model's
    ``config.json`` instead of its directory, a directory holding only
    PyTorch pickles (``pytorch_model.bin``)."""
    if os.path.isfile(path) and path.endswith(".json"):
        raise ModelLayoutError(f"{path} is a JSON file; give the model's directory "
                               f"({os.path.dirname(os.path.abspath(path))}), not one of its files")
    if os.path.isdir(path):
        names = os.listdir(path)
        if not any(n.endswith((".safetensors", ".lts")) or n == "index.json" for n in names):  # index.json: a sharded store
            pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
            if pickles:
                raise ModelLayoutError(
                    f"{path} holds {', '.join(pickles[:3])} (PyTorch pickles), which llmtier does not read: "
                    "save it as safetensors first (AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW)), "
                    "then use NEW or `llmtier convert NEW STORE`")
            raise ModelLayoutError(f"{path} has no safetensors weights or llmtier store; give a Hugging Face model "
                                   "directory (config.json + *.safetensors) or a store made by `llmtier convert`")


def load_config(path: str, metadata: dict[str, Any]) -> Any:
    """The transformers config of a model directory (its ``config.json``) or
    of an llmtier store (the ``hf_config`` kept in its metadata by
    ``llmtier convert``)."""
    from transformers import AutoConfig  # noqa: PLC0415 - optional dependency ([hf])

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return AutoConfig.from_pretrained(path)
    doc = metadata.get("hf_config")
    if not isinstance(doc, dict):
        why = metadata.get("hf_config_error", "no config.json beside the weights and no hf_config in the metadata")
        raise FormatError(f"cannot tell which model this is: {why}", path=path, field="hf_config")
    doc = dict(doc)
    model_type = doc.pop("model_type", None)
    if not isinstance(model_type, str):
        raise FormatError("hf_config has no model_type", path=path, field="hf_config")
    return AutoConfig.for_model(model_type, **doc)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta
    device; buffers (rotary frequencies and the like) are computed for real."""
    import torch  # noqa: PLC0415

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # (tying re-registers a meta parameter: keep it)
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_skeleton(config: Any, dtype: Any) -> Any:
    """A causal LM of ``config`` with every parameter on the meta device (no
    memory), in ``dtype``, in eval mode; buffers are real and on the CPU, made
    by the same code as ``from_pretrained(..., dtype=dtype)`` makes them."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with _params_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            raise ModelLayoutError(f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}) is not a "
                                   "decoder-only causal LM; llmtier streams models that AutoModelForCausalLM loads "
                                   "(Llama, Mistral, Qwen2, OPT ...)") from None
    _init_buffers_as_loaded(model)
    return model.eval()


def _init_buffers_as_loaded(model: Any) -> None:
    """Recompute the non-persistent buffers (rotary and sinusoidal tables) the
    way ``from_pretrained`` does after loading: by the model's own
    ``_init_weights``, outside the ``dtype`` default that ``from_config`` sets
    while building (GPT-J's and CodeGen's tables come out different in bf16).
    Parameters are marked initialized and stay on the meta device."""
    if not hasattr(model, "named_non_persistent_buffers") or not hasattr(model, "initialize_weights"):
        return  # an older transformers: the buffers from from_config are what it loads too
    owners = {name.rpartition(".")[0] for name, _ in model.named_non_persistent_buffers()}
    if not owners:
        return
    for p in model.parameters():
        p._is_hf_initialized = True
    modules = dict(model.named_modules())
    for name in owners:
        for m in (modules.get(name), *(modules.get(name).modules() if modules.get(name) is not None else ())):
            if m is not None:
                m._is_hf_initialized = False
    model._is_hf_initialized = False
    model.initialize_weights()


def load_generation_config(model: Any, path: str) -> None:
    """Use the directory's ``generation_config.json`` (defaults of ``generate()``:
    sampling, eos and pad ids ...) as ``from_pretrained`` does."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "generation_config.json")):
        from transformers import GenerationConfig  # noqa: PLC0415

        model.generation_config = GenerationConfig.from_pretrained(path)


def decoder_layers(model: Any) -> tuple[str, Any]:
    """The decoder's layer list: the ``ModuleList`` with the most parameters
    whose length is the config's ``num_hidden_layers`` (``model.layers`` for
    Llama, ``model.decoder.layers`` for OPT ...)."""
    import torch  # noqa: PLC0415

    want = getattr(model.config, "num_hidden_layers", None)
    best: tuple[int, str, Any] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (want is None or len(mod) == want):
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    if best is None:
        raise ModelLayoutError(f"{type(model).__name__}: no ModuleList of {want} decoder layers found; "
                               "weight streaming needs the layers in one ModuleList")
    return best[1], best[2]


@dataclass
class Binding:
    """One tensor of the checkpoint and every place in the model that uses it
    (tied weights share one tensor)."""

    tensor: str  # name in the checkpoint
    places: list[tuple[Any, str, bool]]  # (module, attribute, is_parameter)
    shape: tuple[int, ...]
    dtype: Any


def bindings(model: Any, names: set[str], dtype_of: Any,
             renames: dict[str, str] | None = None) -> tuple[dict[str, Binding], list[str]]:
    """Match the model's parameters (and persistent buffers found in the
    checkpoint) with checkpoint tensor names.

    Returns ``(by tensor name, unused checkpoint names)``.  Parameters that
    are the same object (tied embeddings) share one binding; a checkpoint
    name may carry or lack the base model prefix.  A parameter with no tensor
    raises :class:`ModelLayoutError`.  ``renames`` maps a model state-dict
    name to the checkpoint name transformers would load it from (see
    :mod:`llmtier.offload.mapping`); it is asked first.
    """
    renames = renames or {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    modules = dict(model.named_modules())

    def place(full: str) -> tuple[Any, str]:
        owner, _, attr = full.rpartition(".")
        return modules[owner], attr

    def lookup(full: str) -> str | None:
        if renames.get(full) in names:
            return renames[full]
        if full in names:
            return full
        if prefix and full.startswith(prefix + ".") and full[len(prefix) + 1:] in names:
            return full[len(prefix) + 1:]
        if prefix and f"{prefix}.{full}" in names:
            return f"{prefix}.{full}"
        return None

    groups: dict[int, list[str]] = {}
    first: dict[int, Any] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(full)
        first.setdefault(id(p), p)
    out: dict[str, Binding] = {}
    missing: list[str] = []
    for key, fulls in groups.items():
        tensor = next((t for t in map(lookup, fulls) if t is not None), None)
        if tensor is None:
            missing.append(fulls[0])
            continue
        p = first[key]
        out[tensor] = Binding(tensor, [(*place(f), True) for f in fulls], tuple(p.shape), p.dtype)
    if missing:
        raise ModelLayoutError(f"{len(missing)} parameters have no tensor in the checkpoint, e.g. "
                               f"{', '.join(missing[:4])}")
    for full, b in model.named_buffers():
        tensor = lookup(full)
        if tensor is not None and tensor not in out:
            out[tensor] = Binding(tensor, [(*place(full), False)], tuple(b.shape), b.dtype)
    for b in out.values():
        shape, dt = dtype_of(b.tensor)
        if tuple(shape) != b.shape:
            raise ModelLayoutError(f"tensor {b.tensor!r} has shape {tuple(shape)} in the checkpoint, the model "
                                   f"wants {b.shape}")
        if dt != b.dtype and b.places[0][2] and not (dt.is_floating_point and b.dtype.is_floating_point):
            raise ModelLayoutError(f"tensor {b.tensor!r} is {dt} in the checkpoint, the model wants {b.dtype}")
    return out, sorted(names - set(out))


__all__ = ["Binding", "ModelLayoutError", "bindings", "build_skeleton", "check_model_path", "decoder_layers",
           "load_config", "load_generation_config"]
