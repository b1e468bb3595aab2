"""Tiny random-weight checkpoints (saved with safetensors) and plans for them.

Imported by the deploy tests (``from tiny_models import model_dirs, ...``); not a conftest, so that
other test packages' ``from conftest import ...`` never see it.

Sizes are chosen so plans on a custom capacity cut where the tests need: a tiny Llama of three layers
(hidden 64, 4 heads, 2 KV heads, MLP 128, vocabulary 128) is 32 KiB of embedding, 144.5 KiB per layer
and 32.3 KiB of head in fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cachefit.hardware.devices import device_from_capacity, make_cluster  # noqa: E402
from cachefit.plan.search import plan_partition  # noqa: E402
from cachefit.profile import profile_model  # noqa: E402
from cachefit.units import Workload  # noqa: E402

# prefill, batch 2 x 2 micro-batches of 8 tokens, fp32: the workload every test plan is made for
WORKLOAD = Workload(batch=2, seq_len=8, mode="prefill", weight_dtype="fp32", act_dtype="fp32", micro_batches=2)


def _configs() -> dict[str, object]:
    return {
        "llama": transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64),
        # two KV heads like 4 query heads over 2 cards: a tensor-parallel split divides both
        "llama_tp": transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64),
        "mistral": transformers.MistralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=4),
        "qwen2": transformers.Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64),
        # Qwen3: Llama's layer plus per-head q/k RMSNorms; head_dim is a field (its default is 128)
        "qwen3": transformers.Qwen3Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64),
        "gpt2": transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
        "bert": transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64),
    }


_CLASSES = {"llama": "LlamaForCausalLM", "llama_tp": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> a saved tiny model directory (config.json + model.safetensors), built once a session."""
    if _BUILT:
        return _BUILT
    _BUILT.update(save_models(tmp_path_factory.mktemp("models"), _configs(), _CLASSES, seed=0))
    return _BUILT


def save_models(root: Path, configs: dict[str, object], classes: dict[str, str], *, seed: int) -> dict[str, Path]:
    """name -> ``root / name``: each config's ``transformers`` class (``classes[name]``) with random
    weights (seed ``seed + its index``), saved with safetensors."""
    out = {}
    for k, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed + k)
        getattr(transformers, classes[name])(config).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def check_shard_gradients(rank: int, class_name: str, model_dir: str, store_path: str, shards: int,
                          parts: object = None) -> None:
    """One of ``shards`` forked processes: a backward through this card's shard of a one-layer model
    (embedding, layer and head split, balanced or by ``parts``) gives the card's part of the unsplit
    model's gradients, within 1e-5 of their largest value."""
    import os

    import torch.distributed as dist

    from cachefit.deploy.tensor_parallel import shard_stage_
    from cachefit.families import get_family

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, shards), rank=rank, world_size=shards)
    try:
        cls = getattr(transformers, class_name)
        steps = [("embed", None), ("layer", 0), ("head", None)]
        reference = cls.from_pretrained(model_dir, dtype=torch.float32).train(False)
        sharded = cls.from_pretrained(model_dir, dtype=torch.float32).train(False)
        family = get_family(reference.config.model_type)
        cut_kwargs = {"rank": rank, "shards": shards, "group": dist.group.WORLD, "where": "test",
                      **({"parts": parts} if parts is not None else {})}
        shard_stage_(sharded, steps, family, **cut_kwargs)
        ids, mask = padded_inputs(batch=2, vocab=reference.config.vocab_size)
        for model in (reference, sharded):
            logits = model(input_ids=ids, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        # the reference's gradients cut as the weights are: the card's part (zeros where a balanced split pads)
        cut = cls.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), (_, q) in zip(reference.named_parameters(), cut.named_parameters(), strict=True):
                q.copy_(p.grad)
        shard_stage_(cut, steps, family, **cut_kwargs)
        expected = dict(cut.named_parameters())
        for fqn, p in sharded.named_parameters():
            want = expected[fqn].detach()
            assert p.grad is not None and p.grad.shape == want.shape, fqn
            err = (p.grad - want).abs().max().item()
            assert err <= 1e-5 * max(want.abs().max().item(), 1e-12), (rank, fqn, err)
    finally:
        dist.destroy_process_group()


def make_plan(model_dir: Path, capacity: str, *, granularity: str = "layer", allow: tuple[str, ...] = (),
              workload: Workload = WORKLOAD):
    """A plan of ``model_dir`` on cards of ``capacity``, the fewest that fit."""
    profile = profile_model(model_dir, workload, granularity=granularity)
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity(capacity)), allow=list(allow))
    return plan


def padded_inputs(batch: int = 4, seq: int = 8, *, vocab: int = 128, left: bool = True, seed: int = 0):
    """Token ids and a mask with padding in one sequence (left for decoders, right for encoders)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return ids, mask
