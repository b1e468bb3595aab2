"""How the shards of a tensor-parallel stage stay in step.

A stage split over several cards is one pipeline stage: its first rank (the leader) takes part in
the pipeline's point-to-point traffic and shares each micro-batch's inputs with the other shards
(followers) by broadcast over the stage's group; every shard then runs the same sharded forward,
whose collectives join the shards' partial results.

In a training step the leader's output carries a hook (:meth:`TensorParallelSync.share_grad`): when
the schedule runs that micro-batch's backward, the hook first hands the output's gradient to the
followers, which run the same backward through their shard of the graph, so that the collectives of
the backward (the all-reduce of Megatron's ``f``) meet in the same order on every shard. A backward
that computes the inputs' gradients only (the schedule's metadata inference on its first step, in
recent torch) is mirrored as one: the hook says whether the engine will reach the stage's
parameters. Each step starts with the gradients cleared on every shard; after the schedule's step
the leader sends the factor its schedule divided the gradients by (the micro-batches), and the
followers divide theirs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int64: 3, torch.int32: 4, torch.bool: 5}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_DIMS = 4
_HEAD = 4  # command, tensors, value, tag


class TensorParallelSync:
    """The leader of a split stage shares each forward's inputs with its followers (broadcast), and in
    a training step each backward's output gradient.

    A fixed-size int64 header ``[command, tensors, value, tag, (ndim, dtype, shape) per tensor]``
    says what comes next: ``FORWARD`` with the tensors that follow, ``BACKWARD`` with the gradient of
    forward number ``tag``'s output (``value`` 1: the whole backward, 0: the inputs' gradients only),
    ``ZERO`` (clear the gradients), ``SCALE`` (divide the gradients by ``value``), ``BARRIER`` (join
    a world barrier), or ``STOP``.
    """

    STOP, FORWARD, BARRIER, BACKWARD, SCALE, ZERO = 0, 1, 2, 3, 4, 5

    def __init__(self, group: Any, leader: int, device: torch.device) -> None:
        self.group, self.leader, self.device = group, leader, device
        self.forwards = 0
        """Forwards shared so far (leader and followers count the same: a forward's number)."""
        self._accumulators: list[Any] = []

    def _header(self, cmd: int, tensors: Sequence[torch.Tensor] = (), *, value: int = 0, tag: int = 0) -> torch.Tensor:
        head = torch.zeros(_HEAD + 2 * (2 + _MAX_DIMS), dtype=torch.int64)
        head[0], head[1], head[2], head[3] = cmd, len(tensors), value, tag
        for k, t in enumerate(tensors):
            base = _HEAD + k * (2 + _MAX_DIMS)
            head[base], head[base + 1] = t.dim(), _DTYPE_CODES[t.dtype]
            head[base + 2: base + 2 + t.dim()] = torch.tensor(t.shape)
        return head.to(self.device)

    def _send(self, cmd: int, tensors: Sequence[torch.Tensor], *, value: int = 0, tag: int = 0) -> None:
        dist.broadcast(self._header(cmd, tensors, value=value, tag=tag), src=self.leader, group=self.group)
        for t in tensors:
            dist.broadcast(t.detach(), src=self.leader, group=self.group)

    def _receive(self, head: torch.Tensor) -> list[torch.Tensor]:
        tensors = []
        for k in range(int(head[1])):
            base = _HEAD + k * (2 + _MAX_DIMS)
            ndim, code = int(head[base]), int(head[base + 1])
            shape = tuple(int(d) for d in head[base + 2: base + 2 + ndim])
            t = torch.empty(shape, dtype=_CODE_DTYPES[code], device=self.device)
            dist.broadcast(t, src=self.leader, group=self.group)
            tensors.append(t)
        return tensors

    def lead(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = tuple(t.contiguous() for t in tensors)
        self._send(self.FORWARD, tensors)
        self.forwards += 1
        return tensors

    def watch(self, module: torch.nn.Module) -> None:
        """The leader's stage: its parameters' gradient accumulators tell a whole backward from one of
        the inputs' gradients only (:meth:`share_grad`)."""
        self._accumulators = []
        for param in module.parameters():
            if param.requires_grad and param.device.type != "meta":
                # a leaf's accumulator is made lazily: a view of it makes (and names) it
                self._accumulators.append(param.view_as(param).grad_fn.next_functions[0][0])

    def whole_backward(self) -> bool:
        """Inside a backward: whether it reaches the stage's parameters (False: inputs' gradients only)."""
        return any(torch._C._will_engine_execute_node(node) for node in self._accumulators)

    def share_grad(self, output: Any) -> Any:
        """The leader's stage output, whose backward first sends its gradient to the followers (a
        training step; outputs that need no gradient are returned as they are). Call :meth:`watch` first."""
        hidden = output[0] if isinstance(output, tuple) else output
        if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad):
            return output
        hidden = _ShareGrad.apply(hidden, self, self.forwards - 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def command(self, cmd: int, value: int = 0) -> None:
        dist.broadcast(self._header(cmd, value=value), src=self.leader, group=self.group)

    def follow(self, stage: Any, *, train: bool = False, input_grads: bool = False) -> None:
        """Follower loop: run the stage's forward on every input the leader shares, and in a training
        step (``train``) the backward of every output gradient it shares, until STOP.

        ``input_grads``: the stage's floating-point inputs take part in autograd, as the leader's
        received activations do (every stage but the first), so that the backward reaches the same
        collectives on every shard.
        """
        outputs: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        while True:
            head = self._header(self.STOP)
            dist.broadcast(head, src=self.leader, group=self.group)
            head = head.cpu()
            cmd = int(head[0])
            if cmd == self.STOP:
                return
            if cmd == self.BARRIER:
                outputs.clear()  # a step's end: forwards without a backward (shape inference) dropped
                dist.barrier()
                continue
            if cmd == self.SCALE:
                for param in stage.parameters():
                    if param.grad is not None:
                        param.grad.div_(int(head[2]))
                continue
            if cmd == self.ZERO:
                stage.zero_grad(set_to_none=True)
                continue
            tensors = self._receive(head)
            if cmd == self.BACKWARD:
                hidden, leaves = outputs.pop(int(head[3]))
                if int(head[2]):
                    torch.autograd.backward(hidden, tensors[0])
                elif leaves:
                    torch.autograd.grad(hidden, leaves, tensors[0])
                continue
            tag = self.forwards
            self.forwards += 1
            if not train:
                with torch.no_grad():
                    stage.compute(*tensors)
                continue
            if input_grads:
                tensors = [t.requires_grad_(True) if t.is_floating_point() else t for t in tensors]
            out = stage.compute(*tensors)
            hidden = out[0] if isinstance(out, tuple) else out
            if hidden.requires_grad:
                outputs[tag] = (hidden, [t for t in tensors if t.requires_grad])


class _ShareGrad(torch.autograd.Function):
    """Identity forward; backward sends the gradient to the stage's followers first (they then run the
    same backward on their shards)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sync: TensorParallelSync, tag: int) -> torch.Tensor:
        ctx.sync, ctx.tag = sync, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        whole = ctx.sync.whole_backward()
        ctx.sync._send(TensorParallelSync.BACKWARD, (grad,), value=int(whole), tag=ctx.tag)
        return grad, None, None


def barrier(sync: TensorParallelSync | None) -> None:
    """A world barrier that a stage's followers (waiting in :meth:`TensorParallelSync.follow`) join too."""
    if sync is not None:
        sync.command(TensorParallelSync.BARRIER)
    dist.barrier()
