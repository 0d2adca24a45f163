"""The few collectives a sharded checkpoint needs, on torch.distributed when it is running.

Without an initialised process group everything here is the one-process
case: rank 0 of 1, collectives are identities, torch is not imported.
"""
from __future__ import annotations

import sys
from typing import Any


class Ranks:
    """This process's rank and the world, plus a gloo group for checkpoint collectives.

    ``separate=True`` gives the checkpoint its own gloo group (created on the
    first collective, which every rank reaches at the same point), so that
    collectives run from a background thread never interleave with the
    training loop's own.
    """

    def __init__(self, group: Any = None, *, separate: bool = False) -> None:
        self.dist = _dist()
        self._group = group
        self._separate = separate
        if self.dist is None:
            self.rank, self.world = 0, 1
        else:
            self.rank = self.dist.get_rank(group) if group is not None else self.dist.get_rank()
            self.world = self.dist.get_world_size(group) if group is not None else self.dist.get_world_size()

    @property
    def group(self) -> Any:
        if self._group is None and self.dist is not None and (self._separate or self.dist.get_backend() != "gloo"):
            self._group = self.dist.new_group(backend="gloo")
        return self._group

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def from_rank0(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def _global(self, r: int) -> int:
        g = self.group
        return r if g is None else self.dist.get_global_rank(g, r)


def _dist() -> Any:
    """``torch.distributed`` when torch is loaded and a process group is initialised, else ``None``."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None
