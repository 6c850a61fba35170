"""What SCAFFOLD's control variates cost: bytes per round message, state, time per step.

    python benchmarks/scaffold_cost.py [--model tf_efficientnet_lite0] [--image-size 128]
                                       [--steps 10]

For each freeze setting, encodes a round's messages as the Flower apps do
(`protocol.encode_train` / `encode_reply`) with and without the control variate and sums
the bytes of their arrays; the state each client keeps (its control variate) and the
server's (its control); and, unless --steps 0, the seconds per local step of AdamW with
and without the correction hook (batch 32, CPU threads as the machine has: run it on an
idle machine). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.federated import protocol
from fedct.federated.protocol import ClientReply, RoundSpec, Update
from fedct.federated.strategies import scaffold
from fedct.models import ModelSpec, build_model
from fedct.training import make_optimizer, set_threads


def record_bytes(content) -> int:
    return sum(len(array.data) for record in content.values() if hasattr(record, "to_torch_state_dict")
               for array in record.values())


def seconds_per_step(model, config, steps: int, size: int, control=None) -> float:
    optimizer = make_optimizer(model, config)
    handle = scaffold.attach_correction(model, optimizer, control, {
        k: torch.zeros_like(v) for k, v in control.items()}) if control else None
    x, y = torch.randn(32, 3, size, size), torch.randint(0, 2, (32,))
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    if handle:
        handle.remove()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    set_threads()
    print(f"| {args.model}, freeze | trainable parameters | server -> client bytes (fedavg / "
          "scaffold) | client -> server bytes (fedavg / scaffold) | control variate state per "
          "client and on the server | s per step (fedavg / scaffold) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for freeze in ("full", "head"):
        config = build_config(FederateConfig, None, {"model": args.model, "freeze": freeze,
                                                     "image_size": args.image_size})
        torch.manual_seed(0)
        model = build_model(ModelSpec(architecture=args.model, num_classes=2, freeze=freeze))
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        control = scaffold.zero_control(model, scaffold.control_keys(model))
        spec = RoundSpec(round=1, planned_rounds=1, architecture=args.model,
                         classes=("a", "b"), positive="a", mean=(0.5,) * 3, std=(0.5,) * 3,
                         groupnorm=False)
        down = [record_bytes(protocol.encode_train(weights, spec, c)) for c in ({}, control)]
        up = [record_bytes(protocol.encode_reply(ClientReply(0, Update(weights, 10, {}, control=c))))
              for c in ({}, control)]
        timing = [seconds_per_step(model, config, args.steps, args.image_size, c)
                  if args.steps else float("nan") for c in (None, control)]
        trainable = sum(v.numel() for v in control.values())
        print(f"| {freeze} | {trainable:,} | {down[0]:,} / {down[1]:,} | {up[0]:,} / {up[1]:,} "
              f"| {scaffold.state_bytes(control):,} | {timing[0]:.3f} / {timing[1]:.3f} |")


if __name__ == "__main__":
    main()
