"""``run --check`` of a compressed plan: the end-to-end metric of ``cachefit quality`` measured on the
deployed outputs against the uncompressed model, beside the plan's predicted loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cachefit.compress.apply")

from tiny_models import WORKLOAD, make_plan, model_dirs, padded_inputs  # noqa: E402,F401

from cachefit.deploy.config import NodeConfig, RunConfig  # noqa: E402
from cachefit.deploy.models import inspect_model_dir  # noqa: E402
from cachefit.deploy.runtime import launch  # noqa: E402
from cachefit.deploy.stages import layout_from_plan  # noqa: E402
from cachefit.deploy.verify import NO_PREDICTION, check_run, predicted_quality_loss  # noqa: E402


def _kl(reference_logits, logits, mask):
    """Mean KL(P_ref || P) over the real tokens, written out independently of cachefit."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    out = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref.exp() * (ref - out)).sum(dim=-1)
    return float(kl[mask.bool()].mean())


def _uncompressed_logits(model_dir, ids, mask):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits, model


def _least_loss_plan(model_dir, plan):
    """The int8 plan remade by plan --quality from a hand-written quality file: int8 costs each unit
    0.001 x (its index + 1) of KL."""
    from cachefit.compress.quality_profile import QualityProfile, TechniqueQuality
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.quality import least_loss_plan
    from cachefit.plan.search import technique_sets
    from cachefit.profile import profile_model

    profile = profile_model(model_dir, WORKLOAD)
    losses = tuple((u.name, 0.001 * (i + 1)) for i, u in enumerate(profile.units))
    quality = QualityProfile(model=str(model_dir), kind="decoder", metric="kl", techniques=(
        TechniqueQuality(technique="int8", end_to_end=sum(v for _, v in losses), units=losses),))
    return least_loss_plan(profile, make_cluster(device_from_capacity("100KB")), plan, technique_sets(["int8"]),
                           quality, source="q.json")


@pytest.mark.multiprocess
def test_check_of_an_int8_plan_reports_the_measured_quality_loss(model_dirs):  # noqa: F811 - the fixture imported above
    model_dir = model_dirs["llama"]
    plan = make_plan(model_dir, "100KB", allow=("int8",))
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    assert any(st.compressed for st in layout.stages)
    ids, mask = padded_inputs()
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size), launcher="fork",
                    config=RunConfig(micro_batches=2), input_ids=ids, attention_mask=mask)
    verdict = check_run(result, model_dir, layout=layout, plan=plan)
    # the pipeline adds nothing to compression: the tolerance logic is unchanged
    assert verdict.passed, verdict.describe()
    reference, _ = _uncompressed_logits(model_dir, ids, mask)
    expected = _kl(reference, result.outputs, mask)
    assert verdict.loss is not None and verdict.loss.metric == "kl"
    # int8 moves the tiny model's next-token distributions by a KL of about 1e-6 nats; the metric sums
    # fp32 log-probabilities (as `cachefit quality` does), whose rounding at that size is a few percent
    assert verdict.loss.measured == pytest.approx(expected, rel=0.1) and expected > 0
    assert verdict.loss.predicted is None
    doc = verdict.to_dict()
    assert doc["quality_loss"]["prediction"] == NO_PREDICTION and doc["quality_loss"]["measured"] == verdict.loss.measured
    assert NO_PREDICTION in verdict.describe()

    # the same run judged against a plan made with --quality: its prediction beside the measurement
    least = _least_loss_plan(model_dir, plan)
    predicted = predicted_quality_loss(least)
    assert predicted is not None and predicted[1] == "kl" and predicted[0] > 0
    beside = check_run(result, model_dir, layout=layout, plan=least)
    assert beside.loss.predicted == predicted[0] and beside.loss.measured == verdict.loss.measured
    assert f"the plan predicts {predicted[0]:.4g}" in beside.describe()
    assert predicted_quality_loss(plan) is None


@pytest.mark.multiprocess
def test_decode_check_of_an_int8_plan_measures_kl_on_the_runs_own_prefixes(model_dirs):  # noqa: F811 - the fixture imported above
    model_dir = model_dirs["llama"]
    plan = make_plan(model_dir, "100KB", allow=("int8",))
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size), launcher="fork",
                    input_ids=ids, config=RunConfig(mode="decode", new_tokens=3, micro_batches=1))
    verdict = check_run(result, model_dir, layout=layout, mode="decode", plan=plan)
    assert verdict.passed, verdict.describe()
    # the uncompressed model on the prompt and the run's own tokens: the logits of the same prefixes
    tokens = torch.tensor(result.report["generated_ids"])
    full = torch.cat([ids, tokens[:, :-1]], dim=1)
    reference, _ = _uncompressed_logits(model_dir, full, torch.ones_like(full))
    expected = _kl(reference[:, ids.shape[1] - 1:], result.outputs, torch.ones(tokens.shape))
    assert verdict.loss is not None and verdict.loss.measured == pytest.approx(expected, rel=0.1) and expected > 0


def test_no_loss_for_an_uncompressed_plan_and_a_clear_error_for_a_bad_kind():
    from cachefit.compress.quality import output_loss
    from cachefit.errors import ConfigError

    with pytest.raises(ConfigError, match="kind must be one of decoder, encoder"):
        output_loss("vision", torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ConfigError, match="same inputs"):
        output_loss("decoder", torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    # encoders: 1 - cosine of mean-pooled embeddings over the real tokens (padding left out)
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    out = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-9.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # pooled: ref (0.5, 0.5), out (1, 0): cosine 1/sqrt(2)
    assert output_loss("encoder", ref, out, mask) == pytest.approx(1 - 2 ** -0.5)


def test_the_prediction_of_a_plan_written_before_the_field_is_read_from_its_notes():
    from types import SimpleNamespace

    old = SimpleNamespace(notes=("compression chosen per unit ...; predicted loss 0.0125 (kl) against 0.02",))
    assert predicted_quality_loss(old) == (0.0125, "kl")
    new = SimpleNamespace(predicted_quality={"loss": 0.5, "metric": "1-cos", "source": None}, notes=old.notes)
    assert predicted_quality_loss(new) == (0.5, "1-cos")  # the field first
    assert predicted_quality_loss(SimpleNamespace(notes=())) is None
