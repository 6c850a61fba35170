"""Stage 1 on real COVID-CT: accuracy on val, and fedct's training throughput against a bare loop.

    python benchmarks/stage1_covid.py [--config examples/covid-pretrain.yaml] [--steps 30]

Prints two tables (markdown). Needs ../shared (COVID-CT and the offline ImageNet weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedct.config import PretrainConfig
from fedct.configure import build_config
from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.evaluation import run_evaluate
from fedct.models import apply_freeze, create_model, data_config
from fedct.pretrain import run_pretrain
from fedct.training import make_loss, make_optimizer, seed_everything, set_threads, train_epoch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"


def accuracy(split_dir: Path, work: Path, config_path: Path) -> None:
    config = build_config(PretrainConfig, config_path, {"pretrained": str(WEIGHTS)})
    tick = time.perf_counter()
    run_pretrain(split_dir, work / "stage1", config, force=True, quiet=True)
    wall = time.perf_counter() - tick
    report = run_evaluate([work / "stage1" / "best"], split_dir=split_dir, on="val",
                          out=work / "eval", n_boot=1000)
    m = report["results"][0]["threshold_0.5"]
    ci = m["ci95"]
    print(f"\n### Stage 1: {config.model} on COVID-CT train, scored on val ({config_path.name})\n")
    print("| accuracy | AUC | sensitivity | specificity | epochs | image | wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {m['accuracy']:.3f} ({ci['accuracy'][0]:.2f}-{ci['accuracy'][1]:.2f}) "
          f"| {m['auc']:.3f} ({ci['auc'][0]:.2f}-{ci['auc'][1]:.2f}) "
          f"| {m['sensitivity']:.3f} | {m['specificity']:.3f} | {config.epochs} "
          f"| {config.image_size} | {wall / 60:.1f} min |")


def throughput(split_dir: Path, steps: int, batch_size: int, image_size: int) -> None:
    """fedct's train_epoch (cached uint8 images, augmentation, loader) vs a bare PyTorch loop
    over ready-made float batches, same model, batch size, image size and number of steps."""
    set_threads()
    config = build_config(PretrainConfig, None, {"batch_size": batch_size, "image_size": image_size})
    split = load_split(split_dir)
    images = SplitImages(split, image_size)

    def fresh_model():
        seed_everything(0)
        model = create_model("tf_efficientnet_lite0", 2, pretrained=str(WEIGHTS))
        apply_freeze(model, "full")
        return model.to(memory_format=torch.channels_last)

    model = fresh_model()
    dcfg = data_config(model, image_size)
    rows = split.select(split="train")
    dataset = images.dataset(rows, make_transform(data_cfg=dcfg, train=True, config=config))
    loader = make_loader(dataset, batch_size=batch_size, train=True, seed=0)
    loss_fn = make_loss(config, [], 2)
    results = {}
    batches = [(torch.randn(batch_size, 3, image_size, image_size)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 2, (batch_size,))) for _ in range(4)]
    for name in ["bare", "fedct"] * 3:  # interleaved, three times, to even out drift
        model = fresh_model()
        optimizer = make_optimizer(model, config)
        for x, y in batches[:2]:  # warm-up: oneDNN primitives, allocator
            loss_fn(model(x), y).backward()
            optimizer.zero_grad(set_to_none=True)
        if name == "bare":
            model.train()
            tick = time.perf_counter()
            for i in range(steps):
                x, y = batches[i % len(batches)]
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            seconds = time.perf_counter() - tick
        else:
            tick = time.perf_counter()
            done = 0
            while done < steps:
                done += train_epoch(model, loader, optimizer, loss_fn, device=torch.device("cpu"),
                                    max_steps=steps - done)["steps"]
            seconds = time.perf_counter() - tick
        results.setdefault(name, []).append(steps * batch_size / seconds)
    bare = max(results["bare"])
    ours = max(results["fedct"])
    print(f"\n### Training throughput: tf_efficientnet_lite0, batch {batch_size}, {image_size} px, "
          f"{steps} steps, {torch.get_num_threads()} threads\n")
    print("| loop | images/s (best of 3, after 2 warm-up steps) |")
    print("| --- | --- |")
    print(f"| bare PyTorch (ready float batches, no augmentation) | {bare:.1f} |")
    print(f"| fedct train_epoch (cache, augmentation, loader) | {ours:.1f} |")
    print(f"| ratio fedct / bare | {ours / bare:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "covid-pretrain.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not COVID.is_file() or not WEIGHTS.is_file():
        print(f"needs {COVID} and {WEIGHTS}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDCT_CACHE", str(work / "cache"))
        split_dir = work / "split"
        run_split(COVID, split_dir, SplitOptions(keep_split=True, clients=5, scheme="dirichlet",
                                                 alpha=0.5, seed=1))
        throughput(split_dir, args.steps, args.batch_size, args.image_size)
        if not args.skip_accuracy:
            accuracy(split_dir, work, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
