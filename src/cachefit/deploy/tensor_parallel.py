"""Tensor-parallel shards: each card of a split unit keeps whole heads, KV groups, MLP columns and
vocabulary rows, split the way the planner counts them.

Megatron-LM's scheme (Shoeybi et al. 2019, sec. 3), written out rather than built from DTensor's
``ColwiseParallel`` / ``RowwiseParallel``, which cut a dimension in ``torch.chunk`` sizes: those do not
follow head boundaries when the card count does not divide the heads. Here every split follows
:mod:`cachefit.partition.split`. An even split (a plan stage without ``shard_parts``) is balanced:
sizes differ by at most one head, KV group, MLP column or vocabulary row, the first cards take the
larger ones, and the largest is the ceiling. A proportional split (cards of different sizes, the plan
stage's ``shard_parts``) gives each card the ranges the plan records, of any sizes.

* Column-parallel projections (query, key, value, MLP in) keep the output features of their card's
  heads / columns; their input is the replicated hidden state.
* Row-parallel projections (attention out, MLP out) keep the matching input features; their partial
  outputs are summed over the cards (an all-reduce), then the output bias is added once.
* The embedding keeps a range of the vocabulary: ids outside it give zeros, and the sum over the cards
  gives each id's row (an all-reduce). The LM head keeps the same range; the logits are gathered
  (an all-gather) and the padding dropped.

In an even split every card holds the **largest** shard's shapes: a smaller shard is padded with
zeros (at most one head, KV group, column or vocabulary row per tensor), as Megatron-LM pads its
vocabulary. So each card holds exactly the weight bytes the plan gives it (every card of an even split
gets the largest shard's figure), and the zeros change nothing: a zero value head's output is zero and
so is the input column of the row-parallel projection that reads it; a zero MLP column meets a zero
column of the down projection; a padded vocabulary row is never looked up and its logit is dropped.
In a proportional split each card holds its own ranges unpadded (the plan counts each card's own
bytes), and the logits are gathered by one broadcast from each card into its rows (gloo's
``all_gather`` needs equal sizes; padding every part to the largest would make a small card hold
``cards x`` the largest card's logits). The all-reduces sum full-width hidden states, the same on
every card either way.

Grouped-query attention: with no more cards than KV heads a card keeps whole KV groups (each with all
of its query heads); with more, each card keeps one KV head (a copy where several cards share it) and
part of that group's query heads, the groups' cards balanced as above. A proportional split's ranges
follow the same rule: a card's query heads are whole KV groups, or lie inside one group whose KV head
it holds a copy of.

The collectives are autograd functions with Megatron's backward (``f``: identity forward, all-reduce
backward, before a column-parallel projection; ``g``: all-reduce forward, identity backward, after a
row-parallel one; the gather's backward keeps the card's own slice), and the copies of a KV head shared
by several cards sum their gradients, so a backward through the shards gives each card the gradients
of the unsplit model's tensors it holds (zeros where it pads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cachefit.errors import ConfigError, DeployError
from cachefit.families import FamilySpec, TensorParallelSpec
from cachefit.partition.split import ShardParts

# --------------------------------------------------------------------------------------------
# How a dimension splits (no torch)
# --------------------------------------------------------------------------------------------


def balanced_ranges(total: int, shards: int) -> tuple[range, ...]:
    """``total`` items over ``shards`` cards in order: sizes differ by at most one, the first larger.

    ``balanced_ranges(7, 3)`` is ``(range(0, 3), range(3, 5), range(5, 7))``.
    """
    if shards < 1 or total < 0:
        raise ConfigError(f"cannot split {total} items over {shards} cards")
    base, extra = divmod(total, shards)
    out, start = [], 0
    for r in range(shards):
        size = base + (1 if r < extra else 0)
        out.append(range(start, start + size))
        start += size
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadSplit:
    """Which attention heads each card of a split runs, and the slots each card holds (the largest)."""

    num_heads: int
    num_kv_heads: int
    query: tuple[tuple[int, ...], ...]
    """Per card, the global indices of its query heads (in order)."""
    kv: tuple[tuple[int, ...], ...]
    """Per card, the global indices of its key / value heads."""
    padded: bool = True
    """Every card holds the largest card's head counts, smaller ones padded with zero heads (an even
    split); False: each card holds its own heads only (a proportional split)."""

    @property
    def query_slots(self) -> int:
        """Query heads the fullest card holds (in a padded split, every card)."""
        return max(len(q) for q in self.query)

    @property
    def kv_slots(self) -> int:
        """Key / value heads the fullest card holds (in a padded split, every card)."""
        return max(len(k) for k in self.kv)

    def slots(self, rank: int) -> tuple[int, int]:
        """(query heads, key / value heads) card ``rank`` holds, padding included."""
        if self.padded:
            return self.query_slots, self.kv_slots
        return len(self.query[rank]), len(self.kv[rank])

    @property
    def shared_kv(self) -> bool:
        """A KV head is held by several cards (a copy on each card reading it)."""
        return sum(len(k) for k in self.kv) > self.num_kv_heads


def split_heads(num_heads: int, num_kv_heads: int, shards: int) -> HeadSplit:
    """The heads of each of ``shards`` cards, query heads kept with the KV head they read.

    ``shards <= num_kv_heads``: whole KV groups, balanced. More cards than KV heads: the cards are dealt
    to the groups (balanced), and each group's query heads to its cards (balanced); a card keeps its
    group's KV head.

    Raises:
        ConfigError: the head counts are not positive, or the KV heads do not divide the query heads.
    """
    a, g, s = num_heads, num_kv_heads, shards
    if a < 1 or g < 1 or s < 1 or a % g:
        raise ConfigError(f"cannot split {a} attention heads with {g} key/value heads over {s} cards: the key/value "
                          "heads must divide the attention heads")
    per_group = a // g
    if s <= g:
        groups = balanced_ranges(g, s)
        query = tuple(tuple(h for k in grp for h in range(k * per_group, (k + 1) * per_group)) for grp in groups)
        return HeadSplit(num_heads=a, num_kv_heads=g, query=query, kv=tuple(tuple(grp) for grp in groups))
    query_heads: list[tuple[int, ...]] = []
    kv_heads: list[tuple[int, ...]] = []
    for group, cards in enumerate(balanced_ranges(s, g)):
        for part in balanced_ranges(per_group, len(cards)):
            query_heads.append(tuple(group * per_group + h for h in part))
            kv_heads.append((group,))
    return HeadSplit(num_heads=a, num_kv_heads=g, query=tuple(query_heads), kv=tuple(kv_heads))


def _check_tiling(name: str, ranges: Sequence[tuple[int, int] | None], total: int) -> tuple[range, ...]:
    """``ranges`` (one per card, in card order) as ranges, if they cover ``[0, total)`` once, in order."""
    out, start = [], 0
    for r, got in enumerate(ranges):
        if got is None or got[0] != start or not got[0] < got[1]:
            shown = [list(g) if g is not None else None for g in ranges]
            raise ConfigError(f"shard parts: {name} ranges {shown} do not cover [0, {total}) in card order "
                              f"(card {r} should start at {start}); regenerate the plan")
        out.append(range(*got))
        start = got[1]
    if start != total:
        shown = [list(g) for g in ranges if g is not None]
        raise ConfigError(f"shard parts: {name} ranges {shown} end at {start}, not at {total}; regenerate the plan")
    return tuple(out)


def part_ranges(parts: Sequence[ShardParts], name: str, total: int) -> tuple[range, ...]:
    """Each card's range of dimension ``name`` (``mlp_columns``, ``vocab``) in a proportional split.

    Raises:
        ConfigError: the cards' ranges do not cover ``[0, total)`` once, in card order.
    """
    return _check_tiling(name, [getattr(p, name) for p in parts], total)


def split_heads_from_parts(num_heads: int, num_kv_heads: int, parts: Sequence[ShardParts]) -> HeadSplit:
    """The heads of each card of a proportional split, as the plan's ``shard_parts`` record them.

    Each card's query heads are a range; its KV heads are those they read
    (:func:`cachefit.partition.split.kv_heads_read`), which are whole KV groups or one group's KV head
    (a copy where the group's query heads lie on several cards), as
    :func:`cachefit.partition.split.kv_heads_read` counts them. Nothing is padded.

    Raises:
        ConfigError: the query-head ranges do not cover every head once in card order, a card's KV
            heads are not those its query heads read, or a card holds part of a group beside others.
    """
    a, g = num_heads, num_kv_heads
    if a < 1 or g < 1 or a % g:
        raise ConfigError(f"cannot split {a} attention heads with {g} key/value heads: the key/value heads must "
                          "divide the attention heads")
    per_group = a // g
    query = _check_tiling("heads", [p.heads for p in parts], a)
    kv: list[tuple[int, ...]] = []
    for r, (p, q) in enumerate(zip(parts, query)):
        lo, hi = q.start // per_group, (q.stop - 1) // per_group + 1  # as cachefit.partition.split.kv_heads_read
        if hi - lo > 1 and (q.start % per_group or q.stop % per_group):
            raise ConfigError(f"shard parts: card {r} holds query heads [{q.start}, {q.stop}), which cut a group of "
                              f"{per_group} heads and span {hi - lo} key/value heads; a card holds whole groups or "
                              "part of one group; regenerate the plan")
        if p.kv_heads is not None and tuple(p.kv_heads) != (lo, hi):
            raise ConfigError(f"shard parts: card {r} holds query heads [{q.start}, {q.stop}), which read key/value "
                              f"heads [{lo}, {hi}), but the plan gives it {list(p.kv_heads)}; regenerate the plan")
        kv.append(tuple(range(lo, hi)))
    return HeadSplit(num_heads=a, num_kv_heads=g, query=tuple(tuple(q) for q in query), kv=tuple(kv), padded=False)


def _padded(index: Sequence[int], slots: int) -> list[int | None]:
    return [*index, *([None] * (slots - len(index)))]


def _head_features(heads: Sequence[int], slots: int, head_dim: int, offset: int = 0) -> list[int | None]:
    """Feature indices of ``heads`` (``head_dim`` each, from ``offset``), padded to ``slots`` heads."""
    feats = [offset + h * head_dim + c for h in heads for c in range(head_dim)]
    return _padded(feats, slots * head_dim)


# --------------------------------------------------------------------------------------------
# Collectives (Megatron's f, g and gather), autograd-aware
# --------------------------------------------------------------------------------------------


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over the cards (each holds a part)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverShards(torch.autograd.Function):
    """All-reduce forward (the partial outputs summed); the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherOverShards(torch.autograd.Function):
    """The logits of every card, concatenated along the last dimension; backward keeps the card's own slice.

    Card ``r`` computes ``sizes[r]`` logits a token. An even split (``padded``) holds the largest
    card's rows on every card (the rest zeros): one ``all_gather`` of equal parts (what gloo's needs),
    concatenated, the padding dropped after it. A proportional split's cards hold their own rows only:
    each card's part is broadcast from it straight into its rows of a vocabulary-major buffer (one
    broadcast per card, no padding), so a card holds its own logits and the gathered ones, whatever
    the other cards' sizes; the logits returned are that buffer's transposed view.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, sizes: tuple[int, ...],
                padded: bool) -> torch.Tensor:
        ctx.local, ctx.start, ctx.size = x.shape[-1], sum(sizes[:rank]), sizes[rank]
        x = x.contiguous()
        if padded:
            width = x.shape[-1]
            parts = [torch.empty_like(x) for _ in sizes]
            dist.all_gather(parts, x, group=group)
            logits = torch.cat(parts, dim=-1)
            if all(n == width for n in sizes):
                return logits
            return torch.cat([logits[..., r * width:r * width + n] for r, n in enumerate(sizes)], dim=-1)
        lead = x.shape[:-1]
        tokens = x.numel() // max(1, x.shape[-1])
        gathered = x.new_empty((sum(sizes), tokens))  # each card's rows contiguous, as broadcast needs
        start = 0
        for r, n in enumerate(sizes):
            rows = gathered[start:start + n]
            if r == rank:
                rows.copy_(x.reshape(tokens, n).t())
            dist.broadcast(rows, src=dist.get_global_rank(group, r), group=group)
            start += n
        return gathered.t().view(*lead, start)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        mine = grad[..., ctx.start:ctx.start + ctx.size]
        if ctx.local > ctx.size:  # padded rows get no gradient
            mine = F.pad(mine, (0, ctx.local - ctx.size))
        return mine.contiguous(), None, None, None, None


def _tracked(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def copy_to_shards(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The replicated input of a column-parallel layer (Megatron's ``f``)."""
    return _CopyToShards.apply(x, group) if _tracked(x) else x


def sum_over_shards(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of the cards' partial outputs (Megatron's ``g``); in place without autograd."""
    if _tracked(x):
        return _SumOverShards.apply(x, group)
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


# --------------------------------------------------------------------------------------------
# Sharded modules: they keep the replaced module's parameter names (``weight``, ``bias``), so the
# stage's tensors keep their FQNs (the byte check and the gradients read them by name)
# --------------------------------------------------------------------------------------------


def _parameter(t: torch.Tensor | None, like: torch.Tensor | None, dim: int = 0,
               index: Sequence[int | None] = ()) -> nn.Parameter | None:
    """``t`` as a parameter; where ``index`` pads it along ``dim``, its gradient is kept zero there.

    A padded slot can see a non-zero gradient (the zero input column of a row-parallel projection
    reading a padded query head that attends to a real KV head); masking it keeps the padding zero
    through any optimizer step, so the shard stays equal to the unsplit model's part.
    """
    if t is None:
        return None
    param = nn.Parameter(t, requires_grad=like.requires_grad if like is not None else True)
    if index and like is not None:
        param.unsplit_slices = (dim, tuple(index), tuple(like.shape))  # type: ignore[attr-defined]
    pads = [k for k, i in enumerate(index) if i is None]
    if pads and param.requires_grad:
        shape = [1] * param.dim()
        shape[dim] = len(index)
        keep = torch.ones(len(index), dtype=param.dtype, device=param.device)
        keep[pads] = 0
        keep = keep.view(shape)
        param.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return param


def unsplit_gradient(param: nn.Parameter) -> torch.Tensor | None:
    """A shard's gradient in the unsplit parameter's shape: its slices where they belong, zeros
    elsewhere (padding dropped; a KV head several cards hold, whose copies' gradients were summed over
    them, from the first of those cards only), so that the cards' tensors add up to the unsplit
    gradient. None for a parameter that is not a shard (replicated on every card)."""
    cut = getattr(param, "unsplit_slices", None)
    if cut is None or param.grad is None:
        return None
    dim, index, shape = cut
    grad = param.grad.detach()
    full = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    copy_dim, copies = getattr(param, "summed_copies", (dim, ()))
    if copy_dim != dim:
        raise DeployError(f"a shard of shape {tuple(param.shape)} sums KV-head copies along dimension {copy_dim}, "
                          f"but is split along {dim}")
    skip = set(copies)
    held = [k for k, i in enumerate(index) if i is not None and k not in skip]
    where = torch.tensor([index[k] for k in held], dtype=torch.long, device=grad.device)
    rows = grad.index_select(dim, torch.tensor(held, dtype=torch.long, device=grad.device))
    return full.index_add_(dim, where, rows)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    # transformers' Conv1D (pytorch_utils.py): weight (in, out), addmm on the flattened input
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


class _ShardedLinear(nn.Module):
    """A card's part of a linear layer (``transposed``: stored (in, out) as Conv1D), with the group
    its collectives run over."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, transposed: bool, group: Any) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.transposed = transposed
        self.group = group

    def extra_repr(self) -> str:
        return f"local_weight={tuple(self.weight.shape)}, transposed={self.transposed}"


class ColumnParallelLinear(_ShardedLinear):
    """The card's output features of a linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(copy_to_shards(x, self.group), self.weight, self.bias, self.transposed)


class RowParallelLinear(_ShardedLinear):
    """The card's input features of a linear layer; outputs summed over the cards, the bias added once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sum_over_shards(_project(x, self.weight, None, self.transposed), self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Rows ``start .. stop - 1`` of an embedding (padded); ids elsewhere give zeros, summed over cards."""

    def __init__(self, weight: nn.Parameter, *, start: int, stop: int, padding_idx: int | None, group: Any) -> None:
        super().__init__()
        self.weight = weight
        self.start, self.stop = start, stop
        # nn.Embedding's padding_idx only keeps that row's gradient at zero: the card holding it does so
        self.padding_idx = padding_idx - start if padding_idx is not None and start <= padding_idx < stop else None
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.padding_idx).masked_fill(outside.unsqueeze(-1), 0.0)
        return sum_over_shards(out, self.group)

    def extra_repr(self) -> str:
        return f"rows={self.start}..{self.stop - 1}, local_weight={tuple(self.weight.shape)}"


class VocabParallelHead(nn.Module):
    """An LM head over the card's vocabulary range; the logits gathered from every card, padding dropped.

    ``sizes``: real vocabulary rows per card. A card holds ``max(sizes)`` rows (an even split, smaller
    shards padded with zero rows) or exactly its own (a proportional split).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, sizes: Sequence[int], rank: int,
                 group: Any, padded: bool = True) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.sizes = tuple(sizes)
        """Real vocabulary rows per card."""
        self.padded = padded
        """Every card holds ``max(sizes)`` rows (an even split); False: its own rows only."""
        self.rank = rank
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(copy_to_shards(x, self.group), self.weight, self.bias)
        return _GatherOverShards.apply(local, self.group, self.rank, self.sizes, self.padded)

    def extra_repr(self) -> str:
        return f"rows_per_card={self.sizes}, padded={self.padded}, local_weight={tuple(self.weight.shape)}"


# --------------------------------------------------------------------------------------------
# Sharding a stage in place
# --------------------------------------------------------------------------------------------


def _take(t: torch.Tensor, dim: int, index: Sequence[int | None]) -> torch.Tensor:
    """``t`` indexed along ``dim`` by ``index``, zeros where it is None (padding)."""
    t = t.detach()
    shape = list(t.shape)
    shape[dim] = len(index)
    out = t.new_zeros(shape)
    real = [k for k, i in enumerate(index) if i is not None]
    if real:
        src = torch.tensor([index[k] for k in real], dtype=torch.long, device=t.device)
        dst = torch.tensor(real, dtype=torch.long, device=t.device)
        out.index_copy_(dim, dst, t.index_select(dim, src))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shard:
    """One card's view of a split: its index, the group, and the family's names."""

    rank: int
    shards: int
    group: Any
    spec: TensorParallelSpec
    transposed: tuple[str, ...]

    def is_transposed(self, weight_fqn: str) -> bool:
        return any(fnmatchcase(weight_fqn, pat) for pat in self.transposed)


def _module(root: nn.Module, fqn: str, where: str) -> nn.Module:
    try:
        module = root.get_submodule(fqn)
    except AttributeError:
        module = None
    if module is None:
        raise DeployError(f"{where}: the model has no module {fqn!r}; the family's TensorParallelSpec names "
                          "modules this model does not have")
    return module


def _replace(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, attr = fqn.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[attr] = new


def _out_features(module: nn.Module, transposed: bool) -> int:
    return int(module.weight.shape[1 if transposed else 0])


def _column(root: nn.Module, fqn: str, index: Sequence[int | None], shard: _Shard, where: str) -> None:
    old = _module(root, fqn, where)
    transposed = shard.is_transposed(f"{fqn}.weight")
    dim = 1 if transposed else 0
    weight = _take(old.weight, dim, index)
    bias = _take(old.bias, 0, index) if getattr(old, "bias", None) is not None else None
    _replace(root, fqn, ColumnParallelLinear(_parameter(weight, old.weight, dim, index),
                                             _parameter(bias, old.bias, 0, index),
                                             transposed=transposed, group=shard.group))


def _row(root: nn.Module, fqn: str, index: Sequence[int | None], shard: _Shard, where: str) -> None:
    old = _module(root, fqn, where)
    transposed = shard.is_transposed(f"{fqn}.weight")
    dim = 0 if transposed else 1
    weight = _take(old.weight, dim, index)
    bias = old.bias.detach() if getattr(old, "bias", None) is not None else None  # whole: added once
    _replace(root, fqn, RowParallelLinear(_parameter(weight, old.weight, dim, index), _parameter(bias, old.bias),
                                          transposed=transposed, group=shard.group))


def _shard_attention(root: nn.Module, layer: str, heads: HeadSplit, shard: _Shard, where: str) -> None:
    spec, r = shard.spec, shard.rank
    attention = _module(root, f"{layer}.{spec.attention}", where)
    qs, ks = heads.slots(r)
    if spec.fused_qkv is not None:
        fused = f"{layer}.{spec.fused_qkv}"
        module = _module(root, fused, where)
        a, g = heads.num_heads, heads.num_kv_heads
        head_dim, rest = divmod(_out_features(module, shard.is_transposed(f"{fused}.weight")), a + 2 * g)
        if rest:
            raise DeployError(f"{where}: {fused} has {_out_features(module, shard.is_transposed(f'{fused}.weight'))} "
                              f"outputs, not (heads {a} + 2 x KV heads {g}) x head dim")
        if qs != ks:
            raise DeployError(f"{where}: {fused} splits into equal q, k, v widths, but a card holds {qs} query and "
                              f"{ks} key/value heads")
        index = (_head_features(heads.query[r], qs, head_dim)
                 + _head_features(heads.kv[r], ks, head_dim, offset=a * head_dim)
                 + _head_features(heads.kv[r], ks, head_dim, offset=(a + g) * head_dim))
        _column(root, fused, index, shard, where)
        if heads.shared_kv:  # the k and v blocks follow the query block in the card's columns
            module = _module(root, fused, where)
            transposed = shard.is_transposed(f"{fused}.weight")
            for block in range(2):
                _sum_shared_kv_grads_(module, heads, shard, start=(qs + block * ks) * head_dim, head_dim=head_dim,
                                      transposed=transposed)
    else:
        query = f"{layer}.{spec.query}"
        head_dim = _out_features(_module(root, query, where), shard.is_transposed(f"{query}.weight")) // heads.num_heads
        _column(root, query, _head_features(heads.query[r], qs, head_dim), shard, where)
        for name in spec.key_value:
            _column(root, f"{layer}.{name}", _head_features(heads.kv[r], ks, head_dim), shard, where)
            if heads.shared_kv:
                _sum_shared_kv_grads_(_module(root, f"{layer}.{name}", where), heads, shard, start=0,
                                      head_dim=head_dim, transposed=shard.is_transposed(f"{layer}.{name}.weight"))
    _row(root, f"{layer}.{spec.attention_out}", _head_features(heads.query[r], qs, head_dim), shard, where)
    for attr in spec.head_count_attrs:
        setattr(attention, attr, qs)
    for attr in spec.head_width_attrs:
        setattr(attention, attr, qs * head_dim)
    if spec.group_attr is not None:
        setattr(attention, spec.group_attr, qs // ks)
    _sum_per_head_grads_(root, layer, shard, where)


def _sum_per_head_grads_(root: nn.Module, layer: str, shard: _Shard, where: str) -> None:
    """The parameters the attention holds whole besides its projections (Qwen3's ``q_norm`` /
    ``k_norm``: an RMSNorm weight shared by every head) act on the card's own heads, so each card
    sees its heads' part of their gradient: summed over the cards (one all-reduce each, the same on
    every card), every copy gets the unsplit gradient and stays equal to the others. The output
    projection's whole bias is left alone: it is added after the sum, and sees the whole gradient."""
    spec = shard.spec
    attention = _module(root, f"{layer}.{spec.attention}", where)
    out_prefix = spec.attention_out.removeprefix(f"{spec.attention}.") + "."
    for name, param in attention.named_parameters():
        if name.startswith(out_prefix) or hasattr(param, "unsplit_slices") or not param.requires_grad:
            continue

        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=shard.group)
            return grad

        param.register_hook(hook)


def _sum_shared_kv_grads_(module: nn.Module, heads: HeadSplit, shard: _Shard, *, start: int, head_dim: int,
                          transposed: bool) -> None:
    """Sum the gradients of a KV head's copies over the cards holding one (several cards read it).

    Each copy sees the gradient of its own card's query heads only; the unsplit KV head's is their
    sum. The features ``start ..`` of ``module`` (``head_dim`` per KV head) are the card's KV heads,
    global heads ``kv[0] .. kv[-1]``; every card adds its part at those heads' place in a buffer of
    every KV head's features, summed over the group (one all-reduce, the same on every card, so the
    cards' backward passes stay in step). A KV head held by one card only gets its own gradient back.
    """
    kv = heads.kv[shard.rank]
    width, offset = len(kv) * head_dim, kv[0] * head_dim
    # after the sum every copy holds the whole gradient: the unsplit one counts it once, from the
    # first card holding the head (unsplit_gradient leaves the other copies out)
    copies = [j * head_dim + f for j, h in enumerate(kv)
              if next(r for r, held in enumerate(heads.kv) if h in held) != shard.rank for f in range(head_dim)]
    for param, dim in ((module.weight, 1 if transposed else 0), (getattr(module, "bias", None), 0)):
        if param is None or not param.requires_grad:
            continue
        param.summed_copies = (dim, tuple(start + f for f in copies))  # type: ignore[attr-defined]

        def hook(grad: torch.Tensor, dim: int = dim) -> torch.Tensor:
            shape = list(grad.shape)
            shape[dim] = heads.num_kv_heads * head_dim
            buffer = grad.new_zeros(shape)
            buffer.narrow(dim, offset, width).copy_(grad.narrow(dim, start, width))
            dist.all_reduce(buffer, group=shard.group)
            out = grad.clone()
            out.narrow(dim, start, width).copy_(buffer.narrow(dim, offset, width))
            return out

        param.register_hook(hook)


def _index(ranges: Sequence[range], rank: int, padded: bool) -> list[int | None]:
    """Card ``rank``'s indices: its range, padded to the largest range's length where ``padded``."""
    return _padded(ranges[rank], max(len(rg) for rg in ranges) if padded else len(ranges[rank]))


def _card_ranges(parts: Sequence[ShardParts] | None, name: str, total: int, shards: int) -> tuple[range, ...]:
    """Each card's range of ``name``: the plan's recorded ranges, or balanced sizes (an even split)."""
    if parts is None:
        return balanced_ranges(total, shards)
    return part_ranges(parts, name, total)


def _shard_mlp(root: nn.Module, layer: str, shard: _Shard, where: str,
               parts: Sequence[ShardParts] | None = None) -> None:
    spec = shard.spec
    first = f"{layer}.{spec.mlp_in[0]}"
    columns = _out_features(_module(root, first, where), shard.is_transposed(f"{first}.weight"))
    ranges = _card_ranges(parts, "mlp_columns", columns, shard.shards)
    index = _index(ranges, shard.rank, padded=parts is None)
    for name in spec.mlp_in:
        _column(root, f"{layer}.{name}", index, shard, where)
    _row(root, f"{layer}.{spec.mlp_out}", index, shard, where)


def _shard_embedding(root: nn.Module, fqn: str, shard: _Shard, where: str,
                     parts: Sequence[ShardParts] | None = None) -> None:
    old = _module(root, fqn, where)
    ranges = _card_ranges(parts, "vocab", old.weight.shape[0], shard.shards)
    mine = ranges[shard.rank]
    index = _index(ranges, shard.rank, padded=parts is None)
    weight = _take(old.weight, 0, index)
    _replace(root, fqn, VocabParallelEmbedding(_parameter(weight, old.weight, 0, index), start=mine.start,
                                               stop=mine.stop, padding_idx=getattr(old, "padding_idx", None),
                                               group=shard.group))


def _shard_head(root: nn.Module, fqn: str, shard: _Shard, where: str,
                parts: Sequence[ShardParts] | None = None) -> None:
    old = _module(root, fqn, where)
    if shard.is_transposed(f"{fqn}.weight"):
        raise DeployError(f"{where}: {fqn} stores its weight (in, out); cachefit splits LM heads of nn.Linear only")
    ranges = _card_ranges(parts, "vocab", old.weight.shape[0], shard.shards)
    index = _index(ranges, shard.rank, padded=parts is None)
    weight = _take(old.weight, 0, index)
    bias = _take(old.bias, 0, index) if getattr(old, "bias", None) is not None else None
    _replace(root, fqn, VocabParallelHead(_parameter(weight, old.weight, 0, index),
                                          _parameter(bias, old.bias, 0, index), sizes=[len(rg) for rg in ranges],
                                          rank=shard.rank, group=shard.group, padded=parts is None))


def model_head_counts(config: Any) -> tuple[int, int]:
    """(attention heads, key/value heads) from a ``transformers`` config (KV heads default to heads)."""
    heads = int(config.num_attention_heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads)


def shard_stage_(root: nn.Module, steps: Sequence[tuple[str, int | None]], family: FamilySpec, *, rank: int,
                 shards: int, group: Any, where: str,
                 parts: Sequence[Sequence[ShardParts]] | None = None) -> None:
    """Replace the split units' modules of ``root`` by this card's shards, in place.

    ``steps``: the stage's units as ``(kind, layer index)`` (``embed``, ``layer``, ``attn``, ``mlp``,
    ``head``). ``parts``: for a proportional split, per step, every card's
    :class:`~cachefit.partition.split.ShardParts` (the plan stages' ``shard_parts``), which each card
    holds unpadded; None: an even split in balanced sizes, padded to the largest. The weights are cut
    from the materialized unsplit tensors, so ``root`` holds each card's part only afterwards.

    Raises:
        ConfigError: ``parts`` do not give every step every card's ranges, covering each dimension once.
        DeployError: the family runs no split units, or its spec names modules the model lacks.
    """
    spec = family.tensor_parallel
    if spec is None:
        raise DeployError(f"{where}: family {family.name} has no TensorParallelSpec; its units run whole")
    if not 0 <= rank < shards:
        raise DeployError(f"{where}: card index {rank} is outside a split over {shards} cards")
    if parts is not None and (len(parts) != len(steps) or any(len(p) != shards for p in parts)):
        raise ConfigError(f"{where}: shard parts must give each of the {len(steps)} units the ranges of all "
                          f"{shards} cards; regenerate the plan")
    shard = _Shard(rank=rank, shards=shards, group=group, spec=spec, transposed=family.transposed_weights)
    counts = model_head_counts(root.config)
    even_heads = split_heads(*counts, shards) if parts is None else None
    for k, (kind, i) in enumerate(steps):
        cards = parts[k] if parts is not None else None
        if kind == "embed" and spec.embedding is not None:
            _shard_embedding(root, spec.embedding, shard, where, cards)
        elif kind == "head" and spec.head is not None:
            _shard_head(root, spec.head, shard, where, cards)
        if kind in ("layer", "attn"):
            heads = even_heads if cards is None else split_heads_from_parts(*counts, cards)
            assert heads is not None
            _shard_attention(root, spec.layer.format(i=i), heads, shard, where)
        if kind in ("layer", "mlp"):
            _shard_mlp(root, spec.layer.format(i=i), shard, where, cards)


__all__ = [
    "ColumnParallelLinear",
    "HeadSplit",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "balanced_ranges",
    "copy_to_shards",
    "model_head_counts",
    "part_ranges",
    "shard_stage_",
    "split_heads",
    "split_heads_from_parts",
    "sum_over_shards",
]
