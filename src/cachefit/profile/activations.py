"""Activation bytes and forward FLOPs of a transformer unit, recomputed from its shapes.

``estimate_activations(shape, workload)`` is a pure function of a :class:`~cachefit.units.LayerShape`
and a :class:`~cachefit.units.Workload`, so compression can ask again with another workload (flash
attention, a fused MLP, checkpointing, a smaller batch) or another shape (fewer MLP columns).

Both are liveness walks over op graphs: every op writes new tensors; a tensor is live from the op
that writes it to the last op that reads it, and the unit's activation peak is the largest sum of
live tensors over its ops. ``parts`` names the tensors live at that op.

Inference (prefill, decode): the ops of the forward that really runs, the family's ``transformers``
modules, with the Python references that keep tensors alive written as reads (a layer's input held by
its caller, ``inputs_embeds`` held through every layer, eager attention's probabilities held through
the MLP, fp32 softmax and norm temporaries, a ``DynamicCache``'s concatenation); the per-family facts
come from ``shape.forward`` (:class:`~cachefit.units.ForwardSpec`). It is never below the peak that
forward holds and at most 1.35x it (tests/profile/test_activation_peaks.py measures every family).
Decode adds the KV cache, which stays resident.

Train: the tensors autograd saves for backward (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv:2205.05198, sec. 4.1, generalized term by term)
stay resident, and on top of them the gradients of the backward pass, whose liveness mirrors an
idealized forward walk (every tensor freed after its last reader). docs/activations.md derives every
formula and gives the source line of every inference term.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from cachefit.errors import ConfigError
from cachefit.units import Attention, KVCache, LayerShape, Mode, Workload, dtype_bytes

PARTS: tuple[str, ...] = ("embedding", "layer", "attention", "mlp", "head")

# torch.nn.Embedding looks up int64 indices (torch.long): 8 bytes per token.
_INDEX_BYTES = 8
# Dropout masks are torch.bool (aten::native_dropout): 1 byte per element.
_MASK_BYTES = 1
# Flash attention's log-sum-exp (softmax statistics) is fp32 whatever the activation dtype
# (FlashAttention-2, Dao 2023, Algorithm 1: L_i saved for the backward pass).
_LSE_BYTES = 4
# Hugging Face's causal-LM loss upcasts logits to fp32 before cross-entropy
# (transformers ``loss/loss_utils.py``, ``ForCausalLMLoss``: ``logits = logits.float()``).
_LOSS_BYTES = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationEstimate:
    """Activation and workspace bytes of one unit under one workload."""

    activation_bytes: int
    """Peak of the activations live while the unit runs (persistent part included)."""
    persistent_bytes: int
    """The part that stays resident after the unit returns (KV cache in decode; saved-for-backward in train)."""
    buffer_bytes: int
    """Workspace: attention mask, rotary cos/sin tables."""
    parts: tuple[tuple[str, int], ...] = ()
    """The tensors that make the activation peak; sums to ``activation_bytes``."""
    buffer_parts: tuple[tuple[str, int], ...] = ()
    """The buffers; sums to ``buffer_bytes``."""

    def __post_init__(self) -> None:
        for name in ("activation_bytes", "persistent_bytes", "buffer_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"activation estimate: {name} must be a non-negative int of bytes, got {value!r}")
        if self.persistent_bytes > self.activation_bytes:
            raise ConfigError(
                f"activation estimate: persistent {self.persistent_bytes} B exceeds the peak {self.activation_bytes} B"
            )
        for name, total, parts in (
            ("parts", self.activation_bytes, self.parts),
            ("buffer_parts", self.buffer_bytes, self.buffer_parts),
        ):
            if sum(v for _, v in parts) != total:
                raise ConfigError(f"activation estimate: {name} sum to {sum(v for _, v in parts)} B, not {total} B")

    @property
    def transient_bytes(self) -> int:
        """Scratch freed when the unit returns."""
        return self.activation_bytes - self.persistent_bytes


# --------------------------------------------------------------------------------------------------
# The op graph and its liveness walk


@dataclass(frozen=True, slots=True)
class _Op:
    name: str
    block: str  # "attn", "mlp", "embed", "head": which unit part runs it
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]  # names not in the graph (the KV cache, weights) cost nothing here


@dataclass(slots=True)
class _Graph:
    sizes: dict[str, int] = field(default_factory=dict)  # tensor -> bytes, in creation order
    ops: list[_Op] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # live before the first op
    outputs: list[str] = field(default_factory=list)  # live after the last op

    def add_input(self, name: str, nbytes: int) -> None:
        self.sizes[name] = nbytes
        self.inputs.append(name)

    def add_op(self, name: str, block: str, outputs: dict[str, int], inputs: tuple[str, ...]) -> None:
        for tensor, nbytes in outputs.items():
            self.sizes[tensor] = nbytes
        self.ops.append(_Op(name, block, tuple(outputs), inputs))

    def intervals(self) -> dict[str, tuple[int, int]]:
        """Op index range [first, last] over which each tensor is allocated."""
        start = {t: -1 for t in self.inputs}
        end = {t: -1 for t in self.inputs}
        for i, op in enumerate(self.ops):
            for t in op.outputs:
                start[t] = i
                end[t] = i  # written and never read: freed right after its op
            for t in op.inputs:
                if t in self.sizes:
                    end[t] = max(end[t], i)
        for t in self.outputs:
            end[t] = len(self.ops)
        return {t: (start[t], end[t]) for t in self.sizes}

    def peak(self, blocks: tuple[str, ...]) -> tuple[int, tuple[tuple[str, int], ...]]:
        """Largest sum of live tensors over the ops of ``blocks``, and the tensors live there."""
        spans = self.intervals()
        best: tuple[int, tuple[tuple[str, int], ...]] = (-1, ())
        for i, op in enumerate(self.ops):
            if op.block not in blocks:
                continue
            live = tuple((t, self.sizes[t]) for t, (lo, hi) in spans.items() if lo <= i <= hi)
            total = sum(b for _, b in live)
            if total > best[0]:
                best = (total, live)
        return best if best[0] >= 0 else (0, ())

    def block_inputs(self, blocks: tuple[str, ...]) -> tuple[str, ...]:
        """Tensors written before the first op of ``blocks`` and still live there: the block's inputs."""
        spans = self.intervals()
        first = min(i for i, op in enumerate(self.ops) if op.block in blocks)
        return tuple(t for t, (lo, hi) in spans.items() if lo < first <= hi)


@dataclass(frozen=True, slots=True)
class _Dims:
    batch: int  # B
    tokens: int  # N = B x T, tokens per step
    query_len: int  # T (1 in decode)
    kv_len: int  # keys each query attends to (decode: the cache, capped by a sliding window)
    hidden: int  # h
    heads: int  # a
    kv_heads: int
    head_dim: int  # d
    inter: int  # f (per expert)
    experts: int  # E (0: dense)
    top_k: int  # experts per token


def _dims(shape: LayerShape, workload: Workload) -> _Dims:
    kv_len = workload.kv_len
    if workload.mode is Mode.DECODE and shape.sliding_window:
        # A sliding-window cache keeps only the last `window` tokens. Eager prefill still
        # materializes the full seq_len x seq_len score matrix (the window lives in the mask).
        kv_len = min(kv_len, shape.sliding_window)
    return _Dims(
        batch=workload.batch,
        tokens=workload.tokens,
        query_len=workload.query_len,
        kv_len=kv_len,
        hidden=shape.hidden_size,
        heads=shape.num_heads,
        kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        inter=shape.intermediate_size,
        experts=shape.num_experts,
        top_k=shape.experts_per_token if shape.num_experts else 0,
    )


def _check_shape(shape: LayerShape) -> None:
    where = f"LayerShape(part={shape.part!r})"
    if shape.part not in PARTS:
        raise ConfigError(f"{where}: unknown part; use one of {', '.join(PARTS)}")
    if shape.hidden_size < 1:
        raise ConfigError(f"{where}: hidden_size must be >= 1, got {shape.hidden_size}")
    if shape.part in ("layer", "attention"):
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(shape, name) < 1:
                raise ConfigError(f"{where}: {name} must be >= 1 for an attention block, got {getattr(shape, name)}")
        if shape.num_heads % shape.num_kv_heads:
            raise ConfigError(
                f"{where}: num_heads ({shape.num_heads}) is not a multiple of num_kv_heads ({shape.num_kv_heads})"
            )
        if not 0 <= shape.rotary_dim <= shape.head_dim:
            raise ConfigError(f"{where}: rotary_dim {shape.rotary_dim} outside 0..head_dim ({shape.head_dim})")
        if shape.sliding_window is not None and shape.sliding_window < 1:
            raise ConfigError(f"{where}: sliding_window must be >= 1 or None, got {shape.sliding_window}")
    if shape.part in ("layer", "mlp"):
        if shape.intermediate_size < 1:
            raise ConfigError(f"{where}: intermediate_size must be >= 1, got {shape.intermediate_size}")
        if shape.num_experts < 0 or (shape.num_experts and not 1 <= shape.experts_per_token <= shape.num_experts):
            raise ConfigError(
                f"{where}: experts_per_token ({shape.experts_per_token}) must be in "
                f"1..num_experts ({shape.num_experts})"
            )
    if shape.vocab_size < 0:
        raise ConfigError(f"{where}: vocab_size must be >= 0, got {shape.vocab_size}")
    if shape.embedding_tables < 1:
        raise ConfigError(f"{where}: embedding_tables must be >= 1, got {shape.embedding_tables}")


# --------------------------------------------------------------------------------------------------
# Train: the idealized forward op graphs (the walk the gradients mirror). Tensor names are the
# ``parts`` names.


def _add_moe_ops(g: _Graph, shape: LayerShape, workload: Workload, n: int, mlp_in: str,
                 add_mlp: Callable[..., str], *, combine_reads: tuple[str, ...] = ()) -> str:
    """A mixture-of-experts MLP: the router (logits, softmax, top-k), the routed tokens gathered, each
    token-expert pair through an expert MLP (``add_mlp``), their outputs combined; returns the output's name."""
    dims = _dims(shape, workload)
    h = dims.hidden

    def b(numel: int) -> int:
        return dtype_bytes(workload.act_dtype, numel)

    pairs = n * dims.top_k  # token-expert pairs: only routed tokens flow through an expert
    g.add_op("router", "mlp", {"router_logits": b(n * dims.experts)}, (mlp_in,))
    g.add_op("router_softmax", "mlp", {"router_probs": b(n * dims.experts)}, ("router_logits",))
    topk = {"routing_weights": b(pairs), "expert_index": pairs * _INDEX_BYTES}
    g.add_op("router_topk", "mlp", topk, ("router_probs",))
    g.add_op("expert_gather", "mlp", {"expert_in": b(pairs * h)}, (mlp_in, "expert_index"))
    expert_out = add_mlp(g, shape, workload, pairs, "expert_in", "expert_")
    g.add_op("expert_combine", "mlp", {"moe_out": b(n * h)},
             (expert_out, "routing_weights", "expert_index", *combine_reads))
    return "moe_out"


def _add_mlp_ops(g: _Graph, shape: LayerShape, workload: Workload, rows: int, x_in: str, prefix: str) -> str:
    """Up (+ gate), activation, down over ``rows`` tokens; returns the name of the down output."""
    act = workload.act_dtype
    inter = dtype_bytes(act, rows * shape.intermediate_size)
    if shape.gated_mlp:
        if workload.fused_mlp:
            # One kernel computes act(gate(x)) * up(x): only its product is materialized.
            g.add_op(f"{prefix}gate_up_act", "mlp", {f"{prefix}hidden": inter}, (x_in,))
        else:
            # Llama order: down(act(gate(x)) * up(x)) evaluates gate, act, up, then the product.
            g.add_op(f"{prefix}gate_proj", "mlp", {f"{prefix}gate": inter}, (x_in,))
            g.add_op(f"{prefix}act_fn", "mlp", {f"{prefix}act": inter}, (f"{prefix}gate",))
            g.add_op(f"{prefix}up_proj", "mlp", {f"{prefix}up": inter}, (x_in,))
            g.add_op(f"{prefix}mul", "mlp", {f"{prefix}hidden": inter}, (f"{prefix}act", f"{prefix}up"))
        down_in = f"{prefix}hidden"
    else:
        if workload.fused_mlp:
            g.add_op(f"{prefix}up_act", "mlp", {f"{prefix}act": inter}, (x_in,))
        else:
            g.add_op(f"{prefix}up_proj", "mlp", {f"{prefix}up": inter}, (x_in,))
            g.add_op(f"{prefix}act_fn", "mlp", {f"{prefix}act": inter}, (f"{prefix}up",))
        down_in = f"{prefix}act"
    out = f"{prefix}down_out"
    g.add_op(f"{prefix}down_proj", "mlp", {out: dtype_bytes(act, rows * shape.hidden_size)}, (down_in,))
    return out


def _layer_graph(shape: LayerShape, workload: Workload) -> _Graph:
    """Forward ops of one transformer layer (attention block, then MLP block)."""
    dims = _dims(shape, workload)
    act = workload.act_dtype
    n, h, a, kv, d = dims.tokens, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    train = workload.mode is Mode.TRAIN
    dropout = train and workload.dropout  # dropout is the identity in inference
    eager = workload.attention is Attention.EAGER

    def b(numel: int) -> int:
        return dtype_bytes(act, numel)

    g = _Graph()
    g.add_input("residual", b(n * h))
    g.add_op("attn_norm", "attn", {"attn_norm": b(n * h)}, ("residual",))
    g.add_op("q_proj", "attn", {"q": b(n * a * d)}, ("attn_norm",))
    g.add_op("k_proj", "attn", {"k": b(n * kv * d)}, ("attn_norm",))
    g.add_op("v_proj", "attn", {"v": b(n * kv * d)}, ("attn_norm",))
    q, k, v = "q", "k", "v"
    if shape.rotary_dim:
        # apply_rotary_pos_emb returns new tensors q_embed, k_embed.
        g.add_op("rotary_q", "attn", {"q_rot": b(n * a * d)}, (q,))
        g.add_op("rotary_k", "attn", {"k_rot": b(n * kv * d)}, (k,))
        q, k = "q_rot", "k_rot"
    kv_numel = dims.batch * dims.kv_len * kv * d
    if workload.mode is Mode.DECODE:
        # The new key/value are written into the pre-allocated cache in place; attention then
        # reads the whole cache (persistent, counted outside the walk). A cache stored in another
        # dtype than the activations is read through a dequantized copy of keys and values.
        deq = {}
        if workload.kv_cache_dtype != act:
            deq = {"k_dequant": b(kv_numel), "v_dequant": b(kv_numel)}
        g.add_op("kv_cache_update", "attn", deq, (k, v))
        k, v = ("k_dequant", "v_dequant") if deq else ("kv_cache.k", "kv_cache.v")
    scores = dims.batch * a * dims.query_len * dims.kv_len
    if eager:
        if a != kv:
            # repeat_kv expands GQA/MQA keys and values to every query head (a copy).
            rep = b(dims.batch * a * dims.kv_len * d)
            g.add_op("repeat_k", "attn", {"k_rep": rep}, (k,))
            g.add_op("repeat_v", "attn", {"v_rep": rep}, (v,))
            k, v = "k_rep", "v_rep"
        g.add_op("qk", "attn", {"scores": b(scores)}, (q, k))
        g.add_op("softmax", "attn", {"probs": b(scores)}, ("scores",))  # out of place: both live
        p = "probs"
        if dropout:
            masked = {"probs_dropout": b(scores), "probs_dropout_mask": scores * _MASK_BYTES}
            g.add_op("attn_dropout", "attn", masked, (p,))
            p = "probs_dropout"
        g.add_op("pv", "attn", {"context": b(n * a * d)}, (p, v))
    else:
        # A fused kernel keeps scores in on-chip tiles; it writes the context and a B x a x T
        # fp32 log-sum-exp, and needs no repeated keys/values for GQA.
        lse = dims.batch * a * dims.query_len * _LSE_BYTES
        g.add_op("flash_attention", "attn", {"context": b(n * a * d), "lse": lse}, (q, k, v))
    g.add_op("o_proj", "attn", {"attn_out": b(n * h)}, ("context",))
    attn_out = "attn_out"
    if dropout:
        dropped = {"attn_out_dropped": b(n * h), "attn_out_dropout_mask": n * h * _MASK_BYTES}
        g.add_op("attn_out_dropout", "attn", dropped, (attn_out,))
        attn_out = "attn_out_dropped"
    if shape.parallel_attn_mlp:
        # GPT-J / Falcon: the MLP reads the attention's normed input; both outputs are summed.
        mlp_in = "attn_norm"
    else:
        g.add_op("attn_residual", "attn", {"attn_residual_out": b(n * h)}, ("residual", attn_out))
        g.add_op("mlp_norm", "mlp", {"mlp_norm": b(n * h)}, ("attn_residual_out",))
        mlp_in = "mlp_norm"
    if dims.experts:
        mlp_out = _add_moe_ops(g, shape, workload, n, mlp_in, _add_mlp_ops)
    else:
        mlp_out = _add_mlp_ops(g, shape, workload, n, mlp_in, "")
    if dropout:
        dropped = {"mlp_out_dropped": b(n * h), "mlp_dropout_mask": n * h * _MASK_BYTES}
        g.add_op("mlp_dropout", "mlp", dropped, (mlp_out,))
        mlp_out = "mlp_out_dropped"
    if shape.parallel_attn_mlp:
        g.add_op("residual_sum", "mlp", {"layer_out": b(n * h)}, ("residual", attn_out, mlp_out))
    else:
        g.add_op("mlp_residual", "mlp", {"layer_out": b(n * h)}, ("attn_residual_out", mlp_out))
    g.outputs.append("layer_out")
    return g


def _embedding_graph(shape: LayerShape, workload: Workload) -> _Graph:
    act = workload.act_dtype
    out = dtype_bytes(act, workload.tokens * shape.hidden_size)
    g = _Graph()
    proj = shape.forward.embed_proj_dim
    if proj:
        # OPT: a token lookup proj wide, projected to h (project_in keeps its input in train).
        g.add_op("token_lookup", "embed", {"token_lookup": dtype_bytes(act, workload.tokens * proj)}, ())
        g.add_op("project_in", "embed", {"token_embeds": out}, ("token_lookup",))
    else:
        g.add_op("token_lookup", "embed", {"token_embeds": out}, ())
    running = "token_embeds"
    for i in range(1, shape.embedding_tables):
        # Learned position / token-type lookups, each up to B x T x h, summed out of place.
        g.add_op(f"lookup_{i}", "embed", {f"table_{i}_embeds": out}, ())
        g.add_op(f"embed_sum_{i}", "embed", {f"embed_sum_{i}": out}, (running, f"table_{i}_embeds"))
        running = f"embed_sum_{i}"
    g.outputs.append(running)
    return g


def _head_graph(shape: LayerShape, workload: Workload) -> _Graph:
    act = workload.act_dtype
    n, h = workload.tokens, shape.hidden_size
    g = _Graph()
    g.add_input("residual", dtype_bytes(act, n * h))
    g.add_op("final_norm", "head", {"final_norm": dtype_bytes(act, n * h)}, ("residual",))
    normed = "final_norm"
    if shape.forward.embed_proj_dim:
        # OPT: project_out maps the normed states back to the token lookup's width for the LM head.
        g.add_op("project_out", "head", {"projected": dtype_bytes(act, n * shape.forward.embed_proj_dim)}, (normed,))
        normed = "projected"
    if shape.vocab_size:
        # Logits for every position of the step (prefill: all T; decode: the one new token).
        g.add_op("lm_head", "head", {"logits": dtype_bytes(act, n * shape.vocab_size)}, (normed,))
        out = "logits"
        if workload.mode is Mode.TRAIN:
            logits_fp32 = n * shape.vocab_size * _LOSS_BYTES
            g.add_op("loss_upcast", "head", {"logits_fp32": logits_fp32}, ("logits",))
            g.add_op("log_softmax", "head", {"log_probs": logits_fp32}, ("logits_fp32",))
            g.add_op("nll_loss", "head", {"loss": _LOSS_BYTES}, ("log_probs",))
            out = "loss"
    else:
        # No LM head: a pooler (BERT) on the first token of each sequence, dense + tanh.
        pooled = dtype_bytes(act, workload.batch * h)
        g.add_op("pooler_dense", "head", {"pooled": pooled}, ("final_norm",))
        g.add_op("pooler_act", "head", {"pooler_out": pooled}, ("pooled",))
        out = "pooler_out"
    g.outputs.append(out)
    return g


# --------------------------------------------------------------------------------------------------
# Inference (prefill, decode): the reference forward, transformers' modules as they run
#
# The train walk above frees every tensor after its last reader. The modules that really run hold more,
# through Python references: the caller holds a layer's input until the layer returns, the model's
# forward holds the token embeddings (and learned position lookups) through every layer, a module's
# argument lives until the module returns, eager attention's probabilities are returned and kept by
# the layer through its MLP, and a few ops work in fp32 beside their 16-bit tensors. The graphs below
# model those references as reads (a tensor lives until its last reader) and graph outputs (live to
# the end of the unit). docs/activations.md lists each term with the source line it follows.


def _norm_op(
    g: _Graph, name: str, block: str, x: str, numel: int, rows: int, workload: Workload, shape: LayerShape,
    keep: tuple[str, ...] = (),
) -> str:
    """A norm of ``numel`` elements in ``rows`` rows: its output and the workspace live inside it."""
    out = dtype_bytes(workload.act_dtype, numel)
    if shape.forward.norm in ("rms", "rms_fp32"):
        # LlamaRMSNorm: x.to(fp32), x.pow(2), x * rsqrt(var + eps), weight * x.to(dtype); GemmaRMSNorm
        # likewise in fp32 to the end. Beside the input, two input-sized fp32 tensors are alive at
        # every step (8 bytes per element, the output included) and, at x * rsqrt(...), the fp32
        # variance and its rsqrt per row.
        workspace = max(8 * numel - out, 0) + 8 * rows
        if shape.forward.norm == "rms_fp32":
            # GemmaRMSNorm's output * (1.0 + weight.float()): the fp32 (1 + weight) row beside the
            # normalized tensor and the product, when the per-row statistics are gone.
            workspace = max(8 * numel - out, 0) + max(8 * rows, 4 * (numel // rows))
    else:
        # nn.LayerNorm (aten.native_layer_norm): the output plus an fp32 mean and rstd per row.
        workspace = 8 * rows
    outputs = {name: out, **({f"{name}.workspace": workspace} if workspace else {})}
    if workload.mode is Mode.TRAIN:
        outputs[f"{name}.saved"] = _norm_saved_bytes(shape, workload, numel, rows)
    g.add_op(name, block, outputs, (x, *keep))
    return name


def _norm_saved_bytes(shape: LayerShape, workload: Workload, numel: int, rows: int) -> int:
    """What autograd keeps for a norm's backward beyond its input (kept too) and its output (the next
    linear's input): the fp32 tensors of an RMSNorm, the mean and rstd of a LayerNorm."""
    narrow = dtype_bytes(workload.act_dtype, 1) < 4
    if shape.forward.norm == "rms":
        # LlamaRMSNorm: pow and the rsqrt product keep the fp32 input (x.to(float32), a copy in 16-bit)
        # and the rsqrt per row; weight * x.to(input_dtype) keeps its second factor (the 16-bit cast, or
        # in fp32 the normalized tensor itself).
        return 4 * numel + 4 * rows + dtype_bytes(workload.act_dtype, numel)
    if shape.forward.norm == "rms_fp32":
        # GemmaRMSNorm: x.float() (a copy in 16-bit) and the rsqrt, then output * (1.0 + weight.float())
        # keeps the fp32 normalized tensor and the fp32 (1 + weight) row.
        return (4 * numel if narrow else 0) + 4 * numel + 4 * rows + 4 * (numel // rows)
    return 8 * rows  # native_layer_norm keeps its input, the mean and the rstd


def _position_ids(shape: LayerShape, workload: Workload) -> tuple[dict[str, int], dict[str, int]]:
    """(held, transient) bytes of the position indices the model's forward computes before the layers."""
    # torch.arange(T) + past_seen_tokens, unsqueezed to 1 x T (int64): the arange is freed after the add.
    t = workload.query_len
    held, transient = {"position_ids": _INDEX_BYTES * t}, {"position_ids.arange": _INDEX_BYTES * t}
    if shape.forward.position_lookup == "batched":
        # OPT: positions from a cumsum over a B x S fp32 mask of ones (torch.ones, cumsum,
        # (cumsum * mask - 1).long()): the mask and the int64 positions stay alive through every
        # layer; two more fp32 B x S tensors live while they are made.
        bs = workload.batch * workload.kv_len
        held |= {"position_mask": 4 * bs, "positions": _INDEX_BYTES * bs}
        transient = {"positions.workspace": 8 * bs}
    return held, transient


def _position_lookup_bytes(shape: LayerShape, workload: Workload) -> int:
    """Bytes of the learned position lookup (0 without one): 1 x T x h broadcast, or B x T x h."""
    lookup = shape.forward.position_lookup
    if lookup == "none":
        return 0
    rows = workload.query_len if lookup == "broadcast" else workload.tokens
    return dtype_bytes(workload.act_dtype, rows * shape.hidden_size)


def _caller_held(shape: LayerShape, workload: Workload) -> dict[str, int]:
    """What the model's forward holds through every layer (and its final norm), beside the input.

    The token embeddings (``inputs_embeds``; BERT's embedding output) are held to the end; in the
    first layer they are the layer's input itself unless a position lookup was added to them.
    """
    fw = shape.forward
    # GPT-2's and OPT's forward add the position lookup themselves and keep it; an embedding closed by
    # a norm (BERT) is one module whose lookups are freed when it returns its output.
    positions = _position_lookup_bytes(shape, workload) if not fw.embedding_norm else 0
    # The token ids (B x T int64) are the forward's argument: the caller holds them until it returns.
    held: dict[str, int] = {"input_ids": _INDEX_BYTES * workload.tokens}
    if not (shape.first_layer and not positions):
        held["inputs_embeds"] = dtype_bytes(workload.act_dtype, workload.tokens * shape.hidden_size)
    if positions:
        held["position_embeds"] = positions
    held.update(_position_ids(shape, workload)[0])
    if fw.caller_holds_probs and workload.attention is Attention.EAGER and not shape.first_layer:
        # Falcon's forward holds the previous layer's (output, probabilities) until the next returns.
        dims = _dims(shape, workload)
        held["previous_probs"] = dtype_bytes(workload.act_dtype, dims.batch * dims.heads * dims.query_len * dims.kv_len)
    return held


def _add_reference_mlp_ops(
    g: _Graph, shape: LayerShape, workload: Workload, rows: int, x_in: str, prefix: str
) -> str:
    """The MLP of the reference forward over ``rows`` tokens; returns the name of its output.

    Its input is the MLP module's argument, alive until the module returns (the down projection).
    """
    act, fw = workload.act_dtype, shape.forward
    inter = dtype_bytes(act, rows * shape.intermediate_size)
    hidden_out = dtype_bytes(act, rows * shape.hidden_size)
    p = prefix
    if workload.fused_mlp:
        # One kernel computes the activated intermediate (cachefit's fused MLP, not transformers').
        down_in = f"{p}hidden" if shape.gated_mlp else f"{p}act"
        g.add_op(f"{p}fused_up_act", "mlp", {down_in: inter}, (x_in,))
        keep: tuple[str, ...] = ()
    elif shape.gated_mlp and fw.fused_gate_up:
        # Phi-3: gate_up = gate_up_proj(x); gate, up = gate_up.chunk(2); up * act(gate). The chunks are
        # views, so the 2f-wide output lives until the MLP returns.
        g.add_op(f"{p}gate_up_proj", "mlp", {f"{p}gate_up": 2 * inter}, (x_in,))
        g.add_op(f"{p}act_fn", "mlp", {f"{p}act": inter}, (f"{p}gate_up",))
        g.add_op(f"{p}mul", "mlp", {f"{p}hidden": inter}, (f"{p}act", f"{p}gate_up"))
        down_in, keep = f"{p}hidden", (f"{p}gate_up",)
    elif shape.gated_mlp:
        # Llama: down(act(gate(x)) * up(x)) evaluates gate, act, up, then the product.
        g.add_op(f"{p}gate_proj", "mlp", {f"{p}gate": inter}, (x_in,))
        g.add_op(f"{p}act_fn", "mlp", {f"{p}act": inter}, (f"{p}gate",))
        g.add_op(f"{p}up_proj", "mlp", {f"{p}up": inter}, (x_in,))
        g.add_op(f"{p}mul", "mlp", {f"{p}hidden": inter}, (f"{p}act", f"{p}up"))
        down_in, keep = f"{p}hidden", ()
    else:
        g.add_op(f"{p}up_proj", "mlp", {f"{p}up": inter}, (x_in,))
        # A Python activation (GPT-2's gelu_new: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))))
        # keeps more MLP-width temporaries alive than its input and output.
        temporaries = {f"{p}act_fn.workspace": fw.activation_temporaries * inter} if fw.activation_temporaries else {}
        if fw.activation_temporaries and workload.mode is Mode.TRAIN:
            # Autograd keeps one more of them: gelu_new's 0.5 * x, tanh's output and 1 + tanh(...) beside
            # its input (the up projection's output, kept too).
            temporaries[f"{p}act_fn.saved"] = inter
        g.add_op(f"{p}act_fn", "mlp", {f"{p}act": inter, **temporaries}, (f"{p}up",))
        down_in, keep = f"{p}act", ()
    out = f"{p}down_out"
    g.add_op(f"{p}down_proj", "mlp", {out: hidden_out}, (down_in, x_in, *keep))
    return out


def _reference_layer_graph(shape: LayerShape, workload: Workload) -> _Graph:
    """One layer (or its attention / MLP block) of the reference forward, in prefill or decode."""
    dims = _dims(shape, workload)
    act, fw = workload.act_dtype, shape.forward
    n, h, a, kv, d = dims.tokens, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    eager = workload.attention is Attention.EAGER

    def b(numel: int) -> int:
        return dtype_bytes(act, numel)

    g = _Graph()
    # Live from before the first op to after the last: the layer's input (its caller holds it until
    # the layer returns) and what the model's forward holds through every layer.
    g.add_input("residual", b(n * h))
    for name, nbytes in _caller_held(shape, workload).items():
        g.add_input(name, nbytes)
    if workload.mode is Mode.DECODE and workload.kv_cache is KVCache.STATIC:
        # StaticLayer keeps an int64 fill counter (``cumulative_length = torch.tensor(0, dtype=int)``) beside
        # its keys and values, one per micro-batch's cache; kept with the layer's activations here so that
        # ``persistent_bytes`` stays the keys and values.
        g.add_input("kv_cache.length", _INDEX_BYTES * workload.micro_batches)
    held = list(g.inputs)
    if fw.post_norm:
        # BERT: the attention reads the layer's input; the norms follow the residual adds.
        x_attn = "residual"
    else:
        x_attn = _norm_op(g, "attn_norm", "attn", "residual", n * h, n, workload, shape)
        if fw.layer_holds_attn_norm and not shape.parallel_attn_mlp:
            # Falcon: ``attention_layernorm_out = self.input_layernorm(hidden_states)``, a local of the
            # layer never rebound, lives through the MLP until the layer returns.
            held.append(x_attn)
    if shape.parallel_attn_mlp:
        # Falcon (new decoder architecture) normalizes for the MLP before the attention and holds both
        # normed inputs until the layer returns; GPT-NeoX normalizes for the MLP after the attention
        # (an upper bound by N x h there).
        _norm_op(g, "mlp_norm", "attn", "residual", n * h, n, workload, shape)
        held += ["attn_norm", "mlp_norm"]
    if fw.fused_qkv:
        # One projection; q, k and v are views of its output, alive while any of them is.
        g.add_op("qkv_proj", "attn", {"qkv": b(n * (a + 2 * kv) * d)}, (x_attn,))
        q = k = v = "qkv"
    else:
        g.add_op("q_proj", "attn", {"q": b(n * a * d)}, (x_attn,))
        g.add_op("k_proj", "attn", {"k": b(n * kv * d)}, (x_attn,))
        g.add_op("v_proj", "attn", {"v": b(n * kv * d)}, (x_attn,))
        q, k, v = "q", "k", "v"
    if fw.qk_norm:
        # Qwen3: q_norm(q_proj(x).view(..., d)) over every head, then k the same way.
        q = _norm_op(g, "q_norm", "attn", q, n * a * d, n * a, workload, shape)
        k = _norm_op(g, "k_norm", "attn", k, n * kv * d, n * kv, workload, shape, keep=(q,))
    if shape.rotary_dim:
        # apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin); beside x and its output, two
        # rotated-width temporaries are alive at once. Both inputs live until both outputs exist.
        rd = shape.rotary_dim
        g.add_op("rotary_q", "attn", {"q_rot": b(n * a * d), "rotary_q.workspace": 2 * b(n * a * rd)}, (q,))
        g.add_op("rotary_k", "attn", {"k_rot": b(n * kv * d), "rotary_k.workspace": 2 * b(n * kv * rd)}, (k, q))
        q, k = "q_rot", "k_rot"
    # q, k, v are the attention module's locals until it returns (after the output projection).
    module_locals = tuple(dict.fromkeys((q, k, v)))
    kv_numel = dims.batch * dims.kv_len * kv * d
    if workload.mode is Mode.DECODE:
        # The step's key/value go into the cache; attention then reads the whole cache (persistent,
        # counted outside the walk). A static cache is written in place (index_copy_). A DynamicCache
        # grows by torch.cat(old, new): while the values are concatenated, the new keys, the old
        # values and the new values are alive, one S-token half more than the cache itself.
        update: dict[str, int] = {}
        if workload.kv_cache is KVCache.DYNAMIC:
            # A sliding-window layer (DynamicSlidingWindowLayer) concatenates keys and values before
            # trimming either: the whole cache twice.
            halves = 2 if shape.sliding_window is not None or fw.attention_masks > 1 else 1
            update["kv_cache.grown"] = halves * dtype_bytes(workload.kv_cache_dtype, kv_numel)
        g.add_op("kv_cache_update", "attn", update, (k, v))
        k, v = "kv_cache.k", "kv_cache.v"
        if workload.kv_cache_dtype != act:
            # A cache in another dtype is read through dequantized copies of keys and values.
            g.add_op("kv_dequant", "attn", {"k_dequant": b(kv_numel), "v_dequant": b(kv_numel)}, ())
            k, v = "k_dequant", "v_dequant"
    scores = dims.batch * a * dims.query_len * dims.kv_len
    if eager:
        rep = b(dims.batch * a * dims.kv_len * d)
        # With one KV head, repeat_kv's reshape is a view of the expanded keys and values; a matmul
        # over more than one sequence copies its expanded operand (its batch x head dims do not fold
        # into one stride), but only while it runs.
        one_kv = kv == 1 < a and dims.batch > 1
        k_copy, v_copy = ({"qk.k_copy": rep}, {"pv.v_copy": rep}) if one_kv else ({}, {})
        if 1 < kv < a:
            # repeat_kv: expand + reshape copies keys and values to every query head. Both copies
            # live until eager_attention_forward returns.
            g.add_op("repeat_k", "attn", {"k_rep": rep}, (k,))
            g.add_op("repeat_v", "attn", {"v_rep": rep}, (v, "k_rep"))
            k, v = "k_rep", "v_rep"
        # matmul(q, k^T) * scaling + mask: each out of place, the previous one freed after the next.
        if workload.mode is Mode.TRAIN:
            # matmul over 4-D operands runs bmm on reshaped copies of the transposed query and keys
            # (and, at PV, of the values), which autograd keeps: B x a x S x d each.
            k_copy = {"qk.saved": 2 * rep}
            v_copy = {"pv.saved": rep}
        g.add_op("qk", "attn", {"scores": b(scores), **k_copy}, (q, k))
        g.add_op("scale", "attn", {"scores_scaled": b(scores)}, ("scores",))
        g.add_op("mask_add", "attn", {"scores_masked": b(scores)}, ("scores_scaled",))
        if fw.softmax_fp32 and dtype_bytes(act, 1) < _LSE_BYTES:
            # softmax(x, dtype=torch.float32).to(dtype): an fp32 copy of the scores and the fp32
            # probabilities beside the 16-bit masked scores, then the 16-bit probabilities beside the fp32 ones.
            fp32 = {"probs_fp32": 4 * scores, "softmax.fp32_input": 4 * scores}
            g.add_op("softmax", "attn", fp32, ("scores_masked",))
            g.add_op("probs_cast", "attn", {"probs": b(scores)}, ("probs_fp32", "scores_masked"))
        else:
            g.add_op("softmax", "attn", {"probs": b(scores)}, ("scores_masked",))
        g.add_op("pv", "attn", {"context": b(n * a * d), **v_copy}, ("probs", v, k))
        # attn_output.transpose(1, 2).contiguous(): a copy, while the function's locals still live.
        g.add_op("context_copy", "attn", {"context_t": b(n * a * d)}, ("context", k, v))
        # The attention returns its probabilities; the layer keeps them (``hidden_states, _ = ...``)
        # until it returns.
        held.append("probs")
    else:
        # torch's fused SDPA (the CPU flash kernel; CUDA's flash / memory-efficient kernels alike):
        # the context and an fp32 log-sum-exp of B x a x T; GQA runs without repeated copies
        # (enable_gqa without a mask, or the decode step packed per KV head). With a mask in prefill
        # transformers' sdpa_attention_forward repeats keys and values first (repeat_kv).
        # transformers then transposes the context contiguous (a copy).
        if fw.sdpa_mask and 1 < kv < a and dims.query_len > 1:
            rep = b(dims.batch * a * dims.kv_len * d)
            g.add_op("repeat_k", "attn", {"k_rep": rep}, (k,))
            g.add_op("repeat_v", "attn", {"v_rep": rep}, (v, "k_rep"))
            k, v = "k_rep", "v_rep"
        lse = dims.batch * a * dims.query_len * _LSE_BYTES
        sdpa_out = {"context": b(n * a * d), "lse": lse}
        if _sdpa_gets_mask(shape, workload):
            # torch turns a boolean mask into an additive one in the query's dtype while SDPA runs.
            sdpa_out["sdpa.float_mask"] = b(dims.batch * dims.query_len * dims.kv_len)
        g.add_op("sdpa", "attn", sdpa_out, (q, k, v))
        g.add_op("context_copy", "attn", {"context_t": b(n * a * d)}, ("context", k, v))
    # The normed input is the attention module's argument (and the layer's local) until it returns.
    g.add_op("o_proj", "attn", {"attn_out": b(n * h)}, ("context_t", x_attn, *module_locals))
    if shape.parallel_attn_mlp:
        mlp_in = "mlp_norm"
    elif fw.post_norm:
        # BertSelfOutput: LayerNorm(dense(context) + input); the dense output lives until it returns.
        g.add_op("attn_residual", "attn", {"attn_sum": b(n * h)}, ("residual", "attn_out"))
        mlp_in = _norm_op(g, "attn_residual_out", "attn", "attn_sum", n * h, n, workload, shape, keep=("attn_out",))
    else:
        g.add_op("attn_residual", "attn", {"attn_residual_out": b(n * h)}, ("residual", "attn_out"))
        # GPT-2 keeps the attention output in a local (``attn_output``) through the MLP; Llama-style
        # layers rebind it (an upper bound by N x h there).
        held.append("attn_out")
        mlp_in = _norm_op(g, "mlp_norm", "mlp", "attn_residual_out", n * h, n, workload, shape)
    if dims.experts:
        # the reference forward keeps the router's input through the combine
        mlp_out = _add_moe_ops(g, shape, workload, n, mlp_in, _add_reference_mlp_ops, combine_reads=(mlp_in,))
    else:
        mlp_out = _add_reference_mlp_ops(g, shape, workload, n, mlp_in, "")
    if shape.parallel_attn_mlp:
        # mlp_out + attn_out + hidden_states (GPT-NeoX; Falcon adds the attention output in place).
        g.add_op("attn_mlp_sum", "mlp", {"attn_mlp_out": b(n * h)}, (mlp_out, "attn_out"))
        # mlp_output and attn_output are the layer's locals until it returns, beside the partial sum
        # (GPT-NeoX's ``mlp_output + attn_output + hidden_states``: two out-of-place adds).
        g.add_op("residual_sum", "mlp", {"layer_out": b(n * h)}, ("attn_mlp_out", "residual", mlp_out, "attn_out"))
    elif fw.post_norm:
        # BertOutput: LayerNorm(dense(intermediate) + attention_output). Its argument, the activated
        # intermediate, is also BertLayer.feed_forward_chunk's local ``intermediate_output``: alive until
        # the output module returns.
        intermediate = "act" if not shape.gated_mlp else "hidden"
        keep_out = (mlp_out, "attn_residual_out", intermediate)
        g.add_op("mlp_residual", "mlp", {"mlp_sum": b(n * h)}, keep_out)
        _norm_op(g, "layer_out", "mlp", "mlp_sum", n * h, n, workload, shape, keep=keep_out)
    else:
        g.add_op("mlp_residual", "mlp", {"layer_out": b(n * h)}, ("attn_residual_out", mlp_out))
    g.outputs.extend(["layer_out", *held])
    return g


def _reference_embedding_graph(shape: LayerShape, workload: Workload) -> _Graph:
    """The embedding of the reference forward: lookups, their sums, a norm or a scale, positions."""
    act, fw = workload.act_dtype, shape.forward
    n, h = workload.tokens, shape.hidden_size
    out = dtype_bytes(act, n * h)
    g = _Graph()
    # The token ids (B x T int64), the forward's argument, live while the model runs.
    g.add_input("input_ids", _INDEX_BYTES * n)
    proj = fw.embed_proj_dim
    if fw.embedding_scale:
        # Gemma: embedding(ids) * sqrt(h), out of place.
        g.add_op("token_lookup", "embed", {"token_lookup": out}, ())
        g.add_op("embed_scale", "embed", {"inputs_embeds": out}, ("token_lookup",))
    elif proj:
        # OPT with word_embed_proj_dim != h: ``inputs_embeds = self.embed_tokens(input_ids)`` is proj
        # wide and lives through the position lookup, until ``self.project_in(inputs_embeds)`` rebinds it
        # (which keeps it for backward in train).
        g.add_op("token_lookup", "embed", {"token_lookup": dtype_bytes(act, n * proj)}, ())
    else:
        g.add_op("token_lookup", "embed", {"inputs_embeds": out}, ())
    held, transient = _position_ids(shape, workload)
    g.add_op("position_ids", "embed", {**held, **transient}, ("token_lookup",) if proj else ())
    kept = ["inputs_embeds", *held]
    running = "inputs_embeds"
    position = _position_lookup_bytes(shape, workload)

    def project_in() -> None:
        if proj and "inputs_embeds" not in g.sizes:
            g.add_op("project_in", "embed", {"inputs_embeds": out}, ("token_lookup",))

    for i in range(1, shape.embedding_tables):
        # Each lookup is summed out of place; the lookups are locals alive until the embedding
        # returns (GPT-2's and OPT's forward keep them through every layer), each running sum until
        # the next one exists. A learned position lookup is the first extra table here.
        if i == 1 and position:
            name, nbytes = "position_embeds", position
        else:
            name, nbytes = f"table_{i}_embeds", out
        lookup = {name: nbytes}
        if i == 1 and fw.position_lookup == "batched" and workload.mode is Mode.TRAIN:
            # OPT's embed_positions looks up ``position_ids + self.offset``, a new int64 B x T tensor that
            # the embedding's backward keeps.
            lookup[f"lookup_{i}.saved"] = _INDEX_BYTES * workload.tokens
        g.add_op(f"lookup_{i}", "embed", lookup, ("token_lookup",) if proj else ())
        project_in()
        g.add_op(f"embed_sum_{i}", "embed", {f"embed_sum_{i}": out}, (running, name))
        kept.append(name)
        running = f"embed_sum_{i}"
    project_in()
    if fw.embedding_norm:
        running = _norm_op(g, "embedding_norm", "embed", running, n * h, n, workload, shape)
    g.outputs.extend(dict.fromkeys([running, *kept, "input_ids"]))
    return g


def _reference_head_graph(shape: LayerShape, workload: Workload) -> _Graph:
    """Final norm and LM head (or pooler) of the reference forward.

    The final norm runs inside the model's forward, which still holds the token embeddings (and
    position lookups), the masks and the rotary tables; the LM head runs after it returned, on the
    normed states.
    """
    act = workload.act_dtype
    n, h = workload.tokens, shape.hidden_size
    g = _Graph()
    g.add_input("residual", dtype_bytes(act, n * h))
    caller = _caller_held(shape, workload)
    if shape.causal:
        # (An encoder given no padding mask builds none: its attention units count one as an upper
        # bound, its small pooler head does not.)
        caller |= dict(_attention_tables(shape, workload))
    for name, nbytes in caller.items():
        g.add_input(name, nbytes)
    if not shape.forward.post_norm:
        keep: tuple[str, ...] = (_norm_op(g, "final_norm", "head", "residual", n * h, n, workload, shape, keep=tuple(caller)),)
        if shape.forward.embed_proj_dim:
            # OPTDecoder: ``hidden_states = self.project_out(hidden_states)`` after the final norm, still
            # inside the model's forward (which holds what it held through the layers); the LM head
            # reads the proj-wide states.
            projected = dtype_bytes(act, n * shape.forward.embed_proj_dim)
            g.add_op("project_out", "head", {"projected": projected}, (*keep, *caller))
            keep = ("projected",)
    elif not shape.vocab_size:
        # A post-norm encoder (BERT): the last layer's output norm closes the stack; the pooler reads
        # the sequence output inside the model's forward, which still holds the embedding output.
        keep = ("residual", *caller)
    else:
        # BertForMaskedLM: the LM head runs after BertModel returned (``sequence_output = outputs[0]``,
        # ``self.cls(sequence_output)``), so only the sequence output and the token ids are held; its
        # BertPredictionHeadTransform runs dense, the activation and a LayerNorm, each rebinding
        # ``hidden_states``, before the decoder.
        keep = ("residual", "input_ids")
        hidden = dtype_bytes(act, n * h)
        g.add_op("head_transform_dense", "head", {"head_transform_dense": hidden}, keep)
        g.add_op("head_transform_act", "head", {"head_transform_act": hidden}, ("head_transform_dense", *keep))
        keep = (*keep, _norm_op(g, "head_transform_norm", "head", "head_transform_act", n * h, n, workload, shape,
                                keep=keep))
    if shape.vocab_size:
        logits = dtype_bytes(act, n * shape.vocab_size)
        g.add_op("lm_head", "head", {"logits": logits}, keep)
        out = "logits"
        if shape.forward.logit_softcap:
            # Gemma 2: logits / cap, tanh, * cap, each out of place: two logits-sized tensors at once.
            g.add_op("logit_softcap", "head", {"logits_capped": logits}, ("logits", *keep))
            out = "logits_capped"
        if workload.mode is Mode.TRAIN:
            out = _add_reference_loss_ops(g, shape, workload, out)
    else:
        # No LM head: a pooler (BERT) on the first token of each sequence, dense + tanh.
        pooled = dtype_bytes(act, workload.batch * h)
        g.add_op("pooler_dense", "head", {"pooled": pooled}, keep)
        g.add_op("pooler_act", "head", {"pooler_out": pooled}, ("pooled", *keep))
        out = "pooler_out"
    # The token ids are the forward's argument: its caller holds them after the model's forward returns.
    g.outputs.extend([out, "input_ids"])
    return g


def _add_reference_loss_ops(g: _Graph, shape: LayerShape, workload: Workload, logits: str) -> str:
    """The loss the model computes from its logits and the token ids as labels (train)."""
    nv = workload.tokens * shape.vocab_size
    if shape.causal:
        # ForCausalLMLoss: ``logits = logits.float()`` (a copy in 16-bit, while the model's forward still
        # holds the 16-bit logits), labels padded by one and shifted (``nn.functional.pad(labels, (0, 1))``,
        # ``labels[..., 1:].contiguous()``, int64), then cross-entropy, whose log-softmax output autograd keeps.
        narrow = dtype_bytes(workload.act_dtype, 1) < 4
        g.add_op("loss_upcast", "head", {"logits_fp32": 4 * nv} if narrow else {}, (logits,))
        upcast = "logits_fp32" if narrow else logits
        labels = _INDEX_BYTES * (workload.batch * (workload.query_len + 1) + workload.tokens)
        g.add_op("loss_labels", "head", {"shift_labels": labels}, (logits, upcast))
        g.add_op("log_softmax", "head", {"log_probs": 4 * nv}, (logits, upcast, "shift_labels"))
    else:
        # BertForMaskedLM: CrossEntropyLoss over the logits in their own dtype.
        g.add_op("log_softmax", "head", {"log_probs": dtype_bytes(workload.act_dtype, nv)}, (logits,))
    # aten.nll_loss_forward returns the loss and its total weight, two fp32 scalars.
    g.add_op("nll_loss", "head", {"loss": 2 * _LOSS_BYTES}, ("log_probs", logits))
    return "loss"


# Ops of the reference forward whose first input autograd keeps for the backward pass: a linear's
# input (its weight gradient), an activation's input.
_KEEPS_FIRST_INPUT = ("_proj", "project_in", "project_out", "lm_head", "pooler_dense", "head_transform_dense",
                      "head_transform_act", "act_fn", "router", "fused_up_act")


def _train_forward_peak(shape: LayerShape, workload: Workload) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Peak of the real forward in train: the reference forward (transformers' modules as they run)
    with every tensor that autograd keeps for the unit's backward alive from its op to the unit's end.

    The saved set of the Korthikanti accounting (``persistent_bytes``) idealizes the modules: it leaves
    out the fp32 copies that an RMSNorm and an fp32 softmax keep, the reshaped copies that a 4-D matmul
    keeps, a Python activation's intermediates, and the Python references the reference walk follows.
    """
    builders = {"embedding": _reference_embedding_graph, "head": _reference_head_graph}
    g = builders.get(shape.part, _reference_layer_graph)(shape, workload)
    blocks = tuple(blk for grp in _blocks_of(shape.part) for blk in grp)
    kept: list[str] = []
    for op in g.ops:
        if op.block not in blocks:
            continue  # another unit's saved tensors are its own (and live only as long as read here)
        name = op.name
        kept.extend(t for t in op.outputs if t.endswith(".saved"))
        if f"{name}.saved" in op.outputs and op.inputs and not name.endswith(("qk", "pv", "act_fn")):
            kept.append(op.inputs[0])  # a norm keeps its input (LayerNorm; RMSNorm in fp32)
        if name.endswith("act_fn"):
            kept.extend(t for t in op.outputs if t.endswith(".workspace"))  # a Python activation's intermediates
        if name == "lm_head":
            kept.append(op.inputs[-1])  # the normed states (its other inputs are what the caller holds)
        elif name.endswith(_KEEPS_FIRST_INPUT):
            kept.append(op.inputs[0])
        elif name.endswith("mul"):
            kept.extend(op.inputs[:2])  # act(gate) * up keeps both factors
        elif name in ("qk", "pv"):
            kept.extend(op.inputs[:2])  # q and k; the probabilities and v
        elif name == "sdpa":
            kept.extend((*op.inputs, "context", "lse"))  # the flash kernel keeps q, k, v, its output and LSE
        elif name in ("softmax", "probs_cast", "log_softmax"):
            kept.extend(t for t in op.outputs if t in ("probs_fp32", "probs", "log_probs"))
    g.outputs.extend(t for t in dict.fromkeys(kept) if t in g.sizes and t not in g.outputs)
    return g.peak(blocks)


# --------------------------------------------------------------------------------------------------
# Train: tensors saved for backward (Korthikanti et al. 2022, sec. 4.1, term by term)


def _saved_layer(shape: LayerShape, workload: Workload, blocks: tuple[str, ...]) -> list[tuple[str, int, str | None]]:
    """(name, bytes, graph tensor it is) of every tensor autograd keeps for the backward pass.

    The paper's per-layer count for 16-bit activations, MHA, f = 4h, with dropout, eager softmax:
    attention 11sbh + 5as^2b, MLP 19sbh, two layer norms 4sbh; total sbh(34 + 5as/h).
    """
    dims = _dims(shape, workload)
    act = workload.act_dtype
    n, h, a, kv, d, f = dims.tokens, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.inter
    s = dims.query_len  # train: T == seq_len
    eager = workload.attention is Attention.EAGER
    dropout = workload.dropout

    def b(numel: int) -> int:
        return dtype_bytes(act, numel)

    saved: list[tuple[str, int, str | None]] = []
    if "attn" in blocks:
        scores = dims.batch * a * s * s
        saved.append(("attn_norm.input", b(n * h), "residual"))  # norm backward: its input (paper: 2sbh)
        saved.append(("qkv_proj.input", b(n * h), "attn_norm"))  # shared input of Q, K, V (2sbh)
        saved.append(("q", b(n * a * d), None))  # QK^T keeps Q and K (paper: 4sbh with MHA)
        if eager and a != kv:
            # Eager GQA/MQA: the matmuls read the repeated copies, so those are what autograd keeps.
            rep = b(dims.batch * a * s * d)
            saved.append(("k_rep", rep, None))
            saved.append(("v_rep", rep, None))
        else:
            saved.append(("k", b(n * kv * d), None))
            saved.append(("v", b(n * kv * d), None))  # attention over V keeps V (2sbh)
        if eager:
            saved.append(("softmax.output", b(scores), None))  # 2as^2b
            if dropout:
                saved.append(("attn_dropout.mask", scores * _MASK_BYTES, None))  # as^2b
                saved.append(("attn_dropout.output", b(scores), None))  # PV input, 2as^2b
        else:
            # Flash attention recomputes scores in backward from Q, K, V, its output and the LSE;
            # its dropout regenerates the mask from the RNG state instead of storing it.
            saved.append(("flash.lse", dims.batch * a * s * _LSE_BYTES, None))
        saved.append(("o_proj.input", b(n * a * d), "context"))  # 2sbh (also flash's saved output)
        if dropout:
            saved.append(("attn_out_dropout.mask", n * h * _MASK_BYTES, None))  # sbh
    if "mlp" in blocks:
        if not shape.parallel_attn_mlp:
            saved.append(("mlp_norm.input", b(n * h), "attn_residual_out"))  # 2sbh
            saved.append(("mlp.input", b(n * h), "mlp_norm"))  # first MLP linear input, 2sbh
        elif "attn" not in blocks:
            # Parallel layer split into blocks: the MLP unit keeps its own reference to the shared norm output.
            saved.append(("mlp.input", b(n * h), "attn_norm"))
        rows, prefix = n, ""
        if dims.experts:
            pairs = n * dims.top_k
            saved.append(("router.probs", b(n * dims.experts), None))  # softmax output
            saved.append(("router.index", pairs * _INDEX_BYTES, None))  # top-k indices (gather/scatter)
            saved.append(("routing_weights", b(pairs), None))  # combine: weight x expert output
            saved.append(("experts.input", b(pairs * h), None))  # gathered copies read by the experts
            rows, prefix = pairs, "experts."
        inter = b(rows * f)
        if shape.gated_mlp:
            saved.append((f"{prefix}gate.output", inter, None))  # act(gate) keeps its input
            if not workload.fused_mlp:
                saved.append((f"{prefix}act.output", inter, None))  # act * up keeps both factors
            saved.append((f"{prefix}up.output", inter, None))
            saved.append((f"{prefix}down.input", inter, None))  # down_proj keeps its input
        else:
            saved.append((f"{prefix}act.input", inter, None))  # GeLU keeps its input (paper: 8sbh)
            saved.append((f"{prefix}down.input", inter, None))  # second linear keeps its input (8sbh)
        if dims.experts:
            saved.append(("experts.output", b(n * dims.top_k * h), None))  # combine keeps the expert outputs
        if dropout:
            saved.append(("mlp_dropout.mask", n * h * _MASK_BYTES, None))  # sbh
    return saved


def _saved_embedding(shape: LayerShape, workload: Workload) -> list[tuple[str, int, str | None]]:
    n = workload.tokens
    # Embedding backward needs only the indices (one int64 index tensor per lookup table).
    saved: list[tuple[str, int, str | None]] = [("input_ids", n * _INDEX_BYTES * shape.embedding_tables, "input_ids")]
    if shape.forward.embed_proj_dim:
        # OPT's project_in keeps its input, the token lookup (B x T x word_embed_proj_dim).
        saved.append(("project_in.input", dtype_bytes(workload.act_dtype, n * shape.forward.embed_proj_dim),
                      "token_lookup"))
    if workload.dropout:
        saved.append(("embed_dropout.mask", n * shape.hidden_size * _MASK_BYTES, None))
    return saved


def _saved_head(shape: LayerShape, workload: Workload) -> list[tuple[str, int, str | None]]:
    act = workload.act_dtype
    n, h = workload.tokens, shape.hidden_size
    saved: list[tuple[str, int, str | None]] = [
        ("final_norm.input", dtype_bytes(act, n * h), "residual"),
        ("final_norm.output", dtype_bytes(act, n * h), "final_norm"),  # LM head / pooler input
    ]
    if shape.forward.embed_proj_dim:
        # OPT's project_out keeps the normed states (above); the LM head keeps its output.
        saved.append(("project_out.output", dtype_bytes(act, n * shape.forward.embed_proj_dim), "projected"))
    if shape.vocab_size:
        saved.append(("loss.log_probs", n * shape.vocab_size * _LOSS_BYTES, None))  # fp32 log-softmax output
    else:
        saved.append(("pooler.tanh_output", dtype_bytes(act, workload.batch * h), None))
    return saved


# --------------------------------------------------------------------------------------------------
# Buffers


def _sdpa_gets_mask(shape: LayerShape, workload: Workload) -> bool:
    """Whether a causal model's SDPA call gets a materialized boolean mask instead of ``is_causal``.

    A decode step over a static cache does (masking_utils cannot tell filled slots from empty ones);
    over a dynamic cache every key is valid and the mask is skipped, as in prefill.
    """
    static_decode = workload.mode is Mode.DECODE and workload.kv_cache is KVCache.STATIC
    return shape.causal and (static_decode or shape.forward.sdpa_mask)


def _buffers(shape: LayerShape, workload: Workload) -> tuple[tuple[str, int], ...]:
    """The workspace an attention unit needs: its masks and rotary tables (none elsewhere)."""
    if shape.part not in ("layer", "attention"):
        return ()
    return _attention_tables(shape, workload)


def _attention_tables(shape: LayerShape, workload: Workload) -> tuple[tuple[str, int], ...]:
    """The masks and rotary tables the model's forward makes once and holds through every layer."""
    dims = _dims(shape, workload)
    act = workload.act_dtype
    out: list[tuple[str, int]] = []
    if workload.attention is Attention.EAGER:
        # Additive float mask B x 1 x T x S_kv in the model dtype (transformers masking_utils.eager_mask);
        # one per attention kind the model mixes (Gemma 2: full and sliding-window layers).
        mask = dtype_bytes(act, dims.batch * dims.query_len * dims.kv_len)
        out.append(("attention_mask", shape.forward.attention_masks * mask))
    elif not shape.causal:
        # Flash kernels take causality as a flag; an encoder batch with padding passes a 2-D
        # B x S_kv boolean key-padding mask (transformers masking_utils.flash_attention_mask).
        out.append(("padding_mask", dims.batch * dims.kv_len))
    elif _sdpa_gets_mask(shape, workload):
        # SDPA takes is_causal where every key before a query is valid; a decode step over a static
        # cache gets a boolean mask of B x 1 x T x S_kv (transformers masking_utils.sdpa_mask), and
        # so does every step of a family that always materializes it.
        out.append(("attention_mask", dims.batch * dims.query_len * dims.kv_len))
    if shape.rotary_dim:
        # cos and sin, each 1 x T x rotary_dim in the activation dtype: LlamaRotaryEmbedding.forward
        # computes them from position_ids of 1 x T (broadcast over the batch) and returns
        # emb.cos().to(x.dtype) with emb = cat(freqs, freqs).
        out.append(("rotary_cos_sin", 2 * dtype_bytes(act, dims.query_len * shape.rotary_dim)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The estimate


def _blocks_of(part: str) -> tuple[tuple[str, ...], ...]:
    """Op blocks whose peaks make the unit: one group per scratch region."""
    return {
        "layer": (("attn",), ("mlp",)),
        "attention": (("attn",),),
        "mlp": (("mlp",),),
        "embedding": (("embed",),),
        "head": (("head",),),
    }[part]


def _walk_peak(g: _Graph, part: str, workload: Workload) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Transient peak of the unit's ops, with the workload's buffer reuse for a whole layer."""
    groups = _blocks_of(part)
    if len(groups) == 1 or workload.buffer_reuse:
        return g.peak(tuple(blk for grp in groups for blk in grp))
    if workload.mode is not Mode.TRAIN:
        # No reuse: the attention's and the MLP's scratch are separate regions. What the layer holds
        # from its start (its input, the caller's tensors) is counted once, then each block's live
        # tensors at its own peak that are not counted yet.
        parts = [(t, g.sizes[t]) for t in g.inputs]
        counted = set(g.inputs)
        for grp in groups:
            _, live = g.peak(grp)
            parts.extend((f"{grp[0]}.{t}", nb) for t, nb in live if t not in counted)
            counted.update(t for t, _ in live)
        return sum(nb for _, nb in parts), tuple(parts)
    # No reuse: the attention's and the MLP's scratch are separate regions; only the residual
    # stream entering each block is shared. peak = residual + attn scratch + MLP scratch.
    residual = g.sizes["residual"]
    parts: list[tuple[str, int]] = [("residual", residual)]
    for grp in groups:
        _, live = g.peak(grp)
        res_name = "residual" if grp == ("attn",) or "attn_residual_out" not in g.sizes else "attn_residual_out"
        parts.extend((f"{grp[0]}.{t}", nb) for t, nb in live if t != res_name)
    return sum(nb for _, nb in parts), tuple(parts)


# A pure function of two frozen values, called for every unit, shard and technique set the planner
# tries: memoized (the result is an immutable value too).
@functools.lru_cache(maxsize=65536)
def estimate_activations(shape: LayerShape, workload: Workload) -> ActivationEstimate:
    """Activation peak, persistent part and buffers of one unit under ``workload``.

    Args:
        shape: the unit's dimensions; ``shape.part`` selects embedding, layer, attention, mlp or head.
        workload: batch, sequence, mode, dtypes and kernel choices.

    Raises:
        ConfigError: the shape is inconsistent (unknown part, heads not a multiple of kv heads, ...).
    """
    _check_shape(shape)
    part = shape.part
    if workload.mode is Mode.TRAIN:
        builders = {"embedding": _embedding_graph, "head": _head_graph}
        graph = builders.get(part, _layer_graph)(shape, workload)
    else:
        builders = {"embedding": _reference_embedding_graph, "head": _reference_head_graph}
        graph = builders.get(part, _reference_layer_graph)(shape, workload)
    buffer_parts = _buffers(shape, workload)
    walk_bytes, walk_parts = _walk_peak(graph, part, workload)

    if workload.mode is not Mode.TRAIN:
        persistent_parts: tuple[tuple[str, int], ...] = ()
        if workload.mode is Mode.DECODE and part in ("layer", "attention"):
            dims = _dims(shape, workload)
            # Keys and values of every cached token: 2 x B x S_kv x kv_heads x head_dim, for each
            # micro-batch in flight (each has its own sequences and cache).
            one = dtype_bytes(workload.kv_cache_dtype, dims.batch * dims.kv_len * dims.kv_heads * dims.head_dim)
            persistent_parts = (("kv_cache", 2 * one * workload.micro_batches),)
        # Checkpointing changes nothing here: inference keeps nothing for a backward pass.
        parts = persistent_parts + walk_parts
        persistent = sum(nb for _, nb in persistent_parts)
    else:
        if part == "embedding":
            saved = _saved_embedding(shape, workload)
            inputs: tuple[str, ...] = ("input_ids",)
            input_sizes = {"input_ids": saved[0][1]}
        elif part == "head":
            saved = _saved_head(shape, workload)
            inputs, input_sizes = ("residual",), {"residual": graph.sizes["residual"]}
        else:
            blocks = tuple(grp[0] for grp in _blocks_of(part))
            saved = _saved_layer(shape, workload, blocks)
            inputs = graph.block_inputs(blocks)
            input_sizes = {t: graph.sizes[t] for t in inputs}
        # Backward: the gradient of a tensor lives from the backward of its last reader to the
        # backward of its writer, the forward interval mirrored, so the gradients' peak is the
        # forward walk's peak; added to the saved set this bounds both passes from above.
        grad_parts = tuple((f"grad.{t}", nb) for t, nb in walk_parts)
        if workload.checkpointing:
            # Only the unit's inputs stay resident; backward first recomputes the saved set.
            persistent_parts = tuple((f"input.{t}", input_sizes[t]) for t in inputs)
            recompute = tuple((f"recompute.{name}", nb) for name, nb, alias in saved if alias not in inputs)
            parts = persistent_parts + recompute + grad_parts
        else:
            persistent_parts = tuple((f"saved.{name}", nb) for name, nb, _ in saved)
            parts = persistent_parts + grad_parts
        persistent = sum(nb for _, nb in persistent_parts)
        # The forward itself can hold more than the saved set and the backward's gradients: the modules
        # that really run keep fp32 copies and Python references (docs/activations.md, "Train").
        forward_bytes, forward_live = _train_forward_peak(shape, workload)
        if forward_bytes > sum(nb for _, nb in parts):
            parts = tuple((f"forward.{t}", nb) for t, nb in forward_live)
    return ActivationEstimate(
        activation_bytes=sum(nb for _, nb in parts),
        persistent_bytes=persistent,
        buffer_bytes=sum(nb for _, nb in buffer_parts),
        parts=parts,
        buffer_parts=buffer_parts,
    )


# --------------------------------------------------------------------------------------------------
# FLOPs


def _attention_context(shape: LayerShape, workload: Workload, dims: _Dims) -> tuple[int, int]:
    """(numerator, denominator) of the mean number of keys a query is scored against."""
    if workload.mode is Mode.DECODE:
        return dims.kv_len, 1
    s = workload.seq_len
    if workload.attention is Attention.EAGER or not shape.causal:
        return s, 1  # eager computes the full s x s matrix; the mask discards half of it
    # A causal flash kernel skips masked tiles: query i (1-based) reads min(i, window) keys.
    w = min(shape.sliding_window or s, s)
    total = w * (w + 1) // 2 + (s - w) * w
    return total, s


@functools.lru_cache(maxsize=65536)
def estimate_flops_per_token(shape: LayerShape, workload: Workload) -> int:
    """Forward FLOPs per token (2 per multiply-accumulate) of one unit under ``workload``.

    Matmuls only, as in Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1:
    C_forward ~ 2N + 2 n_layer n_ctx d_attn) and PaLM (Chowdhery et al. 2022, appendix B, which
    counts both attention matmuls: 4 x heads x head_dim x context per layer and token). Norms,
    activations and softmax are left out. MoE counts the router and the experts_per_token experts.
    """
    _check_shape(shape)
    h = shape.hidden_size
    if shape.part == "embedding":
        return 0  # lookups, no multiply-accumulates
    if shape.part == "head":
        if shape.vocab_size:
            return 2 * h * shape.vocab_size
        return 2 * h * h // workload.query_len  # pooler: one h x h matmul per sequence
    dims = _dims(shape, workload)
    flops = 0
    if shape.part in ("layer", "attention"):
        a, kv, d = dims.heads, dims.kv_heads, dims.head_dim
        flops += 2 * h * (a + 2 * kv) * d  # Q, K, V projections
        flops += 2 * a * d * h  # output projection
        num, den = _attention_context(shape, workload, dims)
        flops += 4 * a * d * num // den  # QK^T and PV: 2 x 2 x a x d per key
    if shape.part in ("layer", "mlp"):
        matrices = 3 if shape.gated_mlp else 2
        per_expert = 2 * h * dims.inter * matrices
        if dims.experts:
            flops += 2 * h * dims.experts + dims.top_k * per_expert  # router + routed experts
        else:
            flops += per_expert
    return flops


__all__ = ["PARTS", "ActivationEstimate", "estimate_activations", "estimate_flops_per_token"]
