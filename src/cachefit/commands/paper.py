"""``cachefit paper``: the seed's claims for its 16-layer model next to what cachefit recomputes."""


from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from cachefit.commands.options import (
        BatchOpt,
        JsonOption,
        ModeOpt,
        ModeOption,
        SeqOpt,
        console,
        handles_errors,
        print_json,
    )

    @app.command()
    @handles_errors
    def paper(
        device: Annotated[str, typer.Option("--device", "-d", help="Catalog device whose on-chip level is the seed's '50 MB L2'.")] = "h100",
        batch: BatchOpt = 1,
        seq: SeqOpt = 1024,
        mode: ModeOption = ModeOpt.decode,
        as_json: JsonOption = False,
    ) -> None:
        """The seed paper's claims (16 layers, hidden 4096, 50 MB L2) beside cachefit's recomputation."""
        from rich.table import Table

        from cachefit.report.paper import paper_account
        from cachefit.report.tables import candidates_table
        from cachefit.units import Workload

        account = paper_account(Workload(batch=batch, seq_len=seq, mode=mode.value), device=device)
        if as_json:
            print_json(account.to_dict())
            return
        wl = account.workload
        table = Table(
            title=f"paper-16l: the seed's claims vs cachefit ({wl.mode.value}, batch {wl.batch}, {wl.seq_len} tokens, "
                  f"FP16; {account.device} on-chip {account.capacity_bytes:,} B)",
            title_justify="left", show_lines=True,
        )
        for col in ("claim", "paper", "recomputed", "holds", "why"):
            table.add_column(col, overflow="fold")
        for claim in account.claims:
            table.add_row(claim.what, claim.paper, claim.recomputed,
                          "[green]yes[/]" if claim.holds else "[bold red]no[/]", claim.why)
        console.print(table)
        deploy = Table(title="deployments that really fit (every card recomputed within its capacity)",
                       title_justify="left")
        for col in ("plan", "cards", "mean utilization", "least-used card", "notes"):
            deploy.add_column(col, overflow="fold")
        for name, plan in (("uncompressed", account.fewest_uncompressed),
                           ("the seed's chain allowed", account.fewest_seed_chain)):
            deploy.add_row(name, str(plan.cards), f"{plan.mean_utilization * 100:.1f}%",
                           f"{min(s.utilization for s in plan.stages) * 100:.1f}%", "; ".join(plan.notes) or "-")
        console.print(deploy)
        front = candidates_table(account.front)
        front.title = "Pareto front: fewest cards vs quality risk (every technique allowed)"
        console.print(front)
