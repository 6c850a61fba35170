"""What the commands print: a split's partition, stage 1 and stage 2 results, an evaluation."""

from __future__ import annotations

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
    best, point = report["best"], report["operating_point"]
    table = Table(title=f"stage 1: best epoch {report['best_epoch']} by {report['monitor']}")
    columns = ("val_acc", "val_auc", "val_sensitivity", "val_specificity", "val_loss")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*(number(best[c]) for c in columns))
    console.print(table)
    console.print(f"threshold {point['threshold']:.3f} ({point['rule']} on val: accuracy "
                  f"{number(point['acc'])}, sens {number(point['sensitivity'])}, spec "
                  f"{number(point['specificity'])})", highlight=False)
    console.print(f"wrote {out}/best.safetensors (+ last, summary.csv, report.json); "
                  f"{report['train_images_per_second']} train images/s")


def print_federate(console: Console, report: dict, out) -> None:
    """The final round on the val the run selects on, the best round and its threshold."""
    final, point = report["final"], report["operating_point"]
    p = report["monitor"].split("_", 1)[0]
    console.print(f"final (round {report['rounds']}): {'federated ' if p == 'fed' else ''}"
                  f"val acc {number(final[f'{p}_acc'])}, AUC {number(final[f'{p}_auc'])}; "
                  f"best round {report['best_round']} by {report['monitor']}, threshold "
                  f"{point['threshold']:.3f} ({point['rule']} on {point['source']}: sens "
                  f"{number(point['sensitivity'])}, spec {number(point['specificity'])})"
                  + (f"; max epsilon {report['max_epsilon']:.2f}" if report["dp"] else ""),
                  highlight=False)
    console.print(f"wrote {out}/final.safetensors (+ best, last, summary.csv, report.json)")


def _cell(metrics: dict, name: str) -> str:
    ci = (metrics.get("ci95") or {}).get(name)
    text = number(metrics[name])
    if ci and ci[0] is not None and ci[0] == ci[0]:
        text += f"\n[dim]{ci[0]:.2f}-{ci[1]:.2f}[/]"
    return text


def print_evaluation(console: Console, report: dict) -> None:
    """One row per checkpoint and data scope, at the threshold each checkpoint chose on its
    validation data; 0.5, Youden's (on these data, so optimistic) and the ECE beside it."""
    positive = report["results"][0]["positive"]
    table = Table(title=f"{report['data']}: positive class {positive}, at each checkpoint's "
                        f"chosen threshold, 95% CI by "
                        f"{'patient' if report['grouped_bootstrap'] else 'image'} bootstrap")
    columns = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "auc")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("data", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("threshold", justify="right")
    for c in columns:
        table.add_column(c.replace("precision", "PPV").replace("npv", "NPV"), justify="right")
    table.add_column("at 0.5: acc sens/spec", justify="right")
    table.add_column("Youden t: sens/spec", justify="right")
    table.add_column("ECE", justify="right")
    sources = set()
    for r in report["results"]:
        m, half, y = r["chosen"], r["threshold_0.5"], r["youden"]
        sources.add(f"{r['checkpoint']}: {m['source']}")
        table.add_row(r["checkpoint"], r["data"], str(r["n"]), f"{m['threshold']:.3f}",
                      *(_cell(m, c) for c in columns),
                      f"{number(half['accuracy'])} {number(half['sensitivity'])}/"
                      f"{number(half['specificity'])}",
                      f"{y['threshold']:.2f}: {number(y['sensitivity'])}/{number(y['specificity'])}",
                      number(r["calibration"]["ece"]))
    console.print(table)
    console.print("thresholds: " + "; ".join(sorted(sources)), highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)


def print_predictions(console: Console, report: dict, shown: int = 20) -> None:
    """The groups' decisions (or the images' when no group is known), then where all are."""
    rows = report["groups"] or report["predictions"]
    key = "group" if report["groups"] else "path"
    table = Table(title=f"{report['images']} images, {report['positives']} called "
                        f"{report['positive']} at {report['threshold']:.3f} "
                        f"({report['threshold_source']})")
    table.add_column(key)
    if report["groups"]:
        table.add_column("images", justify="right")
    table.add_column(f"P({report['positive']})" + (f", {report['aggregate']}"
                                                   if report["groups"] else ""), justify="right")
    table.add_column("decision")
    for row in rows[:shown]:
        table.add_row(row[key], *([str(row["images"])] if report["groups"] else []),
                      f"{row['probability']:.3f}", row["decision"])
    console.print(table)
    if len(rows) > shown:
        console.print(f"... {len(rows) - shown} more rows", highlight=False)
    written = [report["out"]] + ([report["groups_out"]] if report["groups_out"] else [])
    console.print(f"wrote {', '.join(written)}", highlight=False)
    if report.get("explanations"):
        print_explanations(console, report["checkpoint"], report["explanations"])


def print_explanations(console: Console, name: str, explained: dict) -> None:
    console.print(f"{name}: wrote {explained['images']} Grad-CAM heat maps ({explained['layer']}) "
                  f"and {explained['contact_sheet']} to {explained['folder']}", highlight=False)
    found = explained.get("localisation")
    if found:
        console.print(f"  heat-map peak inside the drawn lesion: {found['peak_in_lesion']:.1%} "
                      f"[{found['ci95'][0]:.1%}, {found['ci95'][1]:.1%}] of {found['images']} "
                      f"positives (a random pixel: {found['chance']:.1%})", highlight=False)
