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
