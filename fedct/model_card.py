"""MODEL_CARD.md in a run directory: what the model is, what it saw, how good it is, how
private its training was, and what it must not be used for.

Written from the run's own files (config.yaml, report.json, the split's split.yaml, the
stage-1 run a stage-2 run started from, evaluations.json from `fedct evaluate`), so it can be
rewritten at any time and never holds an image path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from fedct.files import atomic_write, json_safe
from fedct.metrics import wilson_interval
from fedct.runs import checkpoint_paths

CARD = "MODEL_CARD.md"
EVALUATIONS = "evaluations.json"
LIMITS = """\
- A research tool, not a diagnostic device: not cleared or approved for clinical use by any
  regulator. Its output must not decide care for a patient.
- Trained and validated on the data counted above; performance on other scanners,
  protocols, populations or disease prevalence is unknown until measured there
  (`fedct evaluate --data`).
- Decisions are per image {decision}; a patient-level decision
  (`fedct predict` groups) aggregates slices; `fedct evaluate --level patient` scores it.
- Intervals assume independent images; slices of one patient are not, so they are too
  narrow unless marked as a patient bootstrap."""


def _trained(settings: dict) -> str:
    if settings.get("dp"):
        return f"{settings.get('dp_train')} (under DP)"
    return f"{settings.get('freeze')} (freeze policy)"


def _read(path: Path) -> dict | list | None:
    """A run's own file, or None where it is missing or damaged: the card says what it can."""
    try:
        text = path.read_text()
        return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _interval(point: float | None, low: float | None, high: float | None) -> str:
    """A value with its interval; the interval is left out where it is undefined (null in
    JSON: one class in the data, no bootstrap)."""
    defined = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high))
    return f"{_fmt(point)} [{_fmt(low)}, {_fmt(high)}]" if defined else _fmt(point)


def _records(path: Path) -> list[dict]:
    """The run's kept evaluations; a damaged file or record is passed over, never fatal."""
    records = _read(path)
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("chosen"), dict)
            and {"checkpoint", "data", "n"} <= r.keys()]


def auc_interval(auc: float, positives: int, negatives: int) -> tuple[float, float]:
    """Hanley & McNeil's (1982) normal interval for an AUC from the class counts alone."""
    if not (positives and negatives and math.isfinite(auc)):
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
                + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    half = 1.96 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def _counts_table(rows: dict[str, dict[str, int]], classes: list[str]) -> list[str]:
    lines = [f"| | {' | '.join(classes)} | total |", "|---" * (len(classes) + 2) + "|"]
    for name, counts in rows.items():
        values = [int(counts.get(c, 0)) for c in classes]
        lines.append(f"| {name} | {' | '.join(map(str, values))} | {sum(values)} |")
    return lines


def _data_section(title: str, config: dict, split_meta: dict | None) -> list[str]:
    lines = [f"### {title}", ""]
    if split_meta is None:
        return lines + ["The split directory is not readable here (on a Flower coordinator the "
                        "data stay on the nodes): counts are known to the sites only.", ""]
    classes = split_meta["classes"]
    lines.append(f"Split `{Path(str(config.get('split'))).name}`: {split_meta['dataset']['images']} "
                 f"images, positive class {split_meta.get('positive')}, partition "
                 f"{split_meta['partition']['scheme']} over {split_meta['partition']['clients']} "
                 "clients.")
    lines.append("")
    if config.get("command") == "pretrain":
        trained = {"train": config.get("train_classes", {}),
                   "val": split_meta["counts"].get("val", {})}
        lines += _counts_table(trained, classes)
    else:
        per_client = {f"client {c['id']} train": c["train"] for c in split_meta["clients"]}
        per_client["pooled val (coordinator)"] = split_meta["counts"].get("val", {})
        lines += _counts_table(per_client, classes)
    return lines + [""]


def _proportion(value: float | None, n: int) -> str:
    if value is None or not n:
        return _fmt(value)
    return _interval(value, *wilson_interval(round(value * n), n))


def _validation(report: dict, split_meta: dict | None) -> list[str]:
    best = report.get("best") or {}
    point = report.get("operating_point") or {}
    federated = report.get("stage") == "federate" and best.get("val_acc") is None
    prefix = "fed_" if federated else "val_"
    step = best.get("epoch", best.get("round"))
    lines = [f"Best {'epoch' if 'epoch' in best else 'round'} {step} by {report.get('monitor')}, on "
             f"{'the clients’ own validation rows (federated)' if federated else 'the pooled val rows'}.",
             ""]
    counts = (split_meta or {}).get("counts", {}).get("val", {}) if not federated else {}
    if point.get("rule") == "argmax":
        n_all = int(sum(counts.values())) if counts else 0
        classes = len(split_meta["classes"]) if split_meta else "several"
        return lines + ["| metric | value [95% CI] |", "|---|---|",
                        f"| macro AUC (each class against the rest) | {_fmt(best.get(f'{prefix}auc'))} |",
                        f"| accuracy | {_proportion(best.get(f'{prefix}acc'), n_all)} |",
                        f"| balanced accuracy (mean recall) | "
                        f"{_fmt(best.get(f'{prefix}balanced_acc'))} |", "",
                        f"Decision: the class of highest probability ({classes} classes, no "
                        "threshold). Interval: Wilson, images taken as independent.",
                        ""]
    positive = (split_meta or {}).get("positive")
    n_pos = int(counts.get(positive, 0)) if positive else 0
    n_all = int(sum(counts.values())) if counts else 0
    auc = best.get(f"{prefix}auc")
    auc_cell = _interval(auc, *auc_interval(auc, n_pos, n_all - n_pos)) \
        if auc is not None and n_all else _fmt(auc)
    lines += ["| metric | value [95% CI] |", "|---|---|", f"| AUC | {auc_cell} |",
              f"| accuracy at the threshold | {_proportion(best.get('thr_acc'), n_all)} |",
              f"| sensitivity at the threshold | {_proportion(best.get('thr_sensitivity'), n_pos)} |",
              f"| specificity at the threshold | {_proportion(best.get('thr_specificity'), n_all - n_pos)} |",
              "",
              f"Operating threshold {_fmt(point.get('threshold'))}: rule `{point.get('rule')}` "
              f"chosen on {point.get('source')}; these figures are per image (slice)."
              + _patient_line(report.get("patient_operating_point")),
              "Intervals: Wilson (proportions) and Hanley-McNeil (AUC), images taken as independent"
              if n_all else "Intervals need the class counts of the validation rows, which stay "
              "on the sites: see Evaluations", ""]
    return lines


def _patient_line(point: dict | None) -> str:
    if not point:
        return ""
    return (f" Per patient ({point['aggregate']} of its slices), the threshold is "
            f"{_fmt(point['threshold'])}, rule `{point['rule']}` chosen on {point['source']} "
            f"({point['patients']} patients): `fedct predict` decides groups with it.")


def _privacy(config: dict, report: dict) -> list[str]:
    settings = config["config"]
    if not settings.get("dp"):
        return ["No differential privacy: the model may reveal more about a training patient "
                "than a DP model would.", ""]
    spent = report.get("epsilon") or {}
    lines = [f"Opacus DP-SGD in every client, sample level, delta {settings.get('delta')}, target "
             f"epsilon {settings.get('target_epsilon')}, clipping {settings.get('max_grad_norm')}, "
             f"trained {settings.get('dp_train')}.", "",
             "| client | epsilon spent |", "|---|---|"]
    lines += [f"| {client} | {_fmt(value)} |" for client, value in spent.items()]
    return lines + ["", "Epsilon covers each client's training rows over all rounds; "
                    "federated validation releases aggregates of the clients' val rows outside "
                    "it (README: What epsilon covers).", ""]


def _evaluations(out: Path) -> list[str]:
    records = _records(out / EVALUATIONS)
    if not records:
        return ["None yet: `fedct evaluate` adds its results here (test metrics with a patient "
                "bootstrap when groups are known).", ""]
    lines = ["| checkpoint | data | n | threshold | accuracy | sensitivity | specificity | AUC |",
             "|---|---|---|---|---|---|---|---|"]
    if any(r["chosen"].get("threshold") is None for r in records):  # more than two classes
        lines = ["| checkpoint | data | n | decision | accuracy | balanced accuracy | macro F1 "
                 "| macro AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        chosen, ci = r["chosen"], r["chosen"].get("ci95") or {}

        def cell(key, chosen=chosen, ci=ci):
            bounds = ci.get(key)
            return _interval(chosen.get(key), *bounds) if isinstance(bounds, list) \
                and len(bounds) == 2 else _fmt(chosen.get(key))
        data = r["data"] + (" (patient bootstrap)" if r.get("patient_bootstrap") else "")
        if chosen.get("threshold") is None:
            lines.append(f"| {r['checkpoint']} | {data} | {r['n']} | argmax | "
                         f"{cell('accuracy')} | {cell('balanced_accuracy')} | {cell('macro_f1')} "
                         f"| {cell('auc')} |")
            continue
        lines.append(f"| {r['checkpoint']} | {data} | {r['n']} | {_fmt(chosen['threshold'])} | "
                     f"{cell('accuracy')} | {cell('sensitivity')} | {cell('specificity')} | {cell('auc')} |")
    return lines + ["", "95% CIs by percentile bootstrap.", ""]


def write_model_card(out: str | Path) -> Path:
    out = Path(out)
    config = _read(out / "config.yaml") or {}
    report = _read(out / "report.json") or {}
    settings = config.get("config", {})
    split_meta = _read(Path(str(config["split"])) / "split.yaml") if config.get("split") else None
    stage = config.get("command")
    lines = [f"# Model card: {out.name}", "",
             f"fedct {config.get('versions', {}).get('fedct', '')}, {stage} "
             f"({'stage 1, central' if stage == 'pretrain' else 'stage 2, federated'}), "
             f"created {config.get('created')}, seed {config.get('seed')}.", "",
             "## Model", "",
             f"- Architecture: timm `{config.get('architecture', settings.get('model'))}`, "
             f"{settings.get('image_size') or 'init'} px input, trained: "
             f"{_trained(settings)}.",
             f"- Starting point: `{settings.get('pretrained') if stage == 'pretrain' else config.get('init')}`."]
    if stage == "federate":
        lines += [f"- Strategy {settings.get('strategy')}, {report.get('rounds')} rounds, "
                  f"{settings.get('local_steps') or settings.get('local_epochs')} local "
                  f"{'steps' if settings.get('local_steps') else 'epochs'}, local loss "
                  f"{settings.get('local_loss')}, FedBN {settings.get('fedbn')}, engine "
                  f"{config.get('engine')}, {config.get('clients')} clients."]
    lines += ["", "## Data", ""]
    if stage == "federate" and config.get("init"):
        stage1 = checkpoint_paths(config["init"])[0].parent
        stage1_config = _read(stage1 / "config.yaml")
        if stage1_config:
            stage1_split = _read(Path(str(stage1_config.get("split"))) / "split.yaml")
            lines += _data_section("Stage 1 (central, data that may be shared)", stage1_config,
                                   stage1_split)
    lines += _data_section("This run" if stage == "pretrain" else "Stage 2 (federated)", config,
                           split_meta)
    lines += ["## Validation", ""] + _validation(report, split_meta)
    lines += ["## Evaluations", ""] + _evaluations(out)
    if stage == "federate":
        lines += ["## Privacy", ""] + _privacy(config, report)
    classes = " vs ".join((split_meta or {}).get("classes", [])) or "the trained classes"
    argmax = (report.get("operating_point") or {}).get("rule") == "argmax"
    lines += ["## Intended use and limits", "",
              f"Intended use: research on classifying lung CT slices ({classes}) by "
              "medical-imaging ML researchers, and a starting point for sites that validate "
              "it on their own data.", "",
              LIMITS.format(decision="as the class of highest probability" if argmax
                            else "at the stored threshold"), ""]
    target = out / CARD
    atomic_write(target, lambda p: p.write_text("\n".join(lines)))
    return target


def record_evaluation(run_dir: Path, result: dict) -> Path:
    """Keep an evaluation of one of this run's checkpoints (the newest per checkpoint and
    data), then rewrite the card."""
    path = run_dir / EVALUATIONS
    records = [r for r in _records(path)
               if (r["checkpoint"], r["data"]) != (result["checkpoint"], result["data"])]
    records.append(json_safe(result))
    atomic_write(path, lambda p: p.write_text(json.dumps(records, indent=2)))
    return write_model_card(run_dir)
