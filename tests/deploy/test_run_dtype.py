"""``cachefit plan DIR`` plans a checkpoint in its own dtype, so ``cachefit run`` of it matches
transformers; ``run`` warns when a plan's dtype is not the checkpoint's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tiny_models import model_dirs  # noqa: E402,F401

CLI = [sys.executable, "-m", "cachefit.cli"]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def _plan(model_dir, tmp_path, *extra: str):
    # prefill of 2 x 8 tokens on cards of 400 KB: the fp32 tiny Llama takes 2 cards, fp16 1
    proc = _cli("plan", str(model_dir), "--capacity", "400KB", "--mode", "prefill", "--batch", "2", "--seq", "8",
                *extra, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "plan.json"
    path.write_text(proc.stdout)
    return json.loads(proc.stdout), path, proc.stderr


def test_run_warns_when_the_plan_dtype_is_not_the_checkpoints(model_dirs, tmp_path):
    plan, path, err = _plan(model_dirs["llama"], tmp_path, "--dtype", "fp16")
    assert plan["workload"]["weight_dtype"] == "fp16" and "note:" not in err
    # a process count the plan refuses before any process starts: the warning comes first
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(path), "--nproc", str(plan["cards"] + 1))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("warning: the plan is in fp16 but the checkpoint's config says fp32 (dtype)"), lines
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_plan_of_the_directory_runs_in_its_dtype_and_matches_transformers(model_dirs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plan, path, err = _plan(model_dirs["llama"], tmp_path)
    assert plan["workload"]["weight_dtype"] == "fp32" and plan["cards"] == 2
    assert "dtype fp32 from the checkpoint's config" in err
    out = tmp_path / "out.safetensors"
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(path), "--nproc", "2", "--check",
                "--input-ids", "1,2,3,4;5,6,7,8", "--save-outputs", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning:" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["run"]["dtype"] == "fp32" and doc["check"]["passed"]
    assert not any("checkpoint's config says" in n for n in doc.get("notes", ()))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])).logits
    got = load_file(str(out))["outputs"]
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
