"""What a Flower round costs beyond the work: seconds per round on loopback against the
embedded engine and against Flower's own message path.

    python benchmarks/flower_overhead.py                       # warm nodes, 3 and 6, plain + SecAgg+
    python benchmarks/flower_overhead.py --nodes 3 --modes warm process

The job is the one of benchmarks/secagg_cost.py (timm's test_efficientnet, 32 px, 2 local
steps of batch 16, synthetic slices split IID over the nodes), 4 rounds. Each Flower run
starts a SuperLink and one `fedct node` per node on 127.0.0.1 (insecure), as the tests do:

- **embedded**: `fedct federate` in one process, the same job;
- **floor**: a no-op ServerApp on the same federation that sends one message to every node
  and waits for every reply, 8 times: fedct's ClientApp answers it without torch work, so
  this is the cost of one exchange on Flower's message path (SuperLink, SuperNode polling,
  the node's task claim, the reply);
- **plain / SecAgg+**: `fedct federate --engine flower`; round 1 (start-up: the first
  message builds the node's caches) is reported apart from the mean of rounds 2-4 (the
  server's seconds per round, summary.csv). A plain round's evaluation rides with the next
  round's training, so round 1 holds round 2's training and round 4 an evaluation alone.

Node seconds are what `fedct node` logs per message in warm mode (decode, train, encode
inside the node). The goal line compares a plain round with one exchange (the floor) plus
the embedded engine's round. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from secagg_cost import SETTINGS, prepare  # noqa: E402

ROUNDS = 4
FLOOR_EXCHANGES = 8
FLOOR_APP = '''
import json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from fedct.federated.grid import QuickGrid

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    grid = QuickGrid(grid)
    expected = int(context.run_config["nodes"])
    while len(list(grid.get_node_ids())) < expected:
        time.sleep(0.2)
    seconds = []
    for _ in range(int(context.run_config["exchanges"])):
        started = time.perf_counter()
        replies = list(grid.send_and_receive(
            [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query")
             for n in grid.get_node_ids()], timeout=120))
        assert len(replies) == expected and not any(r.has_error() for r in replies)
        seconds.append(time.perf_counter() - started)
    with open(context.run_config["out"], "w") as handle:
        json.dump(seconds, handle)
'''


def embedded_seconds(split: Path, work: Path, nodes: int) -> list[float]:
    from fedct.config import FederateConfig
    from fedct.configure import build_config
    from fedct.federated.simulation import run_federate

    config = build_config(FederateConfig, None, {**{k.replace("-", "_"): v
                                                    for k, v in SETTINGS.items()},
                                                 "rounds": ROUNDS})
    out = work / f"embedded-{nodes}"
    run_federate(split, out, config, init="none", quiet=True)
    return round_seconds(out)


def round_seconds(out: Path) -> list[float]:
    with (out / "summary.csv").open() as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def node_seconds(home: Path, nodes: int) -> dict[str, list[float]]:
    """Seconds per message inside the warm nodes, by message type, from their logs."""
    found: dict[str, list[float]] = {}
    for k in range(nodes):
        log = home / f"node{k}.log"
        if log.is_file():
            for kind, seconds in re.findall(r"fedct node: run \d+, (\S+) completed in ([\d.]+)s",
                                            log.read_text()):
                found.setdefault(kind, []).append(float(seconds))
    return found


def floor_seconds(federation, work: Path, nodes: int) -> list[float]:
    from fedct.federated.flower_run import write_app

    app = work / f"floor-app-{nodes}-{time.monotonic_ns()}"
    app.mkdir()
    (app / "floor_app.py").write_text(FLOOR_APP)
    out = app / "seconds.json"
    write_app(app, {"nodes": nodes, "exchanges": FLOOR_EXCHANGES, "out": str(out)},
              serverapp="floor_app:server_app")
    flwr = Path(sys.executable).parent / "flwr"
    done = subprocess.run([str(flwr), "run", str(app), "loopback", "--stream"],
                          env=federation.env, capture_output=True, text=True, timeout=900)
    if not out.is_file():
        raise SystemExit(f"the floor app failed:\n{done.stdout}\n{done.stderr}")
    import json

    return json.loads(out.read_text())


def flower_seconds(federation, split: Path, work: Path, secure_on: bool) -> list[float]:
    out = work / f"run-{time.monotonic_ns()}"
    settings = {**SETTINGS, "rounds": ROUNDS,
                **({"secure-aggregation": True} if secure_on else {})}
    proc = federation.submit(split, out, settings=settings)
    output, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(output)
    return round_seconds(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--modes", nargs="+", default=["warm"], choices=["warm", "process"])
    args = parser.parse_args()
    from conftest import Federation

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        os.environ["FEDCT_CACHE"] = str(work / "cache")
        for nodes in args.nodes:
            split = prepare(work, nodes)
            embedded = embedded_seconds(split, work, nodes)
            for mode in args.modes:
                home = work / f"fed-{nodes}-{mode}"
                home.mkdir()
                federation = Federation(home, split, clients=nodes, mode=mode)
                try:
                    floor = floor_seconds(federation, work, nodes) if mode == "warm" else []
                    plain = flower_seconds(federation, split, work, False)
                    secure = flower_seconds(federation, split, work, True)
                finally:
                    federation.stop()
                inside = node_seconds(home, nodes)
                rows.append((nodes, mode, embedded, floor, plain, secure, inside))
                print(f"measured {nodes} nodes, {mode}: embedded {embedded}, floor {floor}, "
                      f"plain {plain}, SecAgg+ {secure}", file=sys.stderr, flush=True)
    print(f"{ROUNDS} rounds; seconds per round: round 1 (start-up) | mean of rounds 2-{ROUNDS}")
    print()
    print("| nodes | nodes' mode | embedded | floor: one exchange | plain Flower | "
          "SecAgg+ | SecAgg+ / plain | inside a node per message (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for nodes, mode, embedded, floor, plain, secure, inside in rows:
        def cell(seconds):
            return f"{seconds[0]:.1f} \\| {statistics.mean(seconds[1:]):.2f}"
        ratio = statistics.mean(secure[1:]) / statistics.mean(plain[1:])
        floor_cell = f"{statistics.median(floor):.2f}" if floor else "-"
        node_cell = ", ".join(f"{kind} {statistics.median(s):.2f}"
                              for kind, s in sorted(inside.items())) or "-"
        print(f"| {nodes} | {mode} | {cell(embedded)} | {floor_cell} | {cell(plain)} | "
              f"{cell(secure)} | {ratio:.2f} | {node_cell} |")
    print()
    for nodes, mode, embedded, floor, plain, _, _ in rows:
        if floor:
            limit = statistics.median(floor) + statistics.mean(embedded[1:])
            print(f"{nodes} nodes, {mode}: plain round {statistics.mean(plain[1:]):.2f} s "
                  f"({sum(plain) / len(plain):.2f} s over all {ROUNDS} rounds) against "
                  f"1 exchange x floor + embedded = {limit:.2f} s "
                  f"({statistics.mean(plain[1:]) / limit:.2f}x)")


if __name__ == "__main__":
    main()
