"""The Flower app (Message API, flwr 1.42): a ServerApp and a ClientApp over fedct's own functions.

The ClientApp calls `run_client_round`, the embedded engine's client step; the ServerApp
calls `sample_schedule` and `RoundServer.finish_round`, the embedded engine's server step.
Only weights and metrics cross the network: a node reads its own images, from its
node config, and never sends a path or a pixel.

Run config (kebab-case, see `fedct federate --engine flower`): every FederateConfig field,
plus `init` (the starting checkpoint, on the coordinator), `out` (the run directory, on the
coordinator), `split-dir` (optional: the coordinator's val rows and class names),
`num-clients`, `round-timeout` and `node-wait`.

Node config: `client-id=K` plus either `split=SPLIT_DIR` (a node of a local test: it reads
only its own client's rows of the manifest) or `data=PATH` (a hospital's own ImageFolder or
CSV; all rows are its training data), and optionally `state-dir=DIR` for the node's
privacy accountant and personal layers.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()
server_app = ServerApp()

EXTRA_KEYS = ("init", "out", "split-dir", "num-clients", "round-timeout", "node-wait", "resume")


def federate_config(run_config: dict):
    """The typed config from the run config; a key that is neither a FederateConfig field nor
    one of EXTRA_KEYS is an error naming it (the same rule as a YAML file)."""
    from fedct.config import FederateConfig, build_config

    values = {k: v for k, v in run_config.items() if k not in EXTRA_KEYS}
    return build_config(FederateConfig, None, values, source="Flower run config")


# ---------------------------------------------------------------- node side


def _node_state_path(context: Context, client_id: int) -> Path:
    base = Path(str(context.node_config.get("state-dir", Path.home() / ".cache" / "fedct" / "nodes")))
    return base / f"run-{context.run_id}-client-{client_id}.pt"


def _node_data(context: Context, classes: list[str], image_size: int, dcfg: dict, config):
    """This node's own rows only, as a ClientData."""
    from fedct.data.loading import SplitImages, make_transform
    from fedct.data.manifest import LOCAL_VAL, Entry, Split, load_split
    from fedct.data.sources import read_dataset
    from fedct.federated.client import ClientData

    client_id = int(context.node_config["client-id"])
    if "split" in context.node_config:
        split = load_split(str(context.node_config["split"]))
        entries = [e for e in split.entries if e.client == client_id]
        split.entries = entries
    else:
        dataset = read_dataset(str(context.node_config["data"]))
        entries = [Entry(row=r, split="train", client=client_id) for r in dataset.rows]
        split = Split(directory=Path(str(context.node_config["data"])), root=dataset.root,
                      entries=entries, classes=classes, positive=None)
    split.classes = classes
    images = SplitImages(split, image_size)
    images.class_index = {c: i for i, c in enumerate(classes)}
    train = [e for e in split.entries if e.split == "train"]
    local = [e for e in split.entries if e.split == LOCAL_VAL]
    return ClientData(client_id,
                      images.dataset(train, make_transform(data_cfg=dcfg, train=True, config=config)),
                      images.dataset(local, make_transform(data_cfg=dcfg, train=False,
                                                           config=config)) if local else None)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (no data leaves the node)."""
    return Message(RecordDict({"metrics": MetricRecord(
        {"client-id": int(context.node_config["client-id"])})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fedct.federated.client import new_client_state, run_client_round
    from fedct.models import apply_freeze, create_model
    from fedct.privacy import prepare_model_for_dp
    from fedct.training import pick_device, set_threads

    set_threads()
    config = federate_config(context.run_config)
    spec = msg.content["config"]
    classes = list(spec["classes"])
    dcfg = {"input_size": [3, config.image_size, config.image_size], "mean": list(spec["mean"]),
            "std": list(spec["std"])}
    data = _node_data(context, classes, config.image_size, dcfg, config)
    model = create_model(str(spec["architecture"]), len(classes), pretrained="none",
                         drop_rate=config.drop_rate)
    prepare_model_for_dp(model, config, groupnorm=bool(spec["dp-safe"]))
    apply_freeze(model, str(spec["freeze"]), freeze_bn=config.freeze_bn)
    device = pick_device(config.device)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    state_path = _node_state_path(context, data.client_id)
    state = (torch.load(state_path, weights_only=True) if state_path.is_file()
             else new_client_state(config))
    global_weights = msg.content["arrays"].to_torch_state_dict()
    reply, state = run_client_round(model, global_weights, data, config, state,
                                    round_number=int(spec["round"]),
                                    planned_rounds=int(spec["planned-rounds"]), device=device,
                                    num_classes=len(classes))
    state_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, state_path)
    metrics = {"client-id": data.client_id, "steps": int(reply.steps),
               "sat-out": int(reply.status == "sat out")}
    if reply.epsilon is not None:
        metrics["epsilon"] = float(reply.epsilon)
    if reply.noise is not None:
        metrics["noise"] = float(reply.noise)
    content = {"metrics": MetricRecord(metrics)}
    if reply.update is not None:
        metrics.update({"num-examples": int(reply.update.examples),
                        "train-loss": float(reply.update.metrics["train_loss"])})
        content = {"metrics": MetricRecord(metrics),
                   "arrays": ArrayRecord.from_torch_state_dict(reply.update.weights)}
    return Message(RecordDict(content), reply_to=msg)


# ---------------------------------------------------------------- server side


def _wait_for_nodes(grid: Grid, expected: int, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _reply_of(message: Message, client_id: int):
    from fedct.federated.server import ClientReply
    from fedct.federated.strategies import Update

    if message.has_error():
        return ClientReply(client_id, None, status="failed", detail=str(message.error.reason))
    metrics = message.content["metrics"]
    epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None
    noise = float(metrics["noise"]) if "noise" in metrics else None
    if int(metrics.get("sat-out", 0)):
        return ClientReply(client_id, None, status="sat out", epsilon=epsilon,
                           steps=int(metrics["steps"]), noise=noise, detail="privacy budget")
    update = Update(weights=message.content["arrays"].to_torch_state_dict(),
                    examples=int(metrics["num-examples"]),
                    metrics={"train_loss": float(metrics["train-loss"])})
    return ClientReply(client_id, update, epsilon=epsilon, steps=int(metrics["steps"]), noise=noise)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from rich.console import Console

    from fedct.config import to_dict
    from fedct.data.loading import SplitImages, make_transform
    from fedct.data.manifest import Split, load_split
    from fedct.federated.server import ClientReply, RoundServer
    from fedct.federated.simulation import build_model, planned_rounds, sample_schedule
    from fedct.models import data_config
    from fedct.pretrain import checkpoint_meta
    from fedct.runs import prepare_run_dir, read_checkpoint, write_config
    from fedct.training import pick_device, seed_everything, set_threads

    run_config = dict(context.run_config)
    config = federate_config(run_config)
    console = Console(force_terminal=False, width=120)
    set_threads()
    seed_everything(config.seed)
    init = str(run_config["init"])
    out = Path(str(run_config["out"]))
    split_dir = str(run_config.get("split-dir", "")) or None
    if split_dir:
        split = load_split(split_dir)
    else:
        _, meta = read_checkpoint(init)
        split = Split(directory=Path(init), root=Path(init), entries=[], classes=meta["classes"],
                      positive=meta.get("positive"))
    model, architecture = build_model(init, split, config)
    dcfg = data_config(model, config.image_size)
    device = pick_device(config.device)
    model.to(device)
    pooled_val = None
    val_rows = split.select(split="val") if split.entries else []
    if val_rows:
        images = SplitImages(split, config.image_size)
        pooled_val = images.dataset(val_rows, make_transform(data_cfg=dcfg, train=False,
                                                             config=config))
    resume = bool(run_config.get("resume", False))
    out = prepare_run_dir(out, resume=resume, force=False)
    dp_safe = bool(getattr(model, "_fedct_dp_safe", False))
    meta = checkpoint_meta(config, split, dcfg, stage="federate",
                           extra={"architecture": architecture, "fedbn": config.fedbn,
                                  "dp": config.dp, "dp_safe": dp_safe, "engine": "flower"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    server = RoundServer(out=out, config=config, checkpoint_meta=meta, console=console,
                         trainable=trainable, model=model if pooled_val is not None else None,
                         pooled_val=pooled_val,
                         positive_index=split.classes.index(split.positive) if split.positive else 1,
                         device=device)
    global_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if resume:
        global_weights, _ = server.resume()

    num_clients = int(run_config.get("num-clients", 0)) or None
    nodes = _wait_for_nodes(grid, num_clients or config.min_clients,
                            float(run_config.get("node-wait", 60)))
    answers = grid.send_and_receive(
        [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query")
         for n in nodes], timeout=float(run_config.get("node-wait", 60)))
    node_of = {int(a.content["metrics"]["client-id"]): a.metadata.src_node_id
               for a in answers if not a.has_error()}
    num_clients = num_clients or len(node_of)
    schedule = sample_schedule(num_clients, config)
    planned = planned_rounds(schedule, num_clients)
    if not resume:
        write_config(out, to_dict(config), command="federate",
                     extra={"engine": "flower", "split": split_dir, "init": init,
                            "architecture": architecture, "clients": num_clients,
                            "schedule": schedule, "device": str(device)})
    console.print(f"fedct on Flower: {len(node_of)} nodes answered (clients {sorted(node_of)})")
    policy = "head" if config.dp and config.dp_train == "head" else config.freeze
    timeout = float(run_config.get("round-timeout", 3600))
    for round_number in range(server.progress["round"] + 1, config.rounds + 1):
        started = time.perf_counter()
        spec = {"round": round_number, "architecture": architecture, "classes": split.classes,
                "mean": [float(v) for v in dcfg["mean"]], "std": [float(v) for v in dcfg["std"]],
                "freeze": policy, "dp-safe": dp_safe}
        chosen = schedule[round_number - 1]
        messages, replies = [], []
        for k in chosen:
            if k not in node_of:
                replies.append(ClientReply(k, None, status="failed", detail="no node for it"))
                continue
            messages.append(Message(
                RecordDict({"arrays": ArrayRecord.from_torch_state_dict(global_weights),
                            "config": ConfigRecord({**spec, "planned-rounds": planned[k]})}),
                dst_node_id=node_of[k], message_type="train", group_id=str(round_number)))
        client_of_node = {n: k for k, n in node_of.items()}
        answered = set()
        for message in grid.send_and_receive(messages, timeout=timeout):
            k = client_of_node.get(message.metadata.src_node_id)
            if k is None:
                continue
            answered.add(k)
            replies.append(_reply_of(message, k))
        for k in chosen:
            if k in node_of and k not in answered:
                replies.append(ClientReply(k, None, status="failed",
                                           detail=f"no reply within {timeout:.0f}s"))
        replies.sort(key=lambda r: r.client_id)
        global_weights = server.finish_round(round_number, global_weights, replies, started=started)
    server.finish(global_weights)
