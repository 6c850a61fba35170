"""Commands that make data: synth, split."""

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
    floats,
    one_line_errors,
    volume_options,
)
from fedct.data.partition import SCHEMES
from fedct.tables import print_split_table


@command(rich_help_panel="Data")
@one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (an ImageFolder plus dataset.csv).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    difficulty: Annotated[float, typer.Option(help="0 easy .. 1 hard.")] = 0.5,
    sites: Annotated[int, typer.Option(help="Number of simulated hospitals (the site column).")] = 4,
    classes: Annotated[int, typer.Option(help="2: CT_COVID, CT_NonCOVID; 3: CT_CAP (dense consolidation), CT_COVID (ground glass), CT_Normal.")] = 2,
    volumes: Annotated[bool, typer.Option(help="Write --n NIfTI chest CT volumes in Hounsfield units (abdomen to neck, lesions over a run of slices), labelled per patient.")] = False,
    depth: Annotated[int, typer.Option(help="--volumes: slices per volume.")] = 24,
    dicom: Annotated[bool, typer.Option(help="--volumes: write each volume as a DICOM series (a folder of slices) instead of NIfTI.")] = False,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Write synthetic axial chest-CT slices (CT_COVID / CT_NonCOVID, or three classes with
    --classes 3), 4 slices per patient; or, with --volumes, one NIfTI volume per patient.

    Example: fedct synth data/synth --n 400 --seed 0
    """
    if volumes:
        from fedct.data.synthetic_volumes import write_synthetic_volumes

        path = write_synthetic_volumes(out, n=n, seed=seed, size=size, depth=depth,
                                       sites=sites, classes=classes, dicom=dicom,
                                       force=force)
        console.print(f"wrote {n} volumes to {path / 'volumes'} (labels, patients and sites "
                      f"in {path / 'dataset.csv'})")
        return
    from fedct.data.synthetic import write_synthetic

    path = write_synthetic(out, n=n, seed=seed, size=size, difficulty=difficulty, sites=sites,
                           classes=classes, force=force)
    console.print(f"wrote {n} images to {path} (groups and sites in {path / 'dataset.csv'})")


@command(rich_help_panel="Data")
@one_line_errors
def split(
    dataset: Annotated[Path, typer.Argument(help="ImageFolder directory, or CSV path,label[,group][,site][,split] (patient_label instead of label: one label per group); a path may be a NIfTI volume, a DICOM series' folder, or a folder of one patient's slices.")],
    out: Annotated[Path, typer.Option("--out", help="Split directory to write.")],
    scheme: Annotated[str, typer.Option(click_type=click.Choice(SCHEMES), help="Client partition: iid, dirichlet, shards, quantity, natural.")] = "iid",
    clients: Annotated[int | None, typer.Option(help="Number of clients (natural: one per value).")] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (dirichlet: labels, quantity: sizes).")] = 0.5,
    classes_per_client: Annotated[int, typer.Option(help="shards: classes each client holds.")] = 1,
    by: Annotated[str, typer.Option(help="natural: column that names the client (site or group).")] = "site",
    min_per_client: Annotated[int, typer.Option(help="Guaranteed training images per client.")] = 1,
    local_val: Annotated[float, typer.Option(help="Share of each client's training groups kept as its local validation.")] = 0.0,
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.7,0.15,0.15",
    keep_split: Annotated[bool, typer.Option(help="Keep the dataset's own split column.")] = False,
    folds: Annotated[int, typer.Option(help="Cross-validation: cut train + val into this many patient-grouped, stratified folds (test stays test).")] = 0,
    fold: Annotated[int, typer.Option(help="With --folds: the fold (0-based) that becomes val.")] = 0,
    group_pattern: Annotated[str | None, typer.Option(help="Regex on file names giving the patient id (first group).")] = None,
    positive: Annotated[str | None, typer.Option(help="Name of the positive class (default: guessed, e.g. CT_COVID).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same manifest.")] = 0,
    slices: SlicesOption = None,
    window: WindowOption = None,
    hu_rescale: RescaleOption = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images and list them.")] = False,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Split a dataset into train/val/test and partition the training rows over clients.

    Writes manifest.csv, split.yaml and partition.png into --out.

    Example: fedct split ../shared/data/covid-ct/splits.csv --keep-split --clients 5
    --scheme dirichlet --alpha 0.5 --seed 1 --out splits/covid-dir05
    """
    from fedct.data.manifest import SplitOptions, run_split

    options = SplitOptions(
        fractions=floats(fractions, "--fractions"), keep_split=keep_split,
        clients=clients if clients is not None or scheme == "natural" else 5, scheme=scheme,
        alpha=alpha, classes_per_client=classes_per_client, by=by, min_per_client=min_per_client,
        local_val=local_val, seed=seed, folds=folds, fold=fold,
    )
    path, meta = run_split(dataset, out, options, group_pattern=group_pattern, positive=positive,
                           skip_bad=skip_bad, force=force,
                           volumes=volume_options(slices, window, hu_rescale))
    for problem in meta["dataset"]["skipped"]:
        err_console.print(f"skipped: {problem}", highlight=False)
    for warning in meta.get("warnings", []):
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    print_split_table(console, meta)
    console.print(f"wrote {path}/manifest.csv, split.yaml, partition.png")
