"""Commands that train: pretrain (stage 1), federate (stage 2), and the demo of both."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import app, console, one_line_errors, print_json
from fedct.config import CHOICES, FED_MONITORS
from fedct.config import THRESHOLD_RULES as RULES
from fedct.errors import FedctError
from fedct.federated.protocol import ROUND_TIMEOUT_SECONDS
from fedct.tables import print_federate, print_stage1


@app.command()
@one_line_errors
def pretrain(
    split_dir: Annotated[Path | None, typer.Argument(help="Split directory from `fedct split` (with --resume: the run's own).")] = None,
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
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard event files to RUN/tensorboard (curves.png and MODEL_CARD.md are always written).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON on stdout.")] = False,
) -> None:
    """Stage 1: adapt a pretrained timm backbone centrally on the split's training rows.

    Writes config.yaml, summary.csv (one row per epoch), best/last.safetensors (+ .json),
    report.json, curves.png, MODEL_CARD.md.

    Example: fedct pretrain splits/covid --out runs/stage1 --pretrained
    ../shared/weights/tf_efficientnet_lite0_in1k.safetensors --epochs 10
    """
    from fedct.config import PretrainConfig, resolve_config
    from fedct.pretrain import run_pretrain

    overrides = {"model": model, "pretrained": pretrained, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "freeze": freeze,
                 "seed": seed, "threshold": threshold, "clients": clients, "rows": rows,
                 "device": device, "tensorboard": tensorboard}
    cfg, saved = resolve_config(PretrainConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None and split_dir is None and saved.get("split"):
        split_dir = Path(saved["split"])
    out = resume or out
    if out is None or split_dir is None:
        raise FedctError("SPLIT_DIR and --out RUN_DIR are required (or --resume RUN_DIR)")
    report = run_pretrain(split_dir, out, cfg, resume=resume is not None, force=force,
                          quiet=quiet or json_out, console=console)
    if json_out:
        print_json(report)
    elif not quiet:
        print_stage1(console, report, out)


@app.command()
@one_line_errors
def selfsup(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Images, folders (searched recursively) or CSV lists with a path column; labels are ignored.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture. \\[default: tf_efficientnet_lite0]")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Start: hub, none, or a weights file / fedct checkpoint. \\[default: hub]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs. \\[default: 40]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (pairs of views). \\[default: 32]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine, warm-up). \\[default: 3e-4]")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels. \\[default: 224]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. \\[default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. \\[default: auto]")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
) -> None:
    """Stage 0: self-supervised pretraining (BYOL) of a backbone on unlabelled images.

    Writes config.yaml, summary.csv (loss per epoch), backbone.safetensors (a plain timm
    state dict, rewritten every epoch) and report.json. Start stage 1 from it with
    `fedct pretrain --pretrained RUN/backbone.safetensors`.

    Example: fedct selfsup scans/ --out runs/stage0 --pretrained
    ../shared/weights/tf_efficientnet_lite0_in1k.safetensors --image-size 128
    """
    from fedct.config import SelfSupConfig, resolve_config
    from fedct.selfsup import run_selfsup

    overrides = {"model": model, "pretrained": pretrained, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "seed": seed,
                 "device": device}
    cfg, saved = resolve_config(SelfSupConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None and not inputs:
        inputs = [Path(p) for p in saved.get("inputs") or []]
    out = resume or out
    if out is None or not inputs:
        raise FedctError("INPUTS and --out RUN_DIR are required (or --resume RUN_DIR)")
    report = run_selfsup(inputs, out, cfg, resume=resume is not None, force=force,
                         quiet=quiet or json_out, console=console)
    if json_out:
        print_json(report)
    elif not quiet:
        console.print(f"{report['epochs']} epochs on {report['images']} images, final BYOL loss "
                      f"{report['final_loss']:.3f}: {report['backbone']}", highlight=False)


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
    secure_aggregation: Annotated[bool | None, typer.Option("--secure-aggregation/--no-secure-aggregation", help="flower: SecAgg+, the coordinator sees only the sum of each round's updates.")] = None,
    secagg_shares: Annotated[int | None, typer.Option(help="SecAgg+: key shares per node; 0 = one for every node of the round. \\[default: 0]")] = None,
    secagg_threshold: Annotated[float | None, typer.Option(help="SecAgg+: shares that rebuild a key, a share of them (<= 1) or a count. \\[default: 0.5]")] = None,
    secagg_clip: Annotated[float | None, typer.Option(help="SecAgg+: each example-weighted update value is clipped to +-this. \\[default: 1]")] = None,
    clients: Annotated[int | None, typer.Option(help="flower without a split: how many clients (default: the nodes that answer).")] = None,
    round_timeout: Annotated[float, typer.Option(help="flower: seconds to wait for a round's replies.")] = ROUND_TIMEOUT_SECONDS,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard event files to RUN/tensorboard (curves.png and MODEL_CARD.md are always written).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
) -> None:
    """Stage 2: fine-tune a model by federated rounds over the split's clients.

    Writes config.yaml, summary.csv (one row per round), privacy.csv (with --dp),
    round/best/last/final checkpoints, report.json, curves.png, MODEL_CARD.md.

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
                 "feature_views": feature_views, "device": device, "tensorboard": tensorboard,
                 "secure_aggregation": secure_aggregation, "secagg_shares": secagg_shares,
                 "secagg_threshold": secagg_threshold, "secagg_clip": secagg_clip}
    cfg, saved = resolve_config(FederateConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None:  # the run's own inputs: `fedct federate --resume RUN` is enough
        init, out = saved["init"], resume
        split_dir = split_dir or (Path(saved["split"]) if saved.get("split") else None)
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
        print_json(report)
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
