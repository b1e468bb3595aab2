"""cachefit's analytic activation bytes against what transformers' own forward really holds.

Each family is built from a small random config (random weights, ``torch.manual_seed``) and run
under a live-storage tracker written here, independent of cachefit: a ``TorchDispatchMode`` that adds
every new output storage (by ``untyped_storage().data_ptr()``) to a live set and drops it through a
``weakref.finalize`` on the storage, so a storage counts from the op that allocates it until it is
really freed, whoever holds it. Forward hooks on the decoder layers say which unit is running.

The peak of a unit (docs/activations.md, "What a unit's peak is"): the largest sum of live bytes
over the ops that run while the unit runs, counting

* a layer, and the head (after the last layer returns): everything live (its input, what it
  allocates, what the caller keeps alive such as the token embeddings, the attention masks and the
  rotary tables), a layer's own KV cache, but no other layer's cache;
* the embedding (from the forward's start to the first layer): the same without the masks and
  rotary tables made then, which cachefit books on the attention units (and the head).

cachefit's figure for the unit is ``activation_bytes + buffer_bytes`` of ``cachefit profile`` for
the same config and workload; the test asserts ``1.0 <= analytic / measured <= 1.35`` (the contract
of a unit's ``Footprint``). Run as a script it prints the table of docs/activations.md::

    python tests/profile/test_activation_peaks.py
"""

from __future__ import annotations

import inspect
import itertools
import random
import sys
import weakref
from dataclasses import dataclass

import pytest

from cachefit.profile.hf_config import load_transformer_spec
from cachefit.profile.transformer import build_units
from cachefit.units import Workload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LOWER, UPPER = 1.0, 1.35
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "bert", "falcon")
_ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


# ------------------------------------------------------------------------------------------------
# The tracker


def _storages(obj: object) -> list:
    return [t.untyped_storage() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


@dataclass
class _Live:
    nbytes: int
    tag: str  # "act", "buffer" (attention mask, rotary tables), "cache.<layer>"


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, op by op, attributed to the unit running (``phase``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, _Live] = {}
        self.phase = "embed"
        self.in_buffer = 0  # > 0 while a rotary embedding module runs
        self.peaks: dict[str, int] = {}

    def track(self, storage, tag: str) -> None:
        ptr = storage.data_ptr()
        if ptr and ptr not in self.live:
            self.live[ptr] = _Live(storage.nbytes(), tag)
            weakref.finalize(storage, self.live.pop, ptr, None)

    def retag(self, tensor, tag: str) -> None:
        entry = self.live.get(tensor.untyped_storage().data_ptr())
        if entry is not None:
            entry.tag = tag

    def _tag(self) -> str:
        if self.in_buffer:
            return "buffer"
        frame = sys._getframe(2)
        while frame is not None:  # masks are made in transformers' masking_utils
            if frame.f_code.co_filename.endswith("masking_utils.py"):
                return "buffer"
            frame = frame.f_back
        return "act"

    def _sample(self) -> None:
        phase, total = self.phase, 0
        for entry in self.live.values():
            if entry.tag.startswith("cache."):
                if phase != "layer." + entry.tag[len("cache.") :]:
                    continue  # another layer's cache (or none at all outside layers)
            elif entry.tag == "buffer" and phase == "embed":
                continue
            total += entry.nbytes
        self.peaks[phase] = max(self.peaks.get(phase, 0), total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        tag = None
        for storage in _storages(out):
            if storage.data_ptr() not in inputs:  # a view or an in-place op allocates nothing
                tag = tag or self._tag()
                self.track(storage, tag)
        self._sample()
        return out


def _decoder_layers(model) -> list:
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise AssertionError(f"{type(model).__name__}: no ModuleList of {n} layers")


def _register_cache(tracker: LiveBytes, cache) -> None:
    # Only through this frame, so that the cache alone holds its tensors (a DynamicCache frees the old ones).
    for i, layer in enumerate(cache.layers):
        for tensor in (layer.keys, layer.values):
            tracker.track(tensor.untyped_storage(), f"cache.{i}")


def measure_peaks(model, input_ids, kv_cache=None, **kwargs) -> dict[str, int]:
    """Peak live bytes of ``model(input_ids, **kwargs)`` per unit: ``embed``, ``layers.<i>``, ``head``."""
    tracker = LiveBytes()
    layers = _decoder_layers(model)
    hooks = []

    def enter(i: int):
        def hook(*_: object) -> None:
            tracker.phase = f"layer.{i}"
        return hook

    def leave(i: int):
        def hook(*_: object) -> None:
            if kv_cache is not None:
                for tensor in (kv_cache.layers[i].keys, kv_cache.layers[i].values):
                    tracker.retag(tensor, f"cache.{i}")
            tracker.phase = "head" if i == len(layers) - 1 else "between"
        return hook

    def rotary(delta: int):
        def hook(*_: object) -> None:
            tracker.in_buffer += delta
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.register_forward_pre_hook(enter(i)), layer.register_forward_hook(leave(i))]
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            hooks += [module.register_forward_pre_hook(rotary(1)), module.register_forward_hook(rotary(-1))]
    if kv_cache is not None:
        _register_cache(tracker, kv_cache)
    try:
        with torch.no_grad(), tracker:
            model(input_ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    peaks = {k.replace("layer.", "layers."): v for k, v in tracker.peaks.items() if k != "between"}
    return peaks


# ------------------------------------------------------------------------------------------------
# Models and workloads


def make_config(family: str, *, hidden: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                vocab: int = 512, positions: int = 4096):
    """A small config of ``family`` (MLP width 3h gated, 4h otherwise)."""
    t = transformers
    if family in _ROTARY_FAMILIES:
        cls = {"llama": t.LlamaConfig, "mistral": t.MistralConfig, "qwen2": t.Qwen2Config, "qwen3": t.Qwen3Config,
               "gemma": t.GemmaConfig, "gemma2": t.Gemma2Config, "phi3": t.Phi3Config}[family]
        kw = {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "intermediate_size": 3 * hidden, "num_hidden_layers": layers, "vocab_size": vocab,
              "max_position_embeddings": positions, "head_dim": hidden // heads}
        if family == "mistral":
            kw["sliding_window"] = None
        if family == "gemma2":
            kw["sliding_window"] = positions  # every layer attends to the whole sequence
        if family == "phi3":
            kw["pad_token_id"] = 0
        return cls(**kw)
    if family == "gpt2":
        return t.GPT2Config(n_embd=hidden, n_head=heads, n_layer=layers, vocab_size=vocab, n_positions=positions,
                            bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                               intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=positions)
    if family == "opt":
        return t.OPTConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                           ffn_dim=4 * hidden, vocab_size=vocab, max_position_embeddings=positions,
                           word_embed_proj_dim=hidden)
    if family == "bert":
        return t.BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                            intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=positions)
    if family == "falcon":
        return t.FalconConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                              vocab_size=vocab, new_decoder_architecture=True, num_kv_heads=kv_heads,
                              max_position_embeddings=positions)
    raise AssertionError(family)


@dataclass(frozen=True)
class Case:
    family: str
    dtype: str = "fp32"
    attention: str = "eager"  # eager | sdpa (cachefit's flash)
    mode: str = "prefill"
    batch: int = 2
    seq: int = 128
    kv_cache: str = "static"
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2

    def __str__(self) -> str:
        mode = self.mode if self.mode == "prefill" else f"decode-{self.kv_cache}"
        kv = f" kv{self.kv_heads}" if self.kv_heads != 2 else ""
        return f"{self.family} {self.dtype} {self.attention} {mode} B{self.batch} S{self.seq} h{self.hidden}{kv}"

    def runs(self) -> bool:
        """Whether transformers runs this case: BERT has no decode, Gemma 2 no SDPA."""
        return not (self.family == "bert" and self.mode == "decode") and not (
            self.family == "gemma2" and self.attention == "sdpa"
        )


def build_model(case: Case, config):
    config._attn_implementation = case.attention
    torch.manual_seed(0)
    if case.family == "bert":
        model = transformers.BertModel(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=case.attention)
    return model.to(DTYPES[case.dtype]).eval()


def measured(case: Case, config) -> dict[str, int]:
    model = build_model(case, config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (case.batch, case.seq), generator=generator)
    if case.mode == "prefill":
        return measure_peaks(model, ids, **({} if case.family == "bert" else {"use_cache": False}))
    # Decode: fill S - 1 positions untracked, then measure the step that attends to all S.
    if case.kv_cache == "static":
        cache = transformers.StaticCache(config=config, max_cache_len=case.seq)
    else:
        cache = transformers.DynamicCache(config=config)
    # transformers 5.25 renamed past_key_values to cache (the old name still works, with a warning).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids[:, :-1], use_cache=True, **{name: cache})
    position = torch.full((1,), case.seq - 1)
    return measure_peaks(model, ids[:, -1:], kv_cache=cache, use_cache=True, cache_position=position, **{name: cache})


def analytic(case: Case, config) -> dict[str, int]:
    """``activation_bytes + buffer_bytes`` per unit of cachefit's profile of the same config."""
    spec = load_transformer_spec(config.to_dict(), name=case.family)
    workload = Workload(batch=case.batch, seq_len=case.seq, mode=case.mode, weight_dtype=case.dtype,
                        act_dtype=case.dtype, attention="eager" if case.attention == "eager" else "flash",
                        kv_cache=case.kv_cache)
    return {u.name: u.footprint.activation_bytes + u.footprint.buffer_bytes for u in build_units(spec, workload)}


def ratios(case: Case) -> dict[str, tuple[int, int]]:
    """Per unit: (analytic bytes, measured peak bytes)."""
    config = make_config(case.family, hidden=case.hidden, heads=case.heads, kv_heads=case.kv_heads)
    real = measured(case, config)
    model = analytic(case, config)
    assert set(real) == set(model), (sorted(real), sorted(model))
    return {unit: (model[unit], real[unit]) for unit in model}


def check(case: Case) -> None:
    bad = {
        unit: f"{a} B / {m} B = {a / m:.3f}"
        for unit, (a, m) in ratios(case).items()
        if not LOWER <= a / m <= UPPER
    }
    assert not bad, f"{case}: analytic / measured outside [{LOWER}, {UPPER}]: {bad}"


# ------------------------------------------------------------------------------------------------
# The cases


def _fast_cases() -> list[Case]:
    """Every family with eager and SDPA attention, in prefill and static-cache decode; dtype (fp32,
    bf16, fp16), batch (1-4), sequence (32-256) and width (64, 128) drawn, seeded."""
    rng = random.Random(20240607)
    cases = []
    for family, attention, mode in itertools.product(FAMILIES, ("eager", "sdpa"), ("prefill", "decode")):
        case = Case(family, rng.choice(("fp32", "bf16", "fp16")), attention, mode, batch=rng.choice((1, 2, 4)),
                    seq=rng.choice((32, 64, 128, 256)), hidden=rng.choice((64, 128)))
        if case.runs():
            cases.append(case)
    return cases


FAST_CASES = _fast_cases()
# Shapes that stress one term each: one KV head (repeat_kv a view), no grouping, a DynamicCache
# (torch.cat doubles the cache), long sequences, wide models.
EDGE_CASES = [
    Case("qwen2", "bf16", "eager", "decode", batch=4, seq=256, kv_heads=1),
    Case("qwen2", "bf16", "eager", "prefill", batch=4, seq=128, kv_heads=1),
    Case("llama", "fp32", "sdpa", "decode", batch=4, seq=256, kv_heads=4),
    Case("llama", "fp32", "eager", "decode", batch=4, seq=128, kv_cache="dynamic"),
    Case("gpt2", "bf16", "sdpa", "decode", batch=2, seq=128, kv_cache="dynamic"),
    Case("falcon", "bf16", "sdpa", "decode", batch=2, seq=128, kv_cache="dynamic"),
    Case("gpt2", "fp32", "eager", "prefill", batch=4, seq=256, hidden=256),
]


@pytest.mark.parametrize("case", FAST_CASES + EDGE_CASES, ids=str)
def test_analytic_bytes_bound_the_real_forward(case: Case) -> None:
    check(case)


def _slow_cases(count: int = 96) -> list[Case]:
    """``count`` cases drawn (seeded) from the cross product of families, dtypes, kernels, modes and
    cache kinds at wider shapes: batch 1-8, sequence 64-512, width 64-256, one to four KV heads."""
    shapes = ((1, 512, 64, 4, 1), (8, 64, 256, 4, 4), (3, 200, 192, 6, 2), (4, 128, 128, 4, 2))
    cases = [
        Case(family, dtype, attention, mode, batch, seq, kv_cache, hidden, heads, kv)
        for family, dtype, attention, (mode, kv_cache), (batch, seq, hidden, heads, kv) in itertools.product(
            FAMILIES, ("fp32", "bf16", "fp16"), ("eager", "sdpa"),
            (("prefill", "static"), ("decode", "static"), ("decode", "dynamic")), shapes,
        )
    ]
    return random.Random(7).sample([c for c in cases if c.runs()], count)


@pytest.mark.slow
@pytest.mark.parametrize("case", _slow_cases(), ids=str)
def test_analytic_bytes_bound_the_real_forward_sweep(case: Case) -> None:
    check(case)


# ------------------------------------------------------------------------------------------------
# The table of docs/activations.md


TABLE_CASES = [
    Case("llama", "bf16", "eager", "prefill", batch=1, seq=2048),
    Case("llama", "bf16", "eager", "prefill", batch=4, seq=512),
    Case("qwen2", "bf16", "eager", "prefill", batch=4, seq=512),
    Case("gpt2", "fp32", "sdpa", "prefill", batch=4, seq=512),
    Case("llama", "fp32", "sdpa", "prefill", batch=4, seq=512),
    Case("bert", "fp32", "eager", "prefill", batch=4, seq=512),
    Case("llama", "fp32", "eager", "decode", batch=4, seq=512, kv_cache="dynamic"),
    Case("llama", "fp32", "eager", "decode", batch=4, seq=512),
    Case("qwen2", "bf16", "eager", "decode", batch=4, seq=512, kv_heads=1),
    *(Case(f, "bf16", "eager", "prefill", batch=2, seq=256) for f in FAMILIES),
    *(Case(f, "fp16", "sdpa", "decode", batch=2, seq=256) for f in FAMILIES if f != "bert"),
]


def print_table() -> None:
    """Markdown rows: each case, then analytic / measured per unit."""
    print("| model, workload | embed | layers.0 | layers.1 | head |")
    print("|---|---|---|---|---|")
    for case in TABLE_CASES:
        if case.runs():
            r = {unit: a / m for unit, (a, m) in ratios(case).items()}
            cells = " | ".join(f"{r[u]:.3f}" for u in ("embed", "layers.0", "layers.1", "head"))
            print(f"| {case} | {cells} |", flush=True)


if __name__ == "__main__":
    print_table()
