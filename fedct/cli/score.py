"""Commands that use a trained model: evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import app, console, one_line_errors, print_json
from fedct.data.partition import SPLITS
from fedct.tables import print_evaluation


@app.command()
@one_line_errors
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints: RUN/best, RUN/final.safetensors, or a run directory.")],
    split_dir: Annotated[Path | None, typer.Option("--split", help="Split directory to score on.")] = None,
    on: Annotated[str, typer.Option(click_type=click.Choice((*SPLITS, "local_val", "all")), help="Which rows: val, test, train, local_val or all (flower: each node's val, test, train or all rows).")] = "val",
    data: Annotated[Path | None, typer.Option(help="Score any ImageFolder or CSV instead of a split.")] = None,
    per_client: Annotated[bool, typer.Option(help="Add a row per client's data (cross-site matrix).")] = False,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json, roc.png, confusion.png go. \\[default: a new eval-ON folder beside the first checkpoint]")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% CIs (patients resampled when groups exist).")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tta: Annotated[bool, typer.Option(help="Average each image's and its mirror's probabilities.")] = False,
    threshold: Annotated[float | None, typer.Option(help="Score at this threshold instead of the one each checkpoint chose on its validation data.")] = None,
    engine: Annotated[str, typer.Option(click_type=click.Choice(("embedded", "flower")), help="flower: score on every node's own rows (cross-site), no image moved.")] = "embedded",
    federation: Annotated[str | None, typer.Option(help="flower: the SuperLink connection name.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Score checkpoints: accuracy, sensitivity, specificity, PPV, NPV, F1, AUC with 95% CIs.

    Results at the threshold each checkpoint's run chose on validation data (--threshold in
    pretrain/federate; 0.5 by default), also at 0.5 and at the Youden-optimal threshold of
    these data (optimistic: chosen on the data it scores); calibration (ECE, reliability
    plot). The positive class is named.

    Example: fedct evaluate runs/stage2/final runs/stage1/best --split splits/covid --on val
    """
    from fedct.evaluation import run_evaluate
    from fedct.federated.flower_run import evaluate_on_flower

    if engine == "flower":
        report = evaluate_on_flower(checkpoints, federation=federation, on=on, out=out,
                                    n_boot=bootstrap, seed=seed, threshold=threshold, tta=tta)
    else:
        report = run_evaluate(checkpoints, split_dir=split_dir, on=on, data=data,
                              per_client=per_client, out=out, n_boot=bootstrap, seed=seed,
                              device=device, tta=tta, threshold=threshold)
    if json_out:
        print_json(report)
        return
    print_evaluation(console, report)
    console.print(f"wrote {report['out']}/metrics.json, roc.png, confusion.png, reliability.png")
