"""Commands that use a trained model: evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import (
    RescaleOption,
    SlicesOption,
    WindowOption,
    command,
    console,
    err_console,
    one_line_errors,
    print_json,
    volume_options,
)
from fedct.data.partition import SPLITS
from fedct.errors import FedctError
from fedct.operating_point import RULES
from fedct.tables import print_evaluation, print_explanations, print_predictions


@command(rich_help_panel="Use a model")
@one_line_errors
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints: RUN/best, RUN/final.safetensors, or a run directory.")],
    split_dir: Annotated[Path | None, typer.Option("--split", help="Split directory to score on. \\[default: the split the checkpoints' runs trained on]")] = None,
    on: Annotated[str, typer.Option(click_type=click.Choice((*SPLITS, "local_val", "all")), help="Which rows: val, test, train, local_val or all (flower: each node's val, test, train or all rows).")] = "val",
    data: Annotated[Path | None, typer.Option(help="Score any ImageFolder or CSV instead of a split.")] = None,
    per_client: Annotated[bool, typer.Option(help="Add a row per client's data (cross-site matrix).")] = False,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json, roc.png, confusion.png go. \\[default: a new eval-ON folder beside the first checkpoint]")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% CIs (patients resampled when groups exist).")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tta: Annotated[bool, typer.Option(help="Average each image's and its mirror's probabilities.")] = False,
    threshold: Annotated[str | None, typer.Option(help=f"Score at this threshold instead of the one each checkpoint chose on its validation data: {RULES}. A rule is chosen on the scored rows themselves, which flatters them (the output says so).")] = None,
    engine: Annotated[str, typer.Option(click_type=click.Choice(("embedded", "flower")), help="flower: score on every node's own rows (cross-site), no image moved.")] = "embedded",
    federation: Annotated[str | None, typer.Option(help="flower: the SuperLink connection name.")] = None,
    explain: Annotated[Path | None, typer.Option(help="Folder for Grad-CAM heat maps of every image, a subfolder per checkpoint.")] = None,
    cam_layer: Annotated[str | None, typer.Option(help="--explain: the module Grad-CAM reads. \\[default: the deepest feature stage at least 8 cells a side]")] = None,
    level: Annotated[str, typer.Option(click_type=click.Choice(("slice", "patient")), help="slice: every image; patient: one row per patient (group) or volume, its score the --aggregate of its slices, decided at the checkpoint's patient-level threshold when it stored one for that aggregate.")] = "slice",
    aggregate: Annotated[str, typer.Option(help="--level patient: mean, max or top:K (mean of the K highest) slice probability.")] = "mean",
    slices: SlicesOption = None,
    window: WindowOption = None,
    hu_rescale: RescaleOption = None,
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
        if level != "slice":
            raise FedctError("--level patient with --engine flower: the nodes score slices; "
                             "score patients on a split or --data with the embedded engine")
        report = evaluate_on_flower(checkpoints, federation=federation, on=on, out=out,
                                    n_boot=bootstrap, seed=seed, threshold=threshold, tta=tta)
    else:
        report = run_evaluate(checkpoints, split_dir=split_dir, on=on, data=data,
                              per_client=per_client, out=out, n_boot=bootstrap, seed=seed,
                              device=device, tta=tta, threshold=threshold, explain=explain,
                              cam_layer=cam_layer, level=level, aggregate=aggregate,
                              volumes=volume_options(slices, window, hu_rescale, checkpoints[0]))
    if json_out:
        print_json(report)
        return
    print_evaluation(console, report)
    console.print(f"wrote {report['out']}/metrics.json, roc.png, confusion.png, reliability.png")
    for card in report["model_cards"]:
        console.print(f"updated {card}", highlight=False)
    for name, explained in report.get("explanations", {}).items():
        print_explanations(console, name, explained)


def batch_progress(quiet: bool):
    """A rich bar on a terminal, a plain line per 10 batches in logs; on stderr (stdout may
    carry --json). Returns the callback and the context that shows the bar."""
    import itertools
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if quiet:
        return None, nullcontext()
    if err_console.is_terminal:
        bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=err_console, transient=True)
        task = bar.add_task("predict")
        return lambda done, total: bar.update(task, completed=done, total=total), bar
    calls = itertools.count()

    def line(done: int, total: int) -> None:
        if next(calls) % 10 == 0 or done == total:
            err_console.print(f"predict: {done}/{total} images", highlight=False)

    return line, nullcontext()


@command(rich_help_panel="Use a model", name="predict")
@one_line_errors
def predict_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: RUN/best, RUN/final.safetensors, or a run directory.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images, folders (recursive), CSV lists with a path column, DICOM files or series folders.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write, a row per image (and OUT.groups.csv, a row per patient or series).")],
    aggregate: Annotated[str, typer.Option(help="Per patient, series or volume: mean, max (any slice positive) or top:K (mean of the K highest) slice probability; decided at the checkpoint's patient-level threshold when it stored one for this aggregate, else at its slice threshold.")] = "mean",
    group_column: Annotated[str | None, typer.Option(help="CSV lists: the column naming each image's patient or series (must be there). \\[default: group, where present]")] = None,
    threshold: Annotated[float | None, typer.Option(help="Decide at this threshold instead of the checkpoint's stored one.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable inputs and list them (otherwise the first stops the run, nothing written).")] = False,
    explain: Annotated[Path | None, typer.Option(help="Folder for Grad-CAM heat maps: a PNG per image and contact_sheet.png.")] = None,
    cam_layer: Annotated[str | None, typer.Option(help="--explain: the module Grad-CAM reads. \\[default: the deepest feature stage at least 8 cells a side]")] = None,
    tta: Annotated[bool, typer.Option(help="Average each image's and its mirror's probabilities.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    slices: SlicesOption = None,
    window: WindowOption = None,
    hu_rescale: RescaleOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print every prediction as JSON on stdout.")] = False,
) -> None:
    """Classify new, unlabelled images at the checkpoint's stored threshold.

    A DICOM file gives one slice (a multi-frame file: its middle frame, as in training); a
    folder of DICOM files is grouped by series. A NIfTI volume (.nii, .nii.gz) gives the
    slices --slices keeps, grouped by volume.

    Example: fedct predict runs/stage2/final scans/ --out preds.csv --explain heatmaps/
    """
    from fedct.predict import run_predict

    callback, shown = batch_progress(quiet=False)
    with shown:
        report = run_predict(checkpoint, inputs, out=out, aggregate_rule=aggregate,
                             group_column=group_column, threshold=threshold, skip_bad=skip_bad,
                             explain=explain, cam_layer=cam_layer, tta=tta, device=device,
                             force=force, on_batch=callback,
                             volumes=volume_options(slices, window, hu_rescale, checkpoint))
    for problem in report["skipped"]:
        err_console.print(f"skipped: {problem}", highlight=False, soft_wrap=True)
    for note in report["notes"]:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if json_out:
        print_json(report)
        return
    print_predictions(console, report)


@command(rich_help_panel="Use a model", name="export")
@one_line_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: RUN/best, RUN/final.safetensors, or a run directory.")],
    out: Annotated[Path, typer.Option("--out", help="Model file to write; its preprocessing and threshold go to OUT.json.")],
    fmt: Annotated[str, typer.Option("--format", click_type=click.Choice(("onnx", "torchscript")), help="onnx (checked with onnxruntime) or torchscript (deprecated by PyTorch).")] = "onnx",
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the description as JSON on stdout.")] = False,
) -> None:
    """Export a checkpoint for another runtime: image batch in, class probabilities out.

    The export is reloaded in its runtime and must give fedct's probabilities within 1e-4 on
    a test batch, or nothing is written.

    Example: fedct export runs/stage2/final --format onnx --out model.onnx
    """
    from fedct.export import run_export

    report = run_export(checkpoint, fmt=fmt, out=out, force=force)
    if json_out:
        print_json(report)
        return
    checked = report["checked"]
    decision = (f"threshold {report['threshold']:.3f} for {report['positive']}"
                if report["positive"] else "the class of highest probability")
    console.print(f"wrote {report['out']} and {report['sidecar']}: {report['classes']}, "
                  f"{decision}; "
                  f"{checked['runtime']} matches fedct within {checked['max_abs_difference']:.1e} "
                  f"on {checked['batch']} images", highlight=False)
