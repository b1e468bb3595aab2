import json

from typer.testing import CliRunner

from cachefit.cli import app
from cachefit.report.paper import paper_account


def test_paper_account_recomputes_the_seed_claims():
    account = paper_account()
    by_what = {c.what: c for c in account.claims}
    # the per-part FP16 figures hold, the total and the compression claims do not
    assert by_what["attention QKV weights per layer, FP16"].holds
    assert by_what["MLP weights per layer, FP16"].holds
    assert by_what["other weights per layer, FP16"].holds
    total = by_what["one layer, FP16 (the sum of the three parts above)"]
    assert not total.holds and total.recomputed == "402.7 MB"
    chain = by_what["one layer after INT8 + 50% MLP sparsity + checkpointing + fusion"]
    assert not chain.holds and "134.3 MB" in chain.why
    assert not by_what["cache efficiency with one compressed layer per card"].holds
    # the deployments are real plans whose every card fits
    for plan in (account.fewest_uncompressed, account.fewest_seed_chain):
        assert plan.feasible and all(s.total_bytes <= s.capacity_bytes for s in plan.stages)
    assert account.fewest_seed_chain.cards < account.fewest_uncompressed.cards
    # the front trades cards for risk monotonically
    cards = [c.cards for c in account.front]
    risks = [c.risk for c in account.front]
    assert cards == sorted(cards) and risks == sorted(risks, reverse=True)
    assert account.front[-1].techniques == ()


def test_paper_command_json():
    result = CliRunner().invoke(app, ["paper", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {c["paper"] for c in doc["claims"]} >= {"376.7 MB", "~144 MB", "49.5 MB", "99%"}
    assert doc["deployments"]["uncompressed"]["feasible"] is True


def test_paper_byte_figures_from_the_dimensions_alone():
    """The seed's layer (hidden 4096, MLP 16384, FP16) derived here from its dimensions, not from
    cachefit's profile: the account and the profile must give the same bytes."""
    from cachefit.profile import profile_model

    h, f, fp16, int8 = 4096, 16384, 2, 1
    qkv, mlp, attn_out, norms = 3 * h * h * fp16, 2 * h * f * fp16, h * h * fp16, 2 * h * fp16
    assert (qkv, mlp, attn_out + norms) == (100_663_296, 268_435_456, 33_570_816)
    layer = qkv + mlp + attn_out + norms
    assert layer == 402_669_568  # the paper says 376.7 MB for the sum of its own 100.7 + 268.4 + 33.6 MB
    by_what = {c.what: c for c in paper_account().claims}
    assert by_what["one layer, FP16 (the sum of the three parts above)"].recomputed == f"{layer / 1e6:.1f} MB"
    weights = profile_model("paper-16l").unit("layers.0").footprint.weight_bytes
    assert weights == layer
    # INT8 (one fp16 scale per output row) on attention (4 h x h matrices) and on the MLP pruned to
    # half its columns (up: h x f/2, down: f/2 x h); norms stay fp16
    int8_attention = 4 * (h * h * int8 + h * fp16)
    int8_mlp = h * (f // 2) * int8 + (f // 2) * fp16 + (f // 2) * h * int8 + h * fp16
    seed_chain = int8_attention + int8_mlp + norms
    assert seed_chain == 134_291_456
    assert f"{seed_chain / 1e6:.1f} MB" in by_what["one layer after INT8 + 50% MLP sparsity"].recomputed
