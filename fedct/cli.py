"""The `fedct` command line: a thin Typer layer over functions the tests call directly."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

from fedct import __version__
from fedct.config import CHOICES, FED_MONITORS
from fedct.config import THRESHOLD_RULES as RULES
from fedct.data.partition import SCHEMES, SPLITS
from fedct.errors import FedctError
from fedct.federated.protocol import ROUND_TIMEOUT_SECONDS
from fedct.tables import print_evaluation, print_federate, print_split_table, print_stage1

app = typer.Typer(
    name="fedct",
    help="Two-stage federated transfer learning for medical image classification.\n\n"
    "split -> pretrain (stage 1, central) -> federate (stage 2, federated, optional DP) -> evaluate",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables are wide; when output is not a terminal (logs, CI), do not squeeze them into 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=130)
err_console = Console(stderr=True)


def one_line_errors(func):
    """Turn a FedctError into `error: ...` on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FedctError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a read-only folder, a full disk: what fedct could not write
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"fedct {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """fedct: split, pretrain, federate, evaluate."""


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise FedctError(f"{option} {text!r}: expected comma-separated numbers") from None


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (an ImageFolder plus dataset.csv).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    difficulty: Annotated[float, typer.Option(help="0 easy .. 1 hard.")] = 0.5,
    sites: Annotated[int, typer.Option(help="Number of simulated hospitals (the site column).")] = 4,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Write synthetic axial chest-CT slices (CT_COVID / CT_NonCOVID), 4 slices per patient.

    Example: fedct synth data/synth --n 400 --seed 0
    """
    from fedct.data.synthetic import write_synthetic

    path = write_synthetic(out, n=n, seed=seed, size=size, difficulty=difficulty, sites=sites,
                           force=force)
    console.print(f"wrote {n} images to {path} (groups and sites in {path / 'dataset.csv'})")


@app.command()
@one_line_errors
def split(
    dataset: Annotated[Path, typer.Argument(help="ImageFolder directory, or CSV path,label[,group][,site][,split].")],
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
    group_pattern: Annotated[str | None, typer.Option(help="Regex on file names giving the patient id (first group).")] = None,
    positive: Annotated[str | None, typer.Option(help="Name of the positive class (default: guessed, e.g. CT_COVID).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same manifest.")] = 0,
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
        fractions=_floats(fractions, "--fractions"), keep_split=keep_split,
        clients=clients if clients is not None or scheme == "natural" else 5, scheme=scheme,
        alpha=alpha, classes_per_client=classes_per_client, by=by, min_per_client=min_per_client,
        local_val=local_val, seed=seed,
    )
    path, meta = run_split(dataset, out, options, group_pattern=group_pattern, positive=positive,
                           skip_bad=skip_bad, force=force)
    for problem in meta["dataset"]["skipped"]:
        err_console.print(f"skipped: {problem}", highlight=False)
    for warning in meta.get("warnings", []):
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    print_split_table(console, meta)
    console.print(f"wrote {path}/manifest.csv, split.yaml, partition.png")


def run() -> None:  # pragma: no cover - console entry for `python -m fedct`
    app(prog_name="fedct")
    sys.exit(0)


@app.command()
@one_line_errors
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[list[str] | None, typer.Option(help="Host name or IP the SuperLink is reached at (repeat). \\[default: 127.0.0.1, localhost]")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace an existing CA (every node must then get the new ca.crt).")] = False,
) -> None:
    """Make a private CA and a SuperLink certificate for TLS on Flower.

    Example: fedct certs certs/ --host superlink.hospital-net.example --host 10.0.0.5
    """
    from fedct.federated.certs import make_certificates

    paths = make_certificates(out, host or ["127.0.0.1", "localhost"], days=days, force=force)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    console.print("SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile "
                  "server.key; SuperNodes and flwr: trust ca.crt (keep ca.key offline)")


def _print_json(payload: dict) -> None:
    import json

    from fedct.runs import json_safe

    sys.stdout.write(json.dumps(json_safe(payload), indent=2) + "\n")


@app.command()
@one_line_errors
def pretrain(
    split_dir: Annotated[Path, typer.Argument(help="Split directory from `fedct split`.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture. \\[default: tf_efficientnet_lite0]")] = None,
    pretrained: Annotated[str | None, typer.Option(help="hub, none, or a weights file / fedct checkpoint. \\[default: hub]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs. \\[default: 10]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size. \\[default: 32]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine, warm-up). \\[default: 1e-3]")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels. \\[default: 224]")] = None,
    freeze: Annotated[str | None, typer.Option(help="full, head, or last-N blocks. \\[default: full]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. \\[default: 0]")] = None,
    threshold: Annotated[str | None, typer.Option(help=f"Operating point chosen on val: {RULES}. \\[default: 0.5]")] = None,
    clients: Annotated[str | None, typer.Option(help="Pretrain on these clients' rows only, e.g. 0,2.")] = None,
    rows: Annotated[str | None, typer.Option(help="Pretrain on rows whose site, split or client equals this.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. \\[default: auto]")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON on stdout.")] = False,
) -> None:
    """Stage 1: adapt a pretrained timm backbone centrally on the split's training rows.

    Writes config.yaml, summary.csv (one row per epoch), best/last.safetensors (+ .json),
    report.json.

    Example: fedct pretrain splits/covid --out runs/stage1 --pretrained
    ../shared/weights/tf_efficientnet_lite0_in1k.safetensors --epochs 10
    """
    from fedct.config import PretrainConfig, resolve_config
    from fedct.pretrain import run_pretrain

    overrides = {"model": model, "pretrained": pretrained, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "freeze": freeze,
                 "seed": seed, "threshold": threshold, "clients": clients, "rows": rows,
                 "device": device}
    cfg, _ = resolve_config(PretrainConfig, path=config, overrides=overrides, resume_dir=resume)
    out = resume or out
    if out is None:
        raise FedctError("--out RUN_DIR is required (or --resume RUN_DIR)")
    report = run_pretrain(split_dir, out, cfg, resume=resume is not None, force=force,
                          quiet=quiet or json_out, console=console)
    if json_out:
        _print_json(report)
    elif not quiet:
        print_stage1(console, report, out)


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
        _print_json(report)
        return
    print_evaluation(console, report)
    console.print(f"wrote {report['out']}/metrics.json, roc.png, confusion.png, reliability.png")


@app.command()
@one_line_errors
def federate(
    split_dir: Annotated[Path | None, typer.Argument(help="Split directory from `fedct split` (optional on a Flower coordinator that holds no data).")] = None,
    init: Annotated[str | None, typer.Option(help="Stage 1 checkpoint (RUN/best), or hub / none / a weights file with --model.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture when --init is not a checkpoint.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds. \\[default: 10]")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round. \\[default: 1]")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round (replaces --local-epochs).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Share of clients sampled each round (seeded). \\[default: 1.0]")] = None,
    clients_per_round: Annotated[int | None, typer.Option(help="Clients sampled each round (replaces --fraction).")] = None,
    strategy: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["strategy"]), help="fedavg, fedprox, fedavgm, fedadam, fedyogi, scaffold. \\[default: fedavg]")] = None,
    local_loss: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["local_loss"]), help="Client loss that corrects for its own label mix: ce, balanced-softmax, fedlc, fedrs. \\[default: ce]")] = None,
    mu: Annotated[float | None, typer.Option(help="FedProx proximal weight. \\[default: 0.01]")] = None,
    server_lr: Annotated[float | None, typer.Option(help="Server learning rate (FedAvgM/FedAdam/FedYogi/SCAFFOLD). \\[default: 1.0]")] = None,
    fedbn: Annotated[bool | None, typer.Option("--fedbn/--no-fedbn", help="Keep normalisation layers local per client (FedBN).")] = None,
    freeze: Annotated[str | None, typer.Option(help="full, head, or last-N blocks. \\[default: full]")] = None,
    lr: Annotated[float | None, typer.Option(help="Client learning rate. \\[default: 1e-3]")] = None,
    lr_schedule: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["lr_schedule"]), help="constant, or cosine: client lr decays over the rounds. \\[default: constant]")] = None,
    batch_size: Annotated[str | None, typer.Option(help="Client batch size, or all (full-batch DP). \\[default: 32]")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels. \\[default: the --init checkpoint's, else 224]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (sampling, data order, noise). \\[default: 0]")] = None,
    val: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["val"]), help="Validate on the coordinator's val rows (pooled), the clients' own (federated), or both. \\[default: both]")] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Share of clients that score the global model each round (seeded). \\[default: 1.0]")] = None,
    eval_release: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["eval_release"]), help="What a client sends of its val rows: score histograms, or only confusion counts at a fixed --threshold. \\[default: histograms]")] = None,
    monitor: Annotated[str | None, typer.Option(click_type=click.Choice(FED_MONITORS), help="Best round by this; auto: val_auc with pooled val, else fed_auc. \\[default: auto]")] = None,
    threshold: Annotated[str | None, typer.Option(help=f"Operating point chosen on val: {RULES}. \\[default: 0.5]")] = None,
    dp: Annotated[bool | None, typer.Option("--dp/--no-dp", help="Differentially private client training (Opacus DP-SGD).")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="Per-client epsilon for the whole run. \\[default: 8]")] = None,
    delta: Annotated[float | None, typer.Option(help="DP delta. \\[default: 1e-5]")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Per-sample gradient clipping norm. \\[default: 1.0]")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="Fixed noise instead of calibrating to --target-epsilon.")] = None,
    dp_train: Annotated[str | None, typer.Option(click_type=click.Choice(CHOICES["dp_train"]), help="head, norms (head + norms' scale and shift, pretrained statistics) or full (GroupNorm). \\[default: head]")] = None,
    feature_views: Annotated[int | None, typer.Option(help="Head-only training: augmented views per image in the feature cache. \\[default: 1]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. \\[default: auto]")] = None,
    engine: Annotated[str, typer.Option(click_type=click.Choice(("embedded", "flower")), help="embedded (one process) or flower (Flower's Deployment Engine).")] = "embedded",
    federation: Annotated[str | None, typer.Option(help="flower: the SuperLink connection name in $FLWR_HOME/config.toml.")] = None,
    dry_run: Annotated[bool, typer.Option(help="flower: print the SuperLink, SuperNode and submit commands, run nothing.")] = False,
    certs: Annotated[Path | None, typer.Option(help="flower --dry-run: folder from `fedct certs` (TLS commands).")] = None,
    clients: Annotated[int | None, typer.Option(help="flower without a split: how many clients (default: the nodes that answer).")] = None,
    round_timeout: Annotated[float, typer.Option(help="flower: seconds to wait for a round's replies.")] = ROUND_TIMEOUT_SECONDS,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
) -> None:
    """Stage 2: fine-tune a model by federated rounds over the split's clients.

    Writes config.yaml, summary.csv (one row per round), privacy.csv (with --dp),
    round/best/last/final checkpoints, report.json.

    Example: fedct federate splits/covid --init runs/stage1/best --out runs/stage2
    --rounds 10 --strategy fedavg

    With --engine flower the same run goes through `flwr run` to a SuperLink whose
    SuperNodes each read only their own images; --dry-run prints the three roles' commands.
    """
    from fedct.config import FederateConfig, resolve_config
    from fedct.federated import flower_run
    from fedct.federated.simulation import run_federate

    overrides = {"model": model, "rounds": rounds, "local_epochs": local_epochs,
                 "local_steps": local_steps, "fraction": fraction,
                 "clients_per_round": clients_per_round, "strategy": strategy,
                 "local_loss": local_loss, "mu": mu,
                 "server_lr": server_lr, "fedbn": fedbn, "freeze": freeze, "lr": lr,
                 "lr_schedule": lr_schedule, "batch_size": batch_size, "image_size": image_size,
                 "seed": seed, "dp": dp, "val": val, "eval_fraction": eval_fraction,
                 "eval_release": eval_release,
                 "monitor": monitor, "threshold": threshold,
                 "target_epsilon": target_epsilon, "delta": delta, "max_grad_norm": max_grad_norm,
                 "noise_multiplier": noise_multiplier, "dp_train": dp_train,
                 "feature_views": feature_views, "device": device}
    cfg, saved = resolve_config(FederateConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None:
        init, out = saved["init"], resume
    if out is None or init is None:
        raise FedctError("--init CKPT and --out RUN_DIR are required (or --resume RUN_DIR)")
    if engine == "flower" and dry_run:
        for line in flower_run.dry_run_lines(split_dir, out, cfg, init=init, clients=clients,
                                             federation=federation, certs=certs):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        return
    if engine == "flower":
        report = flower_run.run_on_flower(split_dir, out, cfg, init=init, federation=federation,
                                          round_timeout=round_timeout, resume=resume is not None,
                                          force=force, clients=clients)
    elif split_dir is None:
        raise FedctError("SPLIT_DIR is required with the embedded engine (only a Flower "
                         "coordinator runs without one)")
    else:
        report = run_federate(split_dir, out, cfg, init=init, resume=resume is not None,
                              force=force, quiet=quiet or json_out, console=console)
    if json_out:
        _print_json(report)
    elif not quiet:
        print_federate(console, report, out)


@app.command()
@one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, split and runs.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """The whole two-stage pipeline on synthetic CT, offline, in a few minutes on 2 CPU cores.

    synth -> split over 4 non-IID clients -> stage 1 on client 0's share (standing in for
    data that may be pooled) -> stage 2 federated over all 4 -> evaluate on test.
    Settings: examples/demo-pretrain.yaml and examples/demo-federate.yaml.

    Example: fedct demo --out demo-out
    """
    from fedct.demo import run_demo

    run_demo(out, seed=seed, force=force, console=console)
