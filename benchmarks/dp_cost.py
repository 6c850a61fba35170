"""Seconds per round of one client's DP update, by `--dp-train` mode and feature cache.

    python benchmarks/dp_cost.py [--split DIR] [--init CKPT] [--rounds 4] [--image-size 128]

One COVID-CT client (client 0 of the split: about 85 images) trains under DP for a few
rounds; the table gives the first round (which, with the cache, computes the features) and
the mean of the later ones, against head-only DP on images with batches of 32 (the path
before the feature cache). Defaults read the label skew study's work folder
(benchmarks/label_skew_study.py --work /work/skew); any split and fedct checkpoint will do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.federated import client as client_module
from fedct.federated.setup import prepare_setup
from fedct.training import set_threads

CASES = {  # label: settings (all DP, epsilon 3)
    "head, images, batch 32": {"dp_train": "head", "cache_features": False},
    "head, cached, batch 32": {"dp_train": "head"},
    "head, cached, 8 views, batch 32": {"dp_train": "head", "feature_views": 8},
    "head, cached, 8 views, batch all x 20 steps": {"dp_train": "head", "feature_views": 8,
                                                    "batch_size": "all", "local_steps": 20},
    "norms, batch 32": {"dp_train": "norms"},
    "norms, batch all": {"dp_train": "norms", "batch_size": "all"},
    "full (frozen BN), batch all": {"dp_train": "full", "freeze_bn": True, "batch_size": "all"},
}


def seconds_per_round(settings: dict, args) -> list[float]:
    config = build_config(FederateConfig, None, {"dp": True, "target_epsilon": 3.0,
                                                 "image_size": args.image_size,
                                                 "rounds": args.rounds, **settings})
    setup = prepare_setup(config, init=args.init, split_dir=args.split)
    data = client_module.client_data(0, setup.images, setup.split.select(clients=[0]),
                                     train_transform=setup.transform(train=True),
                                     eval_transform=setup.transform(train=False))
    state = client_module.new_client_state(config)
    weights = {k: v.clone() for k, v in setup.model.state_dict().items()}
    times = []
    for round_number in range(1, args.rounds + 1):
        start = time.perf_counter()
        update, state = client_module.client_update(
            setup.model, weights, data, setup.config, state, round_number=round_number,
            device=torch.device("cpu"), num_classes=2, noise=1.0)
        times.append(time.perf_counter() - start)
        weights = update.weights
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="/work/skew/covid/split-iid")
    parser.add_argument("--init", default="/work/skew/covid/stage1/best")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    set_threads()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FEDCT_CACHE"] = cache  # a cold feature cache, as a run's first round has
        print("| case | first round (s) | later rounds (s) | later rounds vs head on images |")
        print("| --- | --- | --- | --- |")
        reference = None
        for label, settings in CASES.items():
            times = seconds_per_round(settings, args)
            later = statistics.mean(times[1:])
            reference = reference or later
            print(f"| {label} | {times[0]:.2f} | {later:.3f} | {reference / later:.1f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
