"""The embedded engine's cost: overhead against a bare loop, DP slowdown, memory against clients.

    python benchmarks/federate_engine.py                 # all three tables
    python benchmarks/federate_engine.py --only memory   # one of overhead, dp, memory

Synthetic CT (400 slices, 96 px), timm resnet10t, batch 16. Prints markdown tables. The
memory table runs 5 and 50 clients per round (every client each round) in a fresh process
each: the server adds each update to a running average as it arrives, so peak memory
should not grow with the clients (target: 50 within 1.2x of 5).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.data.synthetic import write_synthetic
from fedct.federated.simulation import run_federate
from fedct.metrics import summary_metrics
from fedct.models import create_model, data_config
from fedct.training import make_loss, make_optimizer, predict, seed_everything, set_threads

SETTINGS = {"model": "resnet10t", "pretrained": "none", "image_size": 96, "batch_size": 16,
            "lr": 1e-3, "rounds": 3, "local_steps": 6, "seed": 0}


def prepare(work: Path, clients: int) -> Path:
    data = work / "data"
    if not data.exists():
        write_synthetic(data, n=400, seed=0, size=96)
    out = work / f"split-{clients}"
    if not out.exists():
        run_split(data / "dataset.csv", out, SplitOptions(scheme="iid", clients=clients, seed=0))
    return out


def bare_loop(split_dir: Path, config) -> float:
    """What a user would write by hand: the same local steps and FedAvg, plus a val score."""
    split = load_split(split_dir)
    seed_everything(0)
    model = create_model(config.model, 2, pretrained="none").to(memory_format=torch.channels_last)
    dcfg = data_config(model, config.image_size)
    images = SplitImages(split, config.image_size)
    train_tf = make_transform(data_cfg=dcfg, train=True, config=config)
    loaders = [make_loader(images.dataset(split.select(split="train", clients=[k]), train_tf),
                           batch_size=config.batch_size, train=True, seed=k)
               for k in range(split.num_clients)]
    val = make_loader(images.dataset(split.select(split="val"),
                                     make_transform(data_cfg=dcfg, train=False, config=config)),
                      batch_size=64, train=False, seed=0)
    loss_fn = make_loss(config, [], 2)
    tick = time.perf_counter()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(config.rounds):
        states, sizes = [], []
        for loader in loaders:
            model.load_state_dict(global_state)
            model.train()
            optimizer = make_optimizer(model, config)
            steps = 0
            while steps < config.local_steps:
                for x, y in loader:
                    loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if steps == config.local_steps:
                        break
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            sizes.append(len(loader.dataset))
        total = sum(sizes)
        global_state = {k: (sum(s[k].double() * n for s, n in zip(states, sizes, strict=True)) / total
                            ).to(states[0][k].dtype) for k in states[0]}
        model.load_state_dict(global_state)
        probs, truth = predict(model, val, device=torch.device("cpu"))
        summary_metrics(probs, truth, 0)
    return time.perf_counter() - tick


def timed_federate(split_dir: Path, out: Path, **extra) -> float:
    config = build_config(FederateConfig, None, {**SETTINGS, **extra})
    tick = time.perf_counter()
    run_federate(split_dir, out, config, init="none", quiet=True, force=True)
    return time.perf_counter() - tick


def child_memory(clients: int, work: Path) -> None:
    split_dir = prepare(work, clients)
    timed_federate(split_dir, work / f"mem-{clients}", rounds=2, local_steps=2)
    print(json.dumps({"clients": clients,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("overhead", "dp", "memory"), default=None,
                        help="run one table only")
    args = parser.parse_args()
    wanted = {args.only} if args.only else {"overhead", "dp", "memory"}
    if args.child_memory:
        child_memory(args.child_memory, args.work)
        return 0
    set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDCT_CACHE", str(work / "cache"))
        split4 = prepare(work, 4)
        config = build_config(FederateConfig, None, SETTINGS)
        timed_federate(split4, work / "warm", rounds=1, local_steps=1)  # cache and warm-up
        if "overhead" in wanted:
            overhead(split4, config, work)
        if "dp" in wanted:
            dp_slowdown(split4, work)
        if "memory" in wanted:
            memory_against_clients(work)
    return 0


def overhead(split4: Path, config, work: Path) -> None:
    fedct_s, bare_s = [], []
    for _ in range(2):
        bare_s.append(bare_loop(split4, config))
        fedct_s.append(timed_federate(split4, work / "fedct"))
    print(f"\n### Engine overhead: {SETTINGS['model']}, 4 clients, {SETTINGS['rounds']} rounds x "
          f"{SETTINGS['local_steps']} local steps, batch {SETTINGS['batch_size']}, "
          f"{SETTINGS['image_size']} px, {torch.get_num_threads()} threads (best of 2)\n")
    print("| loop | seconds |")
    print("| --- | --- |")
    print(f"| bare PyTorch FedAvg loop (+ val score per round) | {min(bare_s):.1f} |")
    print(f"| fedct federate (+ checkpoints, summary, resume state) | {min(fedct_s):.1f} |")
    print(f"| ratio fedct / bare | {min(fedct_s) / min(bare_s):.2f} |")


def dp_slowdown(split4: Path, work: Path) -> None:
    plain = timed_federate(split4, work / "plain")
    rows = []
    for mode in ("functorch", "hooks"):
        for dp_train in ("full", "head"):
            seconds = timed_federate(split4, work / f"dp-{mode}-{dp_train}", dp=True,
                                     dp_train=dp_train, grad_sample_mode=mode,
                                     target_epsilon=8.0)
            rows.append((mode, dp_train, seconds))
    print(f"\n### DP slowdown: same runs with --dp (epsilon 8), non-DP {plain:.1f} s\n")
    print("| grad-sample mode | --dp-train | seconds | ratio to non-DP |")
    print("| --- | --- | --- | --- |")
    for mode, dp_train, seconds in rows:
        print(f"| {mode} | {dp_train} | {seconds:.1f} | {seconds / plain:.2f} |")


def memory_against_clients(work: Path) -> None:
    memory = []
    for clients in (5, 50):
        prepare(work, clients)
        done = subprocess.run([sys.executable, __file__, "--child-memory", str(clients),
                               "--work", str(work)], capture_output=True, text=True,
                              check=True, env={**os.environ})
        memory.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("\n### Peak memory against the clients per round (same 400 images, 2 rounds, "
          "every client each round)\n")
    print("| clients per round | peak RSS (MB) |")
    print("| --- | --- |")
    for item in memory:
        print(f"| {item['clients']} | {item['max_rss_mb']:.0f} |")
    print(f"| ratio 50 / 5 | {memory[1]['max_rss_mb'] / memory[0]['max_rss_mb']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
