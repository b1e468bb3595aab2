"""How many kernels a unit launches per micro-batch, counted from its shape and the workload.

A kernel here is one operator call that does work on the device (an ATen op that is not a view):
on a GPU one kernel launch, on a CPU one dispatched op. Each costs a fixed time besides its bytes
and FLOPs (``DeviceSpec.kernel_overhead_s``: the ``a`` of the small-kernel model ``T = a + V / b``),
which the cost model adds per kernel (see :mod:`cachefit.cost.roofline`).

The count is that of the reference eager PyTorch implementation, the Hugging Face ``transformers``
modelling code of the Llama family (``LlamaDecoderLayer`` and friends), op by op:

==========================  =======================================================================
component                    kernels
==========================  =======================================================================
RMSNorm                      6: ``pow``, ``mean``, ``+ eps``, ``rsqrt``, ``x *``, ``weight *``;
                             +2 casts (to fp32 and back) when activations are not fp32
LayerNorm                    1 (``native_layer_norm``)
q, k, v projections          3 GEMMs
rotary, per tensor (q, k)    5: ``q * cos``, ``neg`` and ``cat`` (``rotate_half``), ``* sin``, ``+``;
                             6 for partial rotary (one more ``cat`` for the pass-through part)
KV cache (decode)            2: the new keys and values appended (``torch.cat``)
eager attention              ``q k^T``, ``* scale``, ``+ mask``, softmax, ``p v`` = 5; +2 casts
                             (softmax in fp32) when activations are not fp32; copies to make the
                             operands of the batched matmuls contiguous: 4 when the query has more
                             than one token (q, k, v and the output; with GQA the two ``repeat_kv``
                             copies take the place of k and v), else 2 for GQA / MQA (``repeat_kv``)
                             and 0 for multi-head attention
flash attention              1 (``scaled_dot_product_attention``; GQA handled inside)
o projection                 1 GEMM
MLP, gated                   5: gate, activation, up, product, down; fused MLP 2 (gate-up-activation,
                             down)
MLP, not gated               3: up, activation, down; fused MLP 2
residual adds                2 (a parallel attention + MLP block: 2, with one norm instead of two)
dropout (train, if on)       1 per site: attention probabilities (eager only), attention output,
                             MLP output
==========================  =======================================================================

These counts were checked against the real modules (``transformers`` 5, torch 2.13, counting the
non-view ATen ops a ``TorchDispatchMode`` sees): a Llama decoder layer in fp32 at one token per
sequence launches 38 kernels in eager attention (37 without a mask), 34 with SDPA, 2 more in decode
with a cache, 5 more (eager) or 4 (SDPA) in bf16. Where the layout is not known from the shape the
count follows the Llama family: **RMSNorm is assumed for gated-MLP models, LayerNorm otherwise**
(Llama, Mistral, Qwen, Gemma, Mixtral versus GPT-2, OPT, BERT, GPT-NeoX, Falcon; T5 is an exception),
q, k and v are three projections (GPT-2's fused ``c_attn`` is one), an activation is one kernel
(GPT-2's ``gelu_new`` is written as 8 elementwise ops). Such differences move a layer's count by a
few kernels in 30 to 45.

Mixture of experts (approximate; the Hugging Face loop over experts is op-heavy): router GEMM,
softmax, top-k, the weights' sum and division, the one-hot expert mask (6), then for every expert
that receives a token (``min(experts, tokens x experts_per_token)``) a gather of its tokens, its MLP,
the routing-weight product and an ``index_add_`` (MLP + 3).

Embedding: one lookup per table and one add per extra table. Head: the final norm and the LM head
(one GEMM), or a pooler (dense and tanh: 2); train adds the loss (fp32 upcast, log-softmax, NLL: 3).
Model-level work outside every unit (rotary cos/sin tables, the attention mask, about 10 to 20 ops
per forward) is not counted.

**Train**: the backward pass launches about two kernels per forward kernel (a GEMM's gradient is two
GEMMs, one for the input and one for the weight; an elementwise op's one or two), so a training
micro-batch counts 3x the forward kernels, 4x with activation checkpointing (the forward is run
again). Compression and tensor-parallel shards do not change the count (a shard runs the same ops on
smaller tensors; its collectives are costed apart).
"""

from __future__ import annotations

import functools

from cachefit.errors import ConfigError
from cachefit.units import Attention, LayerShape, Mode, Unit, Workload

RMS_NORM_KERNELS = 6
"""``pow``, ``mean``, ``+ eps``, ``rsqrt``, ``x * rsqrt``, ``weight * x`` (``LlamaRMSNorm.forward``)."""
LAYER_NORM_KERNELS = 1
"""``torch.nn.functional.layer_norm`` is one ATen op (``native_layer_norm``)."""
ROTARY_KERNELS_PER_TENSOR = 5
"""``apply_rotary_pos_emb``: ``x * cos``, ``rotate_half(x)`` (``neg``, ``cat``), ``* sin``, ``+``."""
TRAIN_KERNEL_FACTOR = 3
"""Forward + backward kernels over forward kernels (about two backward kernels per forward one)."""

_PARTS = ("embedding", "layer", "attention", "mlp", "head")


def _half(workload: Workload) -> bool:
    """Activations below fp32: RMSNorm and the eager softmax cast to fp32 and back."""
    return workload.act_dtype != "fp32"


def _norm(shape: LayerShape, workload: Workload) -> int:
    if shape.gated_mlp:  # the Llama family: RMSNorm, computed in fp32
        return RMS_NORM_KERNELS + (2 if _half(workload) else 0)
    return LAYER_NORM_KERNELS


def _attention(shape: LayerShape, workload: Workload) -> list[tuple[str, int]]:
    """Kernels of the attention block after its norm: projections to the residual add."""
    out = [("q, k, v projections", 3)]
    if shape.rotary_dim:
        per_tensor = ROTARY_KERNELS_PER_TENSOR + (1 if shape.rotary_dim < shape.head_dim else 0)
        out.append(("rotary (q and k)", 2 * per_tensor))
    if workload.mode is Mode.DECODE:
        out.append(("kv cache append", 2))
    train_dropout = workload.mode is Mode.TRAIN and workload.dropout
    if workload.attention is Attention.EAGER:
        if workload.query_len > 1:
            copies = 4  # q, k, v (or their repeat_kv copies) and the output made contiguous
        else:
            copies = 2 if shape.num_heads != shape.num_kv_heads else 0  # repeat_kv of keys and values
        if copies:
            out.append(("contiguous copies", copies))
        out.append(("eager attention (qk, scale, mask, softmax, pv)", 5))
        if _half(workload):
            out.append(("softmax casts", 2))
        if train_dropout:
            out.append(("attention dropout", 1))
    else:
        out.append(("flash attention", 1))
    out.append(("o projection", 1))
    if train_dropout:
        out.append(("attention output dropout", 1))
    return out


def _mlp_kernels(shape: LayerShape, workload: Workload) -> int:
    if workload.fused_mlp:
        return 2
    return 5 if shape.gated_mlp else 3


def _mlp(shape: LayerShape, workload: Workload) -> list[tuple[str, int]]:
    """Kernels of the MLP block after its norm, before the residual add."""
    out: list[tuple[str, int]] = []
    if shape.num_experts:
        hit = min(shape.num_experts, workload.tokens * shape.experts_per_token)
        out.append(("router (gemm, softmax, top-k, normalize, expert mask)", 6))
        out.append((f"{hit} expert(s): gather, MLP, weight, index_add", hit * (_mlp_kernels(shape, workload) + 3)))
    else:
        out.append(("MLP", _mlp_kernels(shape, workload)))
    if workload.mode is Mode.TRAIN and workload.dropout:
        out.append(("MLP output dropout", 1))
    return out


def list_kernels(shape: LayerShape, workload: Workload) -> tuple[tuple[str, int], ...]:
    """The forward kernels of one unit, by component (see the module doc); they sum to the count.

    Raises:
        ConfigError: an unknown ``shape.part``.
    """
    part = shape.part
    if part not in _PARTS:
        raise ConfigError(f"LayerShape(part={part!r}): unknown part; use one of {', '.join(_PARTS)}")
    if part == "embedding":
        tables = max(1, shape.embedding_tables)
        out = [("lookups", tables)]
        if tables > 1:
            out.append(("table sums", tables - 1))
        return tuple(out)
    if part == "head":
        out = [("final norm", _norm(shape, workload))]
        if shape.vocab_size:
            out.append(("lm head", 1))
            if workload.mode is Mode.TRAIN:
                out.append(("loss (upcast, log-softmax, nll)", 3))
        else:
            out.append(("pooler (dense, tanh)", 2))
        return tuple(out)
    norm = _norm(shape, workload)
    if part == "attention":
        return (("norm", norm), *_attention(shape, workload), ("residual add", 1))
    if part == "mlp":
        return (("norm", norm), *_mlp(shape, workload), ("residual add", 1))
    if shape.parallel_attn_mlp:  # one norm feeds both blocks; attention + MLP + residual: 2 adds
        return (("norm", norm), *_attention(shape, workload), *_mlp(shape, workload), ("residual adds", 2))
    return (
        ("attention norm", norm),
        *_attention(shape, workload),
        ("attention residual add", 1),
        ("MLP norm", norm),
        *_mlp(shape, workload),
        ("MLP residual add", 1),
    )


@functools.lru_cache(maxsize=4096)
def count_forward_kernels(shape: LayerShape, workload: Workload) -> int:
    """Kernels one forward pass of the unit launches (the sum of :func:`list_kernels`). Cached: shapes
    and workloads are frozen, and a plan on thousands of cards prices the same units again and again."""
    return sum(n for _, n in list_kernels(shape, workload))


def count_kernels(shape: LayerShape, workload: Workload) -> int:
    """Kernels the unit launches per micro-batch: the forward's, times 3 in train (4 with checkpointing)."""
    forward = count_forward_kernels(shape, workload)
    if workload.mode is Mode.TRAIN:
        return forward * (TRAIN_KERNEL_FACTOR + (1 if workload.checkpointing else 0))
    return forward


def count_unit_kernels(unit: Unit, workload: Workload) -> int | None:
    """:func:`count_kernels` of the unit's shape; None for a unit without one (live-module profiles)."""
    if unit.shape is None:
        return None
    return count_kernels(unit.shape, workload)


__all__ = [
    "LAYER_NORM_KERNELS",
    "RMS_NORM_KERNELS",
    "ROTARY_KERNELS_PER_TENSOR",
    "TRAIN_KERNEL_FACTOR",
    "count_forward_kernels",
    "count_kernels",
    "count_unit_kernels",
    "list_kernels",
]
