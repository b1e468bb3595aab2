"""How the shards of a tensor-parallel stage stay in step.

A stage split over several cards is one pipeline stage: its first rank (the leader) takes part in
the pipeline's point-to-point traffic and shares each micro-batch's inputs with the other shards
(followers) by broadcast over the stage's group; every shard then runs the same sharded forward,
whose collectives join the shards' partial results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int64: 3, torch.int32: 4, torch.bool: 5}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_DIMS = 4


class TensorParallelSync:
    """The leader of a split stage shares each forward's inputs with its followers (broadcast).

    A fixed-size int64 header says what comes next: ``FORWARD`` with the shapes and dtypes of the
    tensors that follow, ``BARRIER`` (join a world barrier), or ``STOP``.
    """

    STOP, FORWARD, BARRIER = 0, 1, 2

    def __init__(self, group: Any, leader: int, device: torch.device) -> None:
        self.group, self.leader, self.device = group, leader, device

    def _header(self, cmd: int, tensors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        head = torch.zeros(2 + 2 * (2 + _MAX_DIMS), dtype=torch.int64)
        head[0], head[1] = cmd, len(tensors)
        for k, t in enumerate(tensors):
            base = 2 + k * (2 + _MAX_DIMS)
            head[base], head[base + 1] = t.dim(), _DTYPE_CODES[t.dtype]
            head[base + 2: base + 2 + t.dim()] = torch.tensor(t.shape)
        return head.to(self.device)

    def lead(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = tuple(t.contiguous() for t in tensors)
        dist.broadcast(self._header(self.FORWARD, tensors), src=self.leader, group=self.group)
        for t in tensors:
            dist.broadcast(t.detach(), src=self.leader, group=self.group)
        return tensors

    def command(self, cmd: int) -> None:
        dist.broadcast(self._header(cmd), src=self.leader, group=self.group)

    def follow(self, stage: Any) -> None:
        """Follower loop: run the stage's forward on every input the leader shares, until STOP."""
        while True:
            head = self._header(self.STOP)
            dist.broadcast(head, src=self.leader, group=self.group)
            head = head.cpu()
            cmd = int(head[0])
            if cmd == self.STOP:
                return
            if cmd == self.BARRIER:
                dist.barrier()
                continue
            tensors = []
            for k in range(int(head[1])):
                base = 2 + k * (2 + _MAX_DIMS)
                ndim, code = int(head[base]), int(head[base + 1])
                shape = tuple(int(d) for d in head[base + 2: base + 2 + ndim])
                t = torch.empty(shape, dtype=_CODE_DTYPES[code], device=self.device)
                dist.broadcast(t, src=self.leader, group=self.group)
                tensors.append(t)
            with torch.no_grad():
                stage.compute(*tensors)


def barrier(sync: TensorParallelSync | None) -> None:
    """A world barrier that a stage's followers (waiting in :meth:`TensorParallelSync.follow`) join too."""
    if sync is not None:
        sync.command(TensorParallelSync.BARRIER)
    dist.barrier()
