"""What the commands print: a split's partition, stage 1 and stage 2 results, an evaluation."""

from __future__ import annotations

import os

from rich import box
from rich.console import Console
from rich.table import Table


def print_split_table(console: Console, meta: dict) -> None:
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


def number(value) -> str:
    """A metric for people: 3 decimals, '-' where it is undefined (NaN, or null in JSON)."""
    return "-" if value is None or value != value else f"{value:.3f}"


def print_stage1(console: Console, report: dict, out) -> None:
    """The best epoch on val: AUC, then the figures at the chosen threshold and at 0.5 (for
    more than two classes: macro AUC, accuracy and balanced accuracy of the most probable)."""
    best, point = report["best"], report["operating_point"]
    table = Table(title=f"stage 1: best epoch {report['best_epoch']} by {report['monitor']}",
                  box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    if point["rule"] == "argmax":  # more than two classes: no threshold
        for column in ("val", "macro AUC", "accuracy", "balanced acc"):
            table.add_column(column, justify="right")
        table.add_row("highest probability", number(best["val_auc"]), number(best["val_acc"]),
                      number(best.get("val_balanced_acc")))
    else:
        for column in ("val", "AUC", "threshold", "accuracy", "sensitivity", "specificity"):
            table.add_column(column, justify="right")
        table.add_row(f"at {point['rule']}", number(best["val_auc"]),
                      f"{point['threshold']:.3f}", number(point["acc"]),
                      number(point["sensitivity"]), number(point["specificity"]))
        table.add_row("at 0.5", "", "0.500", number(best["val_acc"]),
                      number(best["val_sensitivity"]), number(best["val_specificity"]))
    console.print(table)
    print_patients(console, report.get("patient_operating_point"))
    console.print(f"wrote {out}/best.safetensors (+ last, summary.csv, report.json); "
                  f"{report['train_images_per_second']} train images/s")


def print_federate(console: Console, report: dict, out) -> None:
    """The final round on the val the run selects on, the best round and its threshold."""
    final, point = report["final"], report["operating_point"]
    if report.get("objective") == "byol":  # stage 0: no labels read, nothing scored
        console.print(f"final (round {report['rounds']}): BYOL loss "
                      f"{number(final['train_loss'])}, the clients' mean", highlight=False)
        console.print(f"wrote {report['backbone']} (for --pretrained), summary.csv, "
                      "report.json", highlight=False)
        return
    p = report["monitor"].split("_", 1)[0]
    best = f"best round {report['best_round']} by {report['monitor']}"
    if point["rule"] == "argmax":  # more than two classes: no threshold
        figures = (f"val macro AUC {number(final[f'{p}_auc'])}, acc {number(final[f'{p}_acc'])}, "
                   f"balanced acc {number(final[f'{p}_balanced_acc'])} (highest probability); "
                   f"{best}")
    else:
        figures = (f"val AUC {number(final[f'{p}_auc'])}, acc {number(final[f'{p}_acc'])} at "
                   f"0.5; {best}, threshold {point['threshold']:.3f} ({point['rule']} on "
                   f"{point['source']}: acc {number(point['acc'])}, sens "
                   f"{number(point['sensitivity'])}, spec {number(point['specificity'])})")
    console.print(f"final (round {report['rounds']}): {'federated ' if p == 'fed' else ''}"
                  + figures
                  + (f"; max epsilon {report['max_epsilon']:.2f}" if report["dp"] else ""),
                  highlight=False)
    print_patients(console, report.get("patient_operating_point"))
    console.print(f"wrote {out}/final.safetensors (+ best, last, summary.csv, report.json)")


def print_patients(console: Console, point: dict | None) -> None:
    """The best checkpoint's patient-level operating point, when val had patients."""
    if point:
        console.print(f"per patient ({point['aggregate']} of its slices, {point['patients']} "
                      f"{point['source'].split(',')[0]} patients): AUC {number(point.get('auc'))}, "
                      f"threshold {point['threshold']:.3f} ({point['rule']}): acc "
                      f"{number(point['acc'])}, sens {number(point['sensitivity'])}, spec "
                      f"{number(point['specificity'])}", highlight=False)


def _cell(metrics: dict, name: str) -> str:
    ci = (metrics.get("ci95") or {}).get(name)
    if name == "threshold":
        return f"{metrics[name]:.3f}"
    text = number(metrics[name])
    if ci and ci[0] is not None and ci[0] == ci[0]:
        text += f"\n[dim]{ci[0]:.2f}-{ci[1]:.2f}[/]"
    return text


EVALUATION_ROWS = (  # (row label, which figures, key); "chosen": at the chosen threshold
    ("threshold", "chosen", "threshold"), ("accuracy", "chosen", "accuracy"),
    ("sensitivity", "chosen", "sensitivity"), ("specificity", "chosen", "specificity"),
    ("PPV (precision)", "chosen", "precision"), ("NPV", "chosen", "npv"),
    ("F1", "chosen", "f1"), ("AUC (any threshold)", "chosen", "auc"),
    ("at 0.5: accuracy", "threshold_0.5", "accuracy"),
    ("at 0.5: sensitivity", "threshold_0.5", "sensitivity"),
    ("at 0.5: specificity", "threshold_0.5", "specificity"),
    ("Youden here: threshold", "youden", "threshold"),
    ("Youden here: sens", "youden", "sensitivity"),
    ("Youden here: spec", "youden", "specificity"),
)
RESULTS_PER_TABLE = 4  # result columns beside the labels: legible at 80 columns


def _result_tables(results: list[dict]):
    """Tables of at most four results each, columns named by checkpoint (and scope, with a
    row of counts, when there are several scopes), and the results each holds; the caller
    adds the metric rows."""
    scopes = {r["data"] for r in results}
    for start in range(0, len(results), RESULTS_PER_TABLE):
        chunk = results[start:start + RESULTS_PER_TABLE]
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column(f"n = {chunk[0]['n']}" if len(scopes) == 1 else "", no_wrap=True)
        for r in chunk:
            table.add_column(r["checkpoint"] + ("" if len(scopes) == 1 else f"\n{r['data']}"),
                             justify="right")
        if len(scopes) > 1:
            table.add_row("images", *(str(r["n"]) for r in chunk))
        yield table, chunk


def print_evaluation(console: Console, report: dict) -> None:
    """Metrics as rows, one column per checkpoint and data scope (at most four a table, so
    it reads at 80 columns): first the figures at the threshold each checkpoint chose on
    its validation data with their 95% CIs below them, then at 0.5, then at Youden's
    threshold on these data (optimistic), and the calibration error."""
    results = report["results"]
    positive = results[0]["positive"]
    if positive is None:
        print_class_evaluation(console, report)
        return
    console.print(f"{report['data']}: positive class {positive}", highlight=False)
    for table, chunk in _result_tables(results):
        for label, which, key in EVALUATION_ROWS:
            table.add_row(label, *(_cell(r[which], key) for r in chunk),
                          end_section=label in ("AUC (any threshold)", "at 0.5: specificity"))
        table.add_row("ECE (calibration)", *(number(r["calibration"]["ece"]) for r in chunk))
        console.print(table)
    console.print(f"95% CIs below each figure, by {bootstrap_unit(report)} bootstrap. Chosen "
                  "thresholds: " + "; ".join(sorted(
                      {f"{r['checkpoint']}: {r['chosen']['source']}" for r in results})),
                  highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)


CLASS_ROWS = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
              ("macro F1", "macro_f1"), ("weighted F1", "weighted_f1"),
              ("macro AUC (vs rest)", "auc"))
PER_CLASS_ROWS = (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                  ("PPV", "precision"), ("AUC vs rest", "auc"))


def print_class_evaluation(console: Console, report: dict) -> None:
    """The evaluation of a model of more than two classes: the headline figures with their
    95% CIs, then each class's sensitivity, specificity, PPV and AUC against the rest."""
    results = report["results"]
    unit = "patient" if report.get("level") == "patient" else "image"
    console.print(f"{report['data']}: {len(results[0]['classes'])} classes, each {unit} called "
                  "the class of highest probability", highlight=False)
    for table, chunk in _result_tables(results):
        for label, key in CLASS_ROWS:
            table.add_row(label, *(_cell(r["chosen"], key) for r in chunk),
                          end_section=key == "auc")
        for name in chunk[0]["classes"]:
            table.add_row(f"{name} (n)", *(str(r["metrics"]["per_class"][name]["n"])
                                           for r in chunk))
            for label, key in PER_CLASS_ROWS:
                table.add_row(f"  {label}", *(number(r["metrics"]["per_class"][name][key])
                                              for r in chunk),
                              end_section=key == "auc")
        table.add_row("ECE (predicted class)", *(number(r["calibration"]["ece"]) for r in chunk))
        console.print(table)
    console.print(f"95% CIs below the headline figures, by {bootstrap_unit(report)} "
                  "bootstrap; per "
                  "class: that class against all others.", highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)


def bootstrap_unit(report: dict) -> str:
    """What the bootstrap resampled: patients (grouped slices, or rows that are patients)."""
    return "patient" if report["grouped_bootstrap"] or report.get("level") == "patient" \
        else "image"


def print_predictions(console: Console, report: dict, shown: int = 20) -> None:
    """The groups' decisions (or the images' when no group is known), then where all are."""
    rows = report["groups"] or report["predictions"]
    key = "group" if report["groups"] else "path"
    folder, names = "", [row[key] for row in rows[:shown]]
    if key == "path":
        folder, names = short_paths(names, room=console.width - 34)
    argmax = report["positive"] is None
    decided = "each called the class of highest probability" if argmax else (
        f"{report['positives']} called {report['positive']} at {report['threshold']:.3f} "
        f"({report['threshold_source']})")
    if report["groups"] and not argmax:
        called = sum(g["decision"] == report["positive"] for g in report["groups"])
        groups = len(report["groups"])
        decided += (f"; {groups} group{'s' if groups != 1 else ''}, {called} called "
                    f"{report['positive']} "
                    f"at {report['group_threshold']:.3f} ({report['group_threshold_source']})")
    table = Table(title=f"{report['images']} images, {decided}"
                        + (f"\nimages under {folder}/" if folder else ""))
    table.add_column(key, no_wrap=True)
    if report["groups"]:
        table.add_column("images", justify="right")
    table.add_column(("P(decision)" if argmax else f"P({report['positive']})")
                     + (f", {report['aggregate']}" if report["groups"] else ""), justify="right")
    table.add_column("decision")
    for name, row in zip(names, rows[:shown], strict=True):
        table.add_row(name, *([str(row["images"])] if report["groups"] else []),
                      f"{row['probability']:.3f}", row["decision"])
    console.print(table)
    if len(rows) > shown:
        console.print(f"... {len(rows) - shown} more rows", highlight=False)
    written = [report["out"]] + ([report["groups_out"]] if report["groups_out"] else [])
    console.print(f"wrote {', '.join(written)}", highlight=False)
    if report.get("explanations"):
        print_explanations(console, report["checkpoint"], report["explanations"])


def short_paths(paths: list[str], room: int) -> tuple[str, list[str]]:
    """The paths' common folder and each path after it, cut from the left where it is still
    too long: the file name is what tells two images apart, so it is the part that stays."""
    folders = {os.path.dirname(p) for p in paths}
    absolute = {os.path.isabs(p) for p in paths}
    folder = os.path.commonpath(sorted(folders)) \
        if len(paths) > 1 and all(folders) and len(absolute) == 1 else ""
    shown = [os.path.relpath(p, folder) if folder else p for p in paths]
    room = max(room, 12)
    return folder, ["…" + p[len(p) - room + 1:] if len(p) > room else p for p in shown]


def print_explanations(console: Console, name: str, explained: dict) -> None:
    console.print(f"{name}: wrote {explained['images']} Grad-CAM heat maps ({explained['layer']}) "
                  f"and {explained['contact_sheet']} to {explained['folder']}", highlight=False)
    found = explained.get("localisation")
    if found:
        console.print(f"  heat-map peak inside the drawn lesion: {found['peak_in_lesion']:.1%} "
                      f"[{found['ci95'][0]:.1%}, {found['ci95'][1]:.1%}] of {found['images']} "
                      f"positives (a random pixel: {found['chance']:.1%})", highlight=False)
