"""What differs between transformers versions, decided once per process.

Newer transformers (5.24 here) renamed the cache argument of ``generate()`` and of model
forwards from ``past_key_values`` to ``cache`` (the old name warns and goes
away in 5.40 / 6.0).  :func:`cache_kwargs` passes a cache under the name the
installed version prefers, so neither llmtier nor its tests trigger the
FutureWarning, and both names keep working across the supported range.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def generate_cache_name() -> str:
    """``"cache"`` where the installed ``generate()`` takes it, else ``"past_key_values"``."""
    from transformers.generation import utils  # noqa: PLC0415 - optional dependency ([hf])

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


@functools.cache
def _forward_cache_name(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache: Any, model: Any = None) -> dict[str, Any]:
    """``{name: cache}`` for ``generate(**cache_kwargs(c))`` or, with ``model``, for ``model(ids, **cache_kwargs(c, model))``.

    The name is the one the installed transformers (and, for a forward, that
    model's class) prefers.
    """
    if model is None:
        return {generate_cache_name(): cache}
    return {_forward_cache_name(type(model)): cache}


__all__ = ["cache_kwargs", "generate_cache_name"]


# -- a streamed model as transformers code expects it ---------------------------------------------------------------
class TransformersLike:
    """Mixed into a streamed model's class (before the transformers class) so that code written for
    ``from_pretrained`` models works: ``model.device`` is the compute device (not ``meta``), ``.to()``
    to it is a no-op, and what cannot work on streamed weights (another device, a dtype cast after
    load, ``save_pretrained``) says so and how to get it instead.
    """

    llmtier: Any

    @property
    def device(self) -> Any:
        """The device the model computes on: the streamer's ``device`` (``"cpu"`` until the GPU path exists)."""
        import torch  # noqa: PLC0415

        return torch.device(getattr(self.llmtier, "device", None) or "cpu")

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """A no-op to the compute device and dtype; anything else raises :class:`~llmtier.errors.LLMTierError`."""
        import torch  # noqa: PLC0415

        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._same_device(device)
        if dtype is not None:
            self._same_dtype(dtype)
        return self

    def _same_device(self, device: Any) -> None:
        import torch  # noqa: PLC0415

        want, have = torch.device(device), self.device
        if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
            from ..errors import LLMTierError  # noqa: PLC0415

            raise LLMTierError(f"this streamed model computes on {have}; it cannot move to {want} (its weights stream "
                               f"into buffers for {have}): open it with stream_model(path, memory, device={str(want)!r})")

    def _same_dtype(self, dtype: Any) -> None:
        if dtype != self.dtype:
            from ..errors import LLMTierError  # noqa: PLC0415

            raise LLMTierError(f"this streamed model computes in {self.dtype}; a cast after load is not possible "
                               f"(the weights stream from disk): open it with stream_model(path, memory, dtype={dtype})")

    def cpu(self) -> Any:
        return self.to("cpu")

    def cuda(self, device: Any = None) -> Any:
        return self.to("cuda" if device is None else device)

    def half(self) -> Any:
        import torch  # noqa: PLC0415

        return self.to(torch.float16)

    def float(self) -> Any:
        import torch  # noqa: PLC0415

        return self.to(torch.float32)

    def bfloat16(self) -> Any:
        import torch  # noqa: PLC0415

        return self.to(torch.bfloat16)

    def double(self) -> Any:
        import torch  # noqa: PLC0415

        return self.to(torch.float64)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        from ..errors import LLMTierError  # noqa: PLC0415

        raise LLMTierError("a streamed model holds no weights to save (they stay on disk); copy the model directory, "
                           "or `llmtier convert` it to a store")


__all__ += ["TransformersLike"]
