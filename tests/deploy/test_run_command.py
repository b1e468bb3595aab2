"""``cachefit run`` as documented: under a real torchrun, on one node and on two "nodes" on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from tiny_models import make_plan, model_dirs  # noqa: E402,F401
from typer.testing import CliRunner  # noqa: E402

from cachefit.cli import app  # noqa: E402
from cachefit.deploy.models import load_model  # noqa: E402

CLI = [sys.executable, "-m", "cachefit.cli"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def llama_plan(model_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(make_plan(model_dirs["llama"], "400KB").to_json())
    return path


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_two_cards_checks_and_saves_outputs(model_dirs, llama_plan, tmp_path):
    out = tmp_path / "out.safetensors"
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "2",
                "--input-ids", "1,2,3,4;5,6,7,8", "--micro-batches", "2", "--check",
                "--save-outputs", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["check"]["passed"] and doc["check"]["comparisons"][0]["max_rel_error"] <= 1e-5
    assert doc["cards"] == 2 and doc["run"]["schedule"] == "gpipe" and doc["input_shape"] == [2, 4]
    assert [s["measured_weight_bytes"] for s in doc["stages"]] == [s["planned_weight_bytes"] for s in doc["stages"]]
    from safetensors.torch import load_file

    saved = load_file(str(out))["outputs"]
    with torch.no_grad():
        expected = load_model(model_dirs["llama"])(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])).logits
    assert saved.shape == (2, 4, 128)
    assert float((saved - expected).abs().max() / expected.abs().max()) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_nodes_on_loopback(model_dirs, llama_plan, tmp_path):
    # two torchrun invocations, one process each, joining one c10d rendezvous on 127.0.0.1
    endpoint = f"127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"
    common = ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "1", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "cachefit-test", "--run-dir", str(run_dir),
              "--micro-batches", "2", "--json", "--timeout", "60"]
    procs = [subprocess.Popen([*CLI, *common, "--node-rank", str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    docs = [json.loads(stdout) for stdout, _ in results]
    assert all(d["world_size"] == 2 and d["cards"] == 2 for d in docs)
    assert (run_dir / "outputs.safetensors").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_rank_under_torchrun_exits_nonzero_naming_the_stage(model_dirs, llama_plan):
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "2", "--micro-batches", "2",
                "--timeout", "5", env={"CACHEFIT_DEPLOY_FAULT": "1:kill"})
    assert proc.returncode == 1
    assert "stage 1 (card 1: layers.2..head) died without a report" in proc.stderr


def test_bad_input_is_one_line_and_exit_2(model_dirs, llama_plan, tmp_path):
    runner = CliRunner()
    got = runner.invoke(app, ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "3"])
    assert got.exit_code == 2
    assert "3 processes but the plan has only 2 cards" in got.output
    got = runner.invoke(app, ["run", str(tmp_path), "--plan", str(llama_plan)])
    assert got.exit_code == 2 and "no config.json" in got.output
    got = runner.invoke(app, ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--input-ids", "1,x"])
    assert got.exit_code == 2 and "integers" in got.output
    got = runner.invoke(app, ["run", str(model_dirs["gpt2"]), "--plan", str(llama_plan)])
    assert got.exit_code == 2 and "units" in got.output


def test_run_refuses_a_plan_made_for_other_cards_or_another_model(model_dirs, llama_plan, tmp_path):
    runner = CliRunner()
    # the plan was made for cards of 400 KB: other cards are refused before launch, saying what differs
    got = runner.invoke(app, ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--capacity", "500KB"])
    assert got.exit_code == 2 and "cards differ" in got.output
    # a plan whose recorded model digest does not match this checkpoint (same names and shapes)
    doc = json.loads(llama_plan.read_text())
    doc["provenance"]["profile"] = "0" * 64
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    from cachefit.deploy.models import inspect_model_dir
    from cachefit.deploy.stages import layout_from_plan
    from cachefit.errors import ConfigError
    from cachefit.plan import load_plan

    with pytest.raises(ConfigError, match="model or workload differs"):
        layout_from_plan(load_plan(edited), inspect_model_dir(model_dirs["llama"]))
    # the untouched plan passes both checks
    layout_from_plan(load_plan(llama_plan), inspect_model_dir(model_dirs["llama"]))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_decode_generates_as_generate_does(model_dirs, llama_plan, tmp_path):
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "2",
                "--input-ids", "1,2,3,4;5,6,7,8", "--new-tokens", "3", "--check", "--json",
                "--report", str(tmp_path / "page"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    # the plan's 2 micro-batches: the 2 sequences decode as 2 groups in flight, in a static KV cache (the plan's)
    assert doc["run"]["mode"] == "decode" and doc["run"]["micro_batches"] == 2 and doc["run"]["new_tokens"] == 3
    assert doc["run"]["kv_cache"] == "static"
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        expected = load_model(model_dirs["llama"]).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                            max_new_tokens=3, pad_token_id=0)
    assert doc["generated_ids"] == expected[:, 4:].tolist()
    assert doc["check"]["passed"] and doc["check"]["comparisons"][1]["max_rel_error"] <= 1e-5
    assert doc["timings"]["ms_per_token"] > 0 and len(doc["timings"]["token_s"]) == 2 * 2
    assert "unavailable" in doc["predicted"]  # the plan's custom cards are in no catalog
    # the HTML page: every stage's planned total beside its measured peak and its card's capacity
    page = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    assert doc["report_file"].endswith("index.html") and "Planned against measured, per card" in page
    assert all(st["description"] in page and st["measured_peak_bytes"] <= st["capacity_bytes"]
               for st in doc["stages"])


def test_decode_flags_are_checked(model_dirs, llama_plan):
    runner = CliRunner()
    got = runner.invoke(app, ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--mode", "decode"])
    assert got.exit_code == 2 and "--new-tokens" in got.output
    # `--mode infer` is still accepted, as an alias of prefill (the planner's name, the one the report uses)
    got = runner.invoke(app, ["run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--mode", "infer",
                              "--new-tokens", "2"])
    assert got.exit_code == 2 and "is for --mode decode, not --mode prefill" in " ".join(got.output.split())


def _hung_run(model_dirs, llama_plan, tmp_path, timeout):
    """A run whose rank 1 hangs at its first step: (process, when it ended, when the rank hung, run dir)."""
    run_dir = tmp_path / "run"
    proc = _cli("run", str(model_dirs["llama"]), "--plan", str(llama_plan), "--nproc", "2", "--micro-batches", "2",
                "--timeout", str(timeout), "--run-dir", str(run_dir), env={"CACHEFIT_DEPLOY_FAULT": "1:hang"})
    ended = time.time()
    hung_at = json.loads((run_dir / "fault-rank1.json").read_text())["time"]
    return proc, ended, hung_at, run_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_hung_rank_ends_the_run_in_one_line(model_dirs, llama_plan, tmp_path):
    # rank 1 hangs at its first step; rank 0's wait for it times out after --timeout, and the launcher
    # ends the hung rank at once (how soon is a measurement: the hardware-marked test below)
    proc, _, _, run_dir = _hung_run(model_dirs, llama_plan, tmp_path, timeout=5.0)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # the terminal: one line naming each stage's fate and the log; the tracebacks are in the log
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "stage 1 (card 1: layers.2..head) was still running" in lines[0]
    assert "stage 0 (card 0: embed..layers.1) timed out" in lines[0]
    assert lines[0].endswith(str(run_dir / "run.log"))
    log = (run_dir / "run.log").read_text()
    assert "Traceback" in log and "Timed out waiting 5000ms" in log


@pytest.mark.hardware
@pytest.mark.multiprocess
def test_hung_rank_ends_the_run_within_one_and_a_half_timeouts(model_dirs, llama_plan, tmp_path):
    # measured on the 2-core machine: about --timeout + 1.3 s from the hang to the CLI's exit
    timeout = 5.0
    proc, ended, hung_at, _ = _hung_run(model_dirs, llama_plan, tmp_path, timeout)
    assert proc.returncode == 1
    assert ended - hung_at <= 1.5 * timeout, ended - hung_at


def _boom(*args, **kwargs):
    raise AssertionError("torchrun was started: the run should have been refused before")


def test_run_refuses_before_any_process_starts(model_dirs, llama_plan, tmp_path, monkeypatch):
    monkeypatch.setattr("cachefit.deploy.launcher.run_supervised", _boom)
    runner = CliRunner()
    doc = json.loads(llama_plan.read_text())

    def edited(name, edit):
        d = json.loads(json.dumps(doc))
        edit(d)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(d))
        return str(path)

    llama, plan = str(model_dirs["llama"]), str(llama_plan)
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dirs["llama"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    cases = [
        # plan integrity: a changed cluster digest, cards that are not the stages', a plan that does not fit
        ([llama, "--plan", edited("cluster", lambda d: d["provenance"].__setitem__("cluster", "1" * 64))],
         "cluster digest (111111111111) is not that of the cards"),
        ([llama, "--plan", edited("cards", lambda d: d.__setitem__("cards", 5))], '"cards": 5 but 2 stages'),
        ([llama, "--plan", edited("feasible", lambda d: d.__setitem__("feasible", False))],
         "does not fit its cards"),
        # the workload: 4 sequences of 32 tokens per micro-batch against a plan for 2 x 8
        ([llama, "--plan", plan, "--seq", "32", "--batch", "8"], "larger than the workload the plan was made for"),
        ([llama, "--plan", plan, "--input-ids", "1,2", "--batch", "2"], "drop --batch and --seq"),
        # options out of range
        ([llama, "--plan", plan, "--check", "--tolerance", "-1"], "--tolerance -1.0: give the largest relative error"),
        ([llama, "--plan", plan, "--tolerance", "0.001"], "add --check"),
        ([llama, "--plan", plan, "--timeout", "inf"], "--timeout must be a number of seconds > 0"),
        ([llama, "--plan", plan, "--headroom", "0.1"], "--headroom and --reserve describe the cards"),
        # the checkpoint: cut short, refused naming the file
        ([str(truncated), "--plan", plan], f"{weights}: truncated: tensor"),
    ]
    for args, expect in cases:  # `_boom` fails the test if torchrun would have started
        got = runner.invoke(app, ["run", *args])
        assert got.exit_code == 2, (args, got.output)
        assert expect in got.output and len(got.output.strip().splitlines()) == 1, (args, got.output)
