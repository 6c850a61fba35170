"""What secure aggregation costs: bytes and seconds per round, with and without SecAgg+.

    python benchmarks/secagg_cost.py                # 3 and 6 nodes
    python benchmarks/secagg_cost.py --nodes 3      # one size
    python benchmarks/secagg_cost.py --scale demo-out/split demo-out/stage1/best fedct/settings/demo-federate.yaml

A small model (timm's test_efficientnet, 32 px, 2 local steps) on synthetic slices split
IID over the nodes. Bytes: every message to and from the coordinator in one round, as
Flower's protobuf encodes it, counted in process by a grid that hands each message to the
real ClientApp (SecAgg+ mod included). Seconds: the server's time per round (summary.csv)
of a real Flower run on loopback (a SuperLink and one SuperNode per node, the test
harness of tests/test_flower.py), two rounds, the second reported (the first includes
start-up). Also the largest change of any value in a round's update, the scale SecAgg+'s
clipping range must cover; `--scale` measures it (round 1, plain) for any split, starting
point and config. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
SETTINGS = {"model": "test_efficientnet", "image-size": 32, "batch-size": 16, "lr": 0.003,
            "rounds": 2, "local-steps": 2, "seed": 3}


def prepare(work: Path, nodes: int) -> Path:
    from fedct.data.manifest import SplitOptions, run_split
    from fedct.data.synthetic import write_synthetic

    data = work / "data"
    if not data.is_dir():
        write_synthetic(data, n=60 * nodes, seed=0, size=64)
    split = work / f"split-{nodes}"
    run_split(data / "dataset.csv", split, SplitOptions(scheme="iid", clients=nodes, seed=0),
              force=True)
    return split


def small_config(secure_on: bool):
    from fedct.config import FederateConfig
    from fedct.configure import build_config

    return build_config(FederateConfig, None, {**{k.replace("-", "_"): v
                                                  for k, v in SETTINGS.items()},
                                               "secure_aggregation": secure_on})


def bytes_per_round(split: Path, nodes: int, work: Path, config,
                    init: str = "none") -> tuple[int, float, float]:
    """Bytes to and from the coordinator in round 1 and, in a plain round, the largest
    |change| of a value and of a value times examples / max_weight (what SecAgg+ clips)."""
    import copy

    from flwr.app import Context, RecordDict
    from flwr.common.serde import recorddict_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from fedct.federated import secure
    from fedct.federated.flower_app import FlowerTransport, client_app
    from fedct.federated.protocol import RunExtras, run_config_values
    from fedct.federated.setup import planned_rounds, prepare_setup, sample_schedule

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    secure_on = config.secure_aggregation
    setup = prepare_setup(config, init=init, split_dir=split)
    run_config = run_config_values(setup.config, RunExtras(out=str(work / "out")))
    contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(),
                                 node_config={"client-id": k, "split": str(split),
                                              "state-dir": str(work / f"state-{secure_on}-{k}")},
                                 run_config=run_config) for k in range(nodes)}
    sent = [0]

    class CountingGrid:
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for message in messages:
                sent[0] += recorddict_to_proto(message.content).ByteSize()
                reply = client_app(copy.deepcopy(message), contexts[message.metadata.dst_node_id])
                sent[0] += recorddict_to_proto(reply.content).ByteSize()
                replies.append(reply)
            return replies

    weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    schedule = sample_schedule(nodes, setup.config)
    node_of = {k: 100 + k for k in range(nodes)}
    args = (node_of, setup, schedule, planned_rounds(schedule, nodes), 600.0, 1, weights, {})
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    if secure_on:
        secure.train_on_nodes(CountingGrid(), server, *args)
        return sent[0], float("nan"), float("nan")
    transport = FlowerTransport(CountingGrid(), server, node_of, setup, schedule,
                                planned_rounds(schedule, nodes), 600.0)
    replies = transport.train(1, weights, {}, accept=lambda reply: reply).replies
    changes = [(max(float((r.update.weights[k].double() - w.double()).abs().max())
                    for k, w in weights.items() if w.is_floating_point()), r.update.examples)
               for r in replies]
    return (sent[0], max(c for c, _ in changes),
            max(c * n / config.secagg_max_weight for c, n in changes))


def seconds_per_round(split: Path, nodes: int, work: Path, secure_on: bool) -> float:
    sys.path.insert(0, str(TESTS))
    from conftest import Federation

    home = work / f"fed-{nodes}-{secure_on}"
    home.mkdir(parents=True)
    federation = Federation(home, split, clients=nodes)
    out = work / f"run-{nodes}-{secure_on}"
    try:
        settings = {**SETTINGS, **({"secure-aggregation": True} if secure_on else {})}
        proc = federation.submit(split, out, settings=settings)
        output, _ = proc.communicate(timeout=1800)
    finally:
        federation.stop()
    if proc.returncode != 0:
        raise SystemExit(output)
    with (out / "summary.csv").open() as handle:
        return float(list(csv.DictReader(handle))[-1]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--scale", nargs=3, metavar=("SPLIT", "INIT", "CONFIG"),
                        help="instead: the update scale of a plain run of CONFIG from INIT")
    args = parser.parse_args()
    if args.scale:
        from fedct.config import FederateConfig
        from fedct.configure import build_config
        from fedct.data.manifest import load_split

        split = Path(args.scale[0])
        nodes = load_split(split).num_clients
        config = build_config(FederateConfig, Path(args.scale[2]), {})
        with tempfile.TemporaryDirectory() as scratch:
            _, largest, weighted = bytes_per_round(split, nodes, Path(scratch), config,
                                                   init=args.scale[1])
        print(f"round 1 of {args.scale[2]} from {args.scale[1]}, {nodes} clients: largest "
              f"change of a value {largest:.3g}; times examples / {config.secagg_max_weight}: "
              f"{weighted:.3g}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for nodes in args.nodes:
            split = prepare(work, nodes)
            plain_bytes, largest, _ = bytes_per_round(split, nodes, work, small_config(False))
            secure_bytes, _, _ = bytes_per_round(split, nodes, work, small_config(True))
            plain_s = seconds_per_round(split, nodes, work, False)
            secure_s = seconds_per_round(split, nodes, work, True)
            rows.append((nodes, plain_bytes, secure_bytes, plain_s, secure_s, largest))
    print("| nodes | bytes/round plain | bytes/round SecAgg+ | ratio | s/round plain | "
          "s/round SecAgg+ | ratio | largest change of a value |")
    print("|---|---|---|---|---|---|---|---|")
    for nodes, pb, sb, ps, ss, largest in rows:
        print(f"| {nodes} | {pb:,} | {sb:,} | {sb / pb:.2f} | {ps:.1f} | {ss:.1f} | "
              f"{ss / ps:.2f} | {largest:.3g} |")


if __name__ == "__main__":
    main()
