"""The `fedct` command line: a thin Typer layer over functions the tests call directly."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedct import __version__
from fedct.errors import FedctError

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
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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
    scheme: Annotated[str, typer.Option(help="Client partition: iid, dirichlet, shards, quantity, natural.")] = "iid",
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
    print_split_table(meta)
    console.print(f"wrote {path}/manifest.csv, split.yaml, partition.png")


def print_split_table(meta: dict) -> None:
    classes = meta["classes"]
    part = meta["partition"]
    table = Table(title=f"{part['scheme']} partition over {part['clients']} clients (training rows)")
    table.add_column("client", justify="right")
    for c in classes:
        table.add_column(c + (" (+)" if c == meta.get("positive") else ""), justify="right")
    table.add_column("total", justify="right")
    has_local = any(sum(cl["local_val"].values()) for cl in meta["clients"])
    if has_local:
        table.add_column("local val", justify="right")
    for cl in meta["clients"]:
        cells = [str(cl["id"]), *(str(cl["train"][c]) for c in classes), str(cl["total"])]
        if has_local:
            cells.append(str(sum(cl["local_val"].values())))
        table.add_row(*cells)
    for name, counts in meta["counts"].items():
        table.add_row(f"[dim]{name}[/]", *(f"[dim]{counts[c]}[/]" for c in classes),
                      f"[dim]{sum(counts.values())}[/]", *([""] if has_local else []))
    console.print(table)
    console.print(f"heterogeneity: mean total-variation distance to the pooled label "
                  f"distribution = {meta['heterogeneity']['mean_tv_distance']:.3f} (0 = IID)")


def run() -> None:  # pragma: no cover - console entry for `python -m fedct`
    app(prog_name="fedct")
    sys.exit(0)


def _federate_on_flower(split_dir: Path, out: Path, cfg, *, init: str, federation: str | None,
                        dry_run: bool, certs: Path | None, round_timeout: float, resume: bool,
                        force: bool) -> None:
    import shutil
    import tempfile

    from fedct.data.manifest import load_split
    from fedct.federated import flower_run

    split = load_split(split_dir)
    if federation is None:
        raise FedctError("--engine flower needs --federation NAME (a connection in $FLWR_HOME/config.toml)")
    if dry_run:
        submit = (f"fedct federate {split_dir} --init {init} --out {out} --engine flower "
                  f"--federation {federation}")
        lines = flower_run.role_commands(split_dir=split_dir, clients=split.num_clients,
                                         federation=federation, certs=certs)
        lines += ["# coordinator: submit the run (writes the Flower app, calls flwr run --stream)",
                  submit]
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        return
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise FedctError(f"{out}: exists and is not empty (use --force to replace it, "
                             "or --resume to continue it)")
        shutil.rmtree(out)
    values = flower_run.run_config(cfg, init=init, out=out, split_dir=split_dir,
                                   num_clients=split.num_clients, round_timeout=round_timeout,
                                   node_wait=120.0, resume=resume)
    with tempfile.TemporaryDirectory(prefix="fedct-flower-app-") as app_dir:
        flower_run.write_app(Path(app_dir), values)
        code = flower_run.submit(Path(app_dir), federation)
    if code != 0:
        raise FedctError(f"flwr run exited with code {code} (see its output above)")


@app.command()
@one_line_errors
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[list[str] | None, typer.Option(help="Host name or IP the SuperLink is reached at (repeat). [default: 127.0.0.1, localhost]")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Make a private CA and a SuperLink certificate for TLS on Flower.

    Example: fedct certs certs/ --host superlink.hospital-net.example --host 10.0.0.5
    """
    from fedct.federated.certs import make_certificates

    paths = make_certificates(out, host or ["127.0.0.1", "localhost"], days=days)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    console.print("SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile "
                  "server.key; SuperNodes and flwr: trust ca.crt (keep ca.key offline)")


def _print_json(payload: dict) -> None:
    import json

    from fedct.evaluation import json_safe

    sys.stdout.write(json.dumps(json_safe(payload), indent=2) + "\n")


@app.command()
@one_line_errors
def pretrain(
    split_dir: Annotated[Path, typer.Argument(help="Split directory from `fedct split`.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture. [default: tf_efficientnet_lite0]")] = None,
    pretrained: Annotated[str | None, typer.Option(help="hub, none, or a weights file / fedct checkpoint. [default: hub]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs. [default: 10]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size. [default: 32]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine, warm-up). [default: 1e-3]")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels. [default: 224]")] = None,
    freeze: Annotated[str | None, typer.Option(help="full, head, or last-N blocks. [default: full]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. [default: 0]")] = None,
    clients: Annotated[str | None, typer.Option(help="Pretrain on these clients' rows only, e.g. 0,2.")] = None,
    rows: Annotated[str | None, typer.Option(help="Pretrain on rows whose site, split or client equals this.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
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
    from fedct.config import PretrainConfig, build_config
    from fedct.pretrain import run_pretrain
    from fedct.runs import read_config

    overrides = {"model": model, "pretrained": pretrained, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "freeze": freeze,
                 "seed": seed, "clients": clients, "rows": rows, "device": device}
    if resume is not None:
        saved = read_config(resume)["config"]
        cfg = build_config(PretrainConfig, None, {**saved, **{k: v for k, v in overrides.items()
                                                              if v is not None}})
        out = resume
    else:
        if out is None:
            raise FedctError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = build_config(PretrainConfig, config, overrides)
    report = run_pretrain(split_dir, out, cfg, resume=resume is not None, force=force,
                          quiet=quiet or json_out, console=console)
    if json_out:
        _print_json(report)
    elif not quiet:
        best = report["best"]
        table = Table(title=f"stage 1: best epoch {report['best_epoch']} by {report['monitor']}")
        for column in ("val_acc", "val_auc", "val_sensitivity", "val_specificity", "val_loss"):
            table.add_column(column, justify="right")
        table.add_row(*(f"{best[c]:.3f}" for c in ("val_acc", "val_auc", "val_sensitivity",
                                                    "val_specificity", "val_loss")))
        console.print(table)
        console.print(f"wrote {out}/best.safetensors (+ last, summary.csv, report.json); "
                      f"{report['train_images_per_second']} train images/s")


@app.command()
@one_line_errors
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints: RUN/best, RUN/final.safetensors, or a run directory.")],
    split_dir: Annotated[Path | None, typer.Option("--split", help="Split directory to score on.")] = None,
    on: Annotated[str, typer.Option(help="Which split: val, test, train or local_val.")] = "val",
    data: Annotated[Path | None, typer.Option(help="Score any ImageFolder or CSV instead of a split.")] = None,
    per_client: Annotated[bool, typer.Option(help="Add a row per client's data (cross-site matrix).")] = False,
    out: Annotated[Path | None, typer.Option(help="Where metrics.json, roc.png, confusion.png go. [default: beside the first checkpoint]")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% CIs (patients resampled when groups exist).")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tta: Annotated[bool, typer.Option(help="Average each image's and its mirror's probabilities.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Score checkpoints: accuracy, sensitivity, specificity, PPV, NPV, F1, AUC with 95% CIs.

    Results at threshold 0.5 and at the Youden-optimal threshold (chosen on the same data,
    so optimistic); the positive class is named.

    Example: fedct evaluate runs/stage2/final runs/stage1/best --split splits/covid --on val
    """
    from fedct.evaluation import run_evaluate

    report = run_evaluate(checkpoints, split_dir=split_dir, on=on, data=data,
                          per_client=per_client, out=out, n_boot=bootstrap, seed=seed,
                          device=device, tta=tta)
    if json_out:
        _print_json(report)
        return
    print_evaluation(report)
    console.print(f"wrote {report['out']}/metrics.json, roc.png, confusion.png")


def _cell(metrics: dict, name: str) -> str:
    value = metrics[name]
    ci = metrics.get("ci95", {}).get(name)
    text = "-" if value != value else f"{value:.3f}"
    if ci and ci[0] == ci[0]:
        text += f"\n[dim]{ci[0]:.2f}-{ci[1]:.2f}[/]"
    return text


def print_evaluation(report: dict) -> None:
    positive = report["results"][0]["positive"]
    table = Table(title=f"{report['data']}: positive class {positive}, threshold 0.5, "
                        f"95% CI by {'patient' if report['grouped_bootstrap'] else 'image'} bootstrap")
    columns = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "auc")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("data", no_wrap=True)
    table.add_column("n", justify="right")
    for c in columns:
        table.add_column(c.replace("precision", "PPV").replace("npv", "NPV"), justify="right")
    table.add_column("Youden t: sens/spec", justify="right")
    for r in report["results"]:
        m = r["threshold_0.5"]
        y = r["youden"]
        table.add_row(r["checkpoint"], r["data"], str(r["n"]), *(_cell(m, c) for c in columns),
                      f"{y['threshold']:.2f}: {y['sensitivity']:.2f}/{y['specificity']:.2f}")
    console.print(table)


@app.command()
@one_line_errors
def federate(
    split_dir: Annotated[Path, typer.Argument(help="Split directory from `fedct split`.")],
    init: Annotated[str | None, typer.Option(help="Stage 1 checkpoint (RUN/best), or hub / none / a weights file with --model.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture when --init is not a checkpoint.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds. [default: 10]")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round. [default: 1]")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round (replaces --local-epochs).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Share of clients sampled each round (seeded). [default: 1.0]")] = None,
    clients_per_round: Annotated[int | None, typer.Option(help="Clients sampled each round (replaces --fraction).")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg, fedprox, fedavgm, fedadam, fedyogi. [default: fedavg]")] = None,
    mu: Annotated[float | None, typer.Option(help="FedProx proximal weight. [default: 0.01]")] = None,
    server_lr: Annotated[float | None, typer.Option(help="Server learning rate (FedAvgM/FedAdam/FedYogi). [default: 1.0]")] = None,
    fedbn: Annotated[bool | None, typer.Option("--fedbn/--no-fedbn", help="Keep normalisation layers local per client (FedBN).")] = None,
    freeze: Annotated[str | None, typer.Option(help="full, head, or last-N blocks. [default: full]")] = None,
    lr: Annotated[float | None, typer.Option(help="Client learning rate. [default: 1e-3]")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="constant, or cosine: client lr decays over the rounds. [default: constant]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Client batch size. [default: 32]")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels. [default: 224]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (sampling, data order, noise). [default: 0]")] = None,
    dp: Annotated[bool | None, typer.Option("--dp/--no-dp", help="Differentially private client training (Opacus DP-SGD).")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="Per-client epsilon for the whole run. [default: 8]")] = None,
    delta: Annotated[float | None, typer.Option(help="DP delta. [default: 1e-5]")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Per-sample gradient clipping norm. [default: 1.0]")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="Fixed noise instead of calibrating to --target-epsilon.")] = None,
    dp_train: Annotated[str | None, typer.Option(help="head (keeps pretrained BatchNorm) or full (GroupNorm). [default: head]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
    engine: Annotated[str, typer.Option(help="embedded (one process) or flower (Flower's Deployment Engine).")] = "embedded",
    federation: Annotated[str | None, typer.Option(help="flower: the SuperLink connection name in $FLWR_HOME/config.toml.")] = None,
    dry_run: Annotated[bool, typer.Option(help="flower: print the SuperLink, SuperNode and submit commands, run nothing.")] = False,
    certs: Annotated[Path | None, typer.Option(help="flower --dry-run: folder from `fedct certs` (TLS commands).")] = None,
    round_timeout: Annotated[float, typer.Option(help="flower: seconds to wait for a round's replies.")] = 3600.0,
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
    from fedct.config import FederateConfig, build_config
    from fedct.federated.simulation import run_federate
    from fedct.runs import read_config

    overrides = {"model": model, "rounds": rounds, "local_epochs": local_epochs,
                 "local_steps": local_steps, "fraction": fraction,
                 "clients_per_round": clients_per_round, "strategy": strategy, "mu": mu,
                 "server_lr": server_lr, "fedbn": fedbn, "freeze": freeze, "lr": lr,
                 "lr_schedule": lr_schedule, "batch_size": batch_size, "image_size": image_size,
                 "seed": seed, "dp": dp,
                 "target_epsilon": target_epsilon, "delta": delta, "max_grad_norm": max_grad_norm,
                 "noise_multiplier": noise_multiplier, "dp_train": dp_train, "device": device}
    if resume is not None:
        saved = read_config(resume)
        cfg = build_config(FederateConfig, None, {**saved["config"], **{
            k: v for k, v in overrides.items() if v is not None}})
        init, out = saved["init"], resume
    else:
        if out is None or init is None:
            raise FedctError("--init CKPT and --out RUN_DIR are required (or --resume RUN_DIR)")
        cfg = build_config(FederateConfig, config, overrides)
    if engine not in ("embedded", "flower"):
        raise FedctError(f"--engine {engine!r}: choose embedded or flower")
    if engine == "flower":
        _federate_on_flower(split_dir, out, cfg, init=init, federation=federation,
                            dry_run=dry_run, certs=certs, round_timeout=round_timeout,
                            resume=resume is not None, force=force)
        from fedct.runs import REPORT

        if dry_run or not (out / REPORT).is_file():
            return
        import json

        report = json.loads((out / REPORT).read_text())
    else:
        report = run_federate(split_dir, out, cfg, init=init, resume=resume is not None,
                              force=force, quiet=quiet or json_out, console=console)
    if json_out:
        _print_json(report)
    elif not quiet:
        final = report["final"]
        console.print(f"final (round {report['rounds']}): val acc {final['val_acc']:.3f}, "
                      f"AUC {final['val_auc']:.3f}; best round {report['best_round']} by "
                      f"{report['monitor']}"
                      + (f"; max epsilon {report['max_epsilon']:.2f}" if report["dp"] else ""))
        console.print(f"wrote {out}/final.safetensors (+ best, last, summary.csv, report.json)")


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
    Settings: examples/demo.yaml.

    Example: fedct demo --out demo-out
    """
    from fedct.config import FederateConfig, PretrainConfig, build_config
    from fedct.data.manifest import SplitOptions, run_split
    from fedct.data.synthetic import write_synthetic
    from fedct.evaluation import run_evaluate
    from fedct.federated.simulation import run_federate
    from fedct.pretrain import run_pretrain

    if out.exists() and any(out.iterdir()) and not force:
        raise FedctError(f"{out}: exists and is not empty (use --force to replace it)")
    examples = Path(__file__).resolve().parent.parent / "examples"
    if not (examples / "demo-pretrain.yaml").is_file():
        raise FedctError(f"{examples}/demo-*.yaml not found: run the demo from a source checkout")
    data = write_synthetic(out / "data", n=400, seed=seed, force=True)
    console.rule("1. synth")
    console.print(f"400 synthetic CT slices (100 patients, 4 sites) in {data}")
    console.rule("2. split")
    split_dir, meta = run_split(data / "dataset.csv", out / "split",
                                SplitOptions(scheme="dirichlet", alpha=0.5, clients=4, seed=seed,
                                             min_per_client=20),
                                force=True)
    print_split_table(meta)
    console.rule("3. stage 1: pretrain on client 0's share")
    stage1 = run_pretrain(split_dir, out / "stage1",
                          build_config(PretrainConfig, examples / "demo-pretrain.yaml",
                                       {"seed": seed}),
                          force=True, console=console)
    console.rule("4. stage 2: federate over 4 clients")
    run_federate(split_dir, out / "stage2",
                 build_config(FederateConfig, examples / "demo-federate.yaml", {"seed": seed}),
                 init=str(out / "stage1" / "best"), force=True, console=console)
    console.rule("5. evaluate on test")
    report = run_evaluate([out / "stage1" / "best", out / "stage2" / "final"], split_dir=split_dir,
                          on="test", out=out / "evaluation", n_boot=500, seed=seed)
    print_evaluation(report)
    console.print(f"stage 1 best epoch {stage1['best_epoch']}; everything is under {out}/")
