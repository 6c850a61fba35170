"""Stage 1: central transfer learning of a timm backbone on data that may be pooled."""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from timm.utils import ModelEmaV3

from fedct.config import PretrainConfig, to_dict
from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import Split, load_split, split_digest
from fedct.errors import FedctError
from fedct.locks import exclusive
from fedct.metrics import positive_class, positive_index
from fedct.models import apply_freeze, create_model, data_config
from fedct.multiclass import ARGMAX, check_settings
from fedct.operating_point import operating_point, threshold_story
from fedct.recipes import average_states, batch_mix, mixed_loss
from fedct.records import RunRecorder, patient_point, score
from fedct.runs import (
    check_resume_inputs,
    checkpoint_meta,
    checkpoint_paths,
    prepare_run_dir,
    read_checkpoint,
    read_sidecar,
    save_checkpoint,
    write_config,
)
from fedct.training import (
    cosine_with_warmup,
    make_loss,
    make_optimizer,
    pick_device,
    seed_everything,
    set_threads,
    train_epoch,
)


def select_training_rows(split: Split, config: PretrainConfig):
    """Pooled training rows, or only some clients' (`clients`), or rows matching `rows`."""
    rows = split.select(split="train")
    if config.clients:
        unknown = sorted(set(config.clients) - set(range(split.num_clients)))
        if unknown:
            raise FedctError(f"clients {unknown}: the split has clients 0..{split.num_clients - 1}")
        rows = [e for e in rows if e.client in config.clients]
    if config.rows:
        wanted = config.rows
        rows = [e for e in split.select() if wanted in (e.row.site, e.split, str(e.client))]
        if not rows:
            raise FedctError(f"rows {wanted!r}: no manifest row has this site, split or client")
    if not rows:
        raise FedctError(f"{split.directory}: no training rows selected")
    return rows


def val_row(metrics: dict, point: dict) -> dict:
    """An epoch's val columns: metrics at 0.5, then at the operating point chosen on val;
    with more than two classes (no threshold: those columns NaN) also the balanced
    accuracy, which the epoch line reports for them."""
    return {"val_loss": metrics["loss"], "val_acc": metrics["acc"], "val_auc": metrics["auc"],
            "val_sensitivity": metrics["sensitivity"], "val_specificity": metrics["specificity"],
            **({"val_balanced_acc": metrics["balanced_acc"]} if point["rule"] == ARGMAX else {}),
            "threshold": point["threshold"], "thr_acc": point["acc"],
            "thr_sensitivity": point["sensitivity"], "thr_specificity": point["specificity"]}


def lopsided_warning(row: dict) -> str | None:
    """A note when a model calls most of one class wrong at its operating threshold,
    however good its AUC."""
    for name, other in (("sensitivity", "positives"), ("specificity", "negatives")):
        value = row.get(f"thr_{name}")
        if value is not None and value == value and value < 0.5:
            return (f"val {name} {value:.2f} at its threshold {row['threshold']:.3f}: it "
                    f"misses most {other}; look at `fedct evaluate` before using it")
    return None


def run_pretrain(split_dir: str | Path, out: str | Path, config: PretrainConfig, *,
                 resume: bool = False, force: bool = False, quiet: bool = False,
                 console: Console | None = None) -> dict:
    """Train (or resume) a stage-1 run; the run directory is locked against a second writer."""
    with exclusive(out):
        return _pretrain(split_dir, out, config, resume=resume, force=force, quiet=quiet,
                         console=console)


def _pretrain(split_dir: str | Path, out: str | Path, config: PretrainConfig, *, resume: bool,
              force: bool, quiet: bool, console: Console | None) -> dict:
    console = Console(quiet=True) if quiet else (console or Console())
    out = Path(out)
    split = load_split(split_dir)
    train_rows = select_training_rows(split, config)
    val_rows = split.select(split="val")
    if not val_rows:
        raise FedctError(f"{split_dir}: no val rows to validate on")
    set_threads()
    seed_everything(config.seed)
    device = pick_device(config.device)
    positive = positive_class(split.classes, split.positive)
    volumes = {"volumes": split.meta["volumes"]} if split.meta.get("volumes") else {}
    check_settings(config, split.classes)
    model = create_model(config.model, len(split.classes), pretrained=config.pretrained,
                         drop_rate=config.drop_rate, image_size=config.image_size)
    out = prepare_run_dir(out, resume=resume, force=force,
                          inputs={"split": split_dir,
                                  "pretrained weights": checkpoint_paths(config.pretrained)[0]},
                          roots={"dataset folder": split.root})
    trainable = apply_freeze(model, config.freeze, freeze_bn=config.freeze_bn)
    dcfg = data_config(model, config.image_size)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    images = SplitImages(split, config.image_size)
    decode_seconds = time.perf_counter() - started
    train_set = images.dataset(train_rows, make_transform(data_cfg=dcfg, train=True, config=config))
    val_set = images.dataset(val_rows, make_transform(data_cfg=dcfg, train=False, config=config))
    labels = train_set.labels.tolist()
    train_loader = make_loader(train_set, batch_size=config.batch_size, train=True,
                               seed=config.seed, balance=config.balance,
                               num_classes=len(split.classes))
    val_loader = make_loader(val_set, batch_size=config.batch_size * 2, train=False, seed=0)
    mix = batch_mix(config, len(split.classes))
    loss_fn = mixed_loss() if mix else make_loss(config, labels, len(split.classes))
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_loader)
    scheduler = cosine_with_warmup(
        optimizer, total_steps=config.epochs * steps_per_epoch,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        min_lr_ratio=config.min_lr / config.lr)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    scored = ema.module if ema else model  # the weights that are validated and checkpointed
    averaging = config.average_last > 0
    recorder = RunRecorder(out, monitor=config.monitor, keep_last=config.average_last
                           if averaging else 0, prefix="epoch", tensorboard=config.tensorboard)
    index = positive_index(split.classes, positive)

    val_groups = [e.row.group for e in val_rows]

    def score_val(weights) -> tuple[dict, dict, dict]:
        """Val metrics at 0.5 and the operating points chosen on val: the slice one, and the
        patient one ({} when val has no patient of several slices)."""
        metrics, histogram, patients = score(weights, val_loader, device=device, config=config,
                                             positive_index=index, groups=val_groups)
        patient = patient_point(config.threshold, patients, "val")
        return (metrics, operating_point(config.threshold, histogram, "val"),
                {"patient_operating_point": patient} if patient else {})

    state = {"epoch": 0, "bad_epochs": 0}
    inputs = {"split": str(Path(split_dir).resolve()), "split_digest": split_digest(split)}
    if resume:
        check_resume_inputs(out, **inputs)
        saved = recorder.resume(("model", "optimizer", "scheduler", *state))
        model.load_state_dict(saved["model"])
        if ema:
            ema.module.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in state}
        console.print(f"resuming {out} after epoch {state['epoch']}")
    else:
        write_config(out, to_dict(config), command="pretrain",
                     extra={**inputs, "train_images": len(train_rows), "val_images": len(val_rows),
                            "train_classes": dict(Counter(e.row.label for e in train_rows)),
                            "trainable_parameters": trainable, "device": str(device)})
    history = []
    train_seconds = 0.0
    train_examples = 0
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, disable=quiet)

    def after_step(step: int, epoch: int) -> None:
        if ema:
            ema.update(model, step=(epoch - 1) * steps_per_epoch + step)
        progress.advance(task)

    with progress:
        task = progress.add_task("train", info="", total=steps_per_epoch)
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            seed_everything(config.seed * 1000 + epoch)  # a resumed epoch sees the same randomness
            train_loader.generator.manual_seed(config.seed * 1000 + epoch)
            progress.reset(task, total=steps_per_epoch, description=f"epoch {epoch}/{config.epochs}")
            tick = time.perf_counter()
            result = train_epoch(model, train_loader, optimizer, loss_fn, device=device,
                                 scheduler=scheduler, grad_clip=config.grad_clip, amp=config.amp,
                                 channels_last=config.channels_last,
                                 on_step=partial(after_step, epoch=epoch), mix=mix)
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            train_examples += result["examples"]
            metrics, point, patient = score_val(scored)
            row = {"epoch": epoch, "train_loss": result["loss"], **val_row(metrics, point),
                   "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": round(seconds, 2)}
            history.append(row)
            progress.console.print(
                f"epoch {epoch}/{config.epochs}: train loss {result['loss']:.3f}, "
                f"{threshold_story('val', row)} ({seconds:.1f}s)", highlight=False)
            meta = checkpoint_meta(architecture=config.model, classes=split.classes,
                                   positive=positive, data_cfg=dcfg, stage="pretrain",
                                   tta=config.tta, **volumes, **patient, epoch=epoch, metrics=row,
                                   operating_point=point)
            improved = recorder.record(epoch, row, weights=scored.state_dict(), meta=meta,
                                       metrics=metrics)
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["epoch"] = epoch
            recorder.commit({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             **state, **({"ema": ema.module.state_dict()} if ema else {})})
            if config.patience and state["bad_epochs"] >= config.patience:
                console.print(f"early stop after epoch {epoch}: {config.monitor} has not improved "
                              f"for {config.patience} epochs")
                break
    averaged = (average_last_epochs(out, scored, state["epoch"], config.average_last, score_val,
                                    meta=partial(checkpoint_meta, architecture=config.model,
                                                 classes=split.classes, positive=positive,
                                                 data_cfg=dcfg, stage="pretrain",
                                                 tta=config.tta, **volumes))
                if averaging else None)
    if averaged:
        console.print(f"averaged epochs {averaged['epochs'][0]}-{averaged['epochs'][-1]}: val acc "
                      f"{averaged['val_acc']:.3f}, AUC {averaged['val_auc']:.3f} "
                      f"({out / 'averaged'})", highlight=False)
    best_meta = read_sidecar(out / "best")
    lopsided = lopsided_warning(best_meta["metrics"])
    if lopsided:
        console.print(f"warning: best epoch {recorder.best_step}: {lopsided}", highlight=False)
    report = {
        "stage": "pretrain", "run": str(out), "best_epoch": recorder.best_step,
        "monitor": config.monitor, "best": best_meta["metrics"],
        "operating_point": best_meta["operating_point"],
        "patient_operating_point": best_meta.get("patient_operating_point"),
        "last": history[-1] if history else None,
        "averaged": averaged,
        "train_images": len(train_rows), "val_images": len(val_rows),
        "decode_seconds": round(decode_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "train_images_per_second": round(train_examples / train_seconds, 2) if train_seconds else None,
        "device": str(device),
    }
    recorder.finish(report)
    return report


def average_last_epochs(out: Path, scored: torch.nn.Module, last_epoch: int, count: int,
                        score_val, meta) -> dict:
    """Write RUN/averaged, the mean of the last `count` epochs' checkpointed weights, scored
    on val like an epoch; returns its val row. `scored` is left holding the mean."""
    epochs = list(range(max(1, last_epoch - count + 1), last_epoch + 1))
    states = [read_checkpoint(out / f"epoch-{e:04d}")[0] for e in epochs]
    scored.load_state_dict(average_states(states))
    metrics, point, patient = score_val(scored)
    row = {"epochs": epochs, **val_row(metrics, point)}
    save_checkpoint(out / "averaged", scored.state_dict(),
                    meta(epoch=last_epoch, averaged_epochs=epochs, metrics=row,
                         operating_point=point, **patient))
    return row
