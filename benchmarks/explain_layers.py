"""Where Grad-CAM looks: how often its peak falls inside the lesion `fedct synth` drew.

    python benchmarks/explain_layers.py --work demo-out    # runs `fedct demo` there if needed

Scores the demo's stage-2 model (resnet10t, 96 px) with Grad-CAM on each feature stage, on
val (where the default stage was chosen) and on test, and prints a markdown table: the
share of positive slices whose heat-map peak lies in a drawn lesion, with its Wilson 95%
interval, beside the share of the image a lesion covers (a random peak's chance).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console

from fedct.demo import run_demo
from fedct.evaluation import load_model, run_evaluate
from fedct.explain import MIN_CELLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo-out"))
    args = parser.parse_args()
    checkpoint = args.work / "stage2" / "final"
    if not checkpoint.with_suffix(".safetensors").is_file():
        run_demo(args.work, force=True, console=Console(quiet=True))
    model, meta = load_model(checkpoint)
    size = int(meta["input_size"][-1])
    stages = [(s["module"], s["reduction"]) for s in model.feature_info]
    print(f"Grad-CAM peak inside the drawn lesion, `{checkpoint}` ({meta['architecture']}, {size} px)\n")
    print("| layer | map cells | default | val: peak in lesion [95% CI] | test: peak in lesion [95% CI] |")
    print("|---|---|---|---|---|")
    default = max((s for s in stages if size // s[1] >= MIN_CELLS), key=lambda s: s[1])[0]
    for name, reduction in stages:
        cells = []
        for on in ("val", "test"):
            with tempfile.TemporaryDirectory() as scratch:
                report = run_evaluate([checkpoint], split_dir=args.work / "split", on=on,
                                      out=Path(scratch) / "eval", n_boot=0,
                                      explain=Path(scratch) / "maps", cam_layer=name)
            found = next(iter(report["explanations"].values()))["localisation"]
            cells.append(f"{found['peak_in_lesion']:.3f} [{found['ci95'][0]:.3f}, "
                         f"{found['ci95'][1]:.3f}] of {found['images']}")
        print(f"| {name} | {size // reduction} x {size // reduction} | "
              f"{'yes' if name == default else ''} | {cells[0]} | {cells[1]} |")
    print(f"\nA lesion covers {found['chance']:.3f} of an image on average (a random peak's chance).")


if __name__ == "__main__":
    main()
