"""Tiny transformers configs, their meta-device models, and plans of them on a few cards."""

from dataclasses import replace

import pytest

from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload

# Small enough to build on the meta device in milliseconds, real enough to have every module kind.
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                       tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=256, n_positions=128),
    "bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=128, architectures=["BertModel"]),
}

# Plenty: every plan below is balanced over a chosen number of cards.
BIG = make_cluster(device_from_capacity("1GB"))


def build_meta(name: str):
    """The transformers model of ``CONFIGS[name]`` on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(CONFIGS[name])
    model_type = kwargs.pop("model_type")
    kwargs.pop("architectures", None)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        if model_type == "bert":
            return transformers.BertModel(cfg)
        return transformers.AutoModelForCausalLM.from_config(cfg)


def profile_of(name: str, granularity: str = "layer"):
    return profile_model(dict(CONFIGS[name]), Workload(seq_len=64), granularity=granularity)


def plan_of(profile, num_cards: int, cluster=BIG):
    plan, _ = plan_partition(profile, cluster, num_cards=num_cards)
    return plan


def split_over(plan, degrees):
    """The plan with its stage i split tensor-parallel over degrees[i] cards (cards renumbered in order)."""
    stages, card = [], 0
    for stage, degree in zip(plan.stages, degrees):
        for r in range(degree):
            stages.append(replace(stage, card=card, shard=(r, degree) if degree > 1 else None))
            card += 1
    return replace(plan, stages=tuple(stages), devices=(plan.devices[0],) * card)


@pytest.fixture(scope="module")
def meta_models():
    """Built once per test module: name -> meta model."""
    return {name: build_meta(name) for name in CONFIGS}
