"""`fedct demo`: the whole two-stage pipeline on synthetic CT, offline, in under two minutes.

synth -> Dirichlet split over 4 clients -> stage 1 on client 0's share (standing in for
data that may be pooled) -> stage 2 federated over all 4 -> evaluate both on test.
Settings: fedct/settings/demo-pretrain.yaml and demo-federate.yaml, packaged with fedct.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.data.synthetic import write_synthetic
from fedct.errors import FedctError
from fedct.evaluation import run_evaluate
from fedct.federated.simulation import run_federate
from fedct.pretrain import run_pretrain
from fedct.tables import print_evaluation, print_split_table

SETTINGS = Path(__file__).resolve().parent / "settings"  # packaged with fedct


def run_demo(out: Path, *, seed: int = 0, force: bool = False,
             console: Console | None = None) -> dict:
    """Run the pipeline into `out`; returns the evaluation report."""
    console = console or Console()
    if out.exists() and any(out.iterdir()) and not force:
        raise FedctError(f"{out}: exists and is not empty (use --force to replace it)")
    data = write_synthetic(out / "data", n=400, seed=seed, force=True)
    console.rule("1. synth")
    console.print(f"400 synthetic CT slices (100 patients, 4 sites) in {data}")
    console.rule("2. split")
    split_dir, meta = run_split(data / "dataset.csv", out / "split",
                                SplitOptions(scheme="dirichlet", alpha=0.5, clients=4, seed=seed,
                                             min_per_client=20),
                                force=True)
    print_split_table(console, meta)
    console.rule("3. stage 1: pretrain on client 0's share")
    stage1 = run_pretrain(split_dir, out / "stage1",
                          build_config(PretrainConfig, SETTINGS / "demo-pretrain.yaml",
                                       {"seed": seed}),
                          force=True, console=console)
    console.rule("4. stage 2: federate over 4 clients")
    run_federate(split_dir, out / "stage2",
                 build_config(FederateConfig, SETTINGS / "demo-federate.yaml", {"seed": seed}),
                 init=str(out / "stage1" / "best"), force=True, console=console)
    console.rule("5. evaluate on test")
    report = run_evaluate([out / "stage1" / "best", out / "stage2" / "final"], split_dir=split_dir,
                          on="test", out=out / "evaluation", n_boot=500, seed=seed)
    print_evaluation(console, report)
    console.print(f"stage 1 best epoch {stage1['best_epoch']}; everything is under {out}/")
    return report
