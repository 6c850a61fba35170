"""A Flower node's part of a round, without Flower: its own data, its model, its saved state.

The ClientApp decodes the server's message, calls `node_round`, and encodes the reply. A
node learns its data from its node config, never from the server:

- `client-id=K` (required): which client of the federation the node is;
- `data=PATH`: a hospital's own ImageFolder or CSV; all its rows are training rows;
  `val=PATH` (optional) its validation rows, which score the global model each round;
  `test=PATH` (optional) rows only `fedct evaluate --engine flower --on test` scores;
- or `split=SPLIT_DIR`: a local test, where the node reads only client K's rows (its
  local_val rows are its validation rows);
- `state-dir=DIR` (optional): where the privacy accountant, FedBN layers and SCAFFOLD
  control are kept between rounds (default `$FEDCT_CACHE/nodes`; see `node_state`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from fedct import privacy
from fedct.config import FederateConfig
from fedct.data.loading import SplitImages, make_transform
from fedct.data.manifest import LOCAL_VAL, Entry, Split, load_split
from fedct.data.sources import expand_volumes, read_dataset
from fedct.data.volumes import VolumeOptions, is_volume
from fedct.errors import FedctError
from fedct.federated.client import ClientData, client_data, client_evaluate, run_client_round
from fedct.federated.node_state import load_state, save_state
from fedct.federated.protocol import ClientReply, Evaluation, RoundSpec, Weights
from fedct.federated.run_model import model_spec
from fedct.models import build_model, place_model
from fedct.training import pick_device


def node_client_id(node_config: dict) -> int:
    if "client-id" not in node_config:
        raise FedctError("node config: client-id is missing (e.g. --node-config 'client-id=0 ...')")
    return int(node_config["client-id"])


# Which of a node's rows each `fedct evaluate --on` choice scores.
ROWS = {"val": (LOCAL_VAL,), "test": ("test",), "train": ("train",),
        "all": ("train", LOCAL_VAL, "test")}


def node_split(node_config: dict, spec: RoundSpec, *, unlabelled: bool = False) -> Split:
    """This node's own rows, labelled by the server's classes: client K's rows of a split, or
    the node's `data` (train), `val` (local_val) and `test` datasets. `unlabelled` (objective
    byol): its folders' names are no classes, and every row takes the first class."""
    client_id = node_client_id(node_config)
    classes = list(spec.classes)
    if "split" in node_config:
        split = load_split(str(node_config["split"]))
        return split.subset(split.select(clients=[client_id]))
    if "data" not in node_config:
        raise FedctError("node config: give data=PATH (the node's own images) or split=SPLIT_DIR")
    volumes = VolumeOptions(slices=str(node_config.get("slices", "lung")),
                            window=str(node_config.get("window", "lung")))
    entries = [Entry(row=r, split=role, client=client_id)
               for key, role in (("data", "train"), ("val", LOCAL_VAL), ("test", "test"))
               if key in node_config
               for r in _own_rows(Path(str(node_config[key])), classes, volumes,
                                  unlabelled=unlabelled)]
    sliced = any(e.row.slice is not None for e in entries)
    return Split(directory=Path(str(node_config["data"])), root=Path("/"), classes=classes,
                 positive=None, entries=entries,
                 meta={"volumes": volumes.record()} if sliced else {})


def _transforms(config: FederateConfig, spec: RoundSpec) -> tuple:
    data_cfg = {"input_size": [3, config.image_size, config.image_size], "mean": list(spec.mean),
                "std": list(spec.std)}
    return (make_transform(data_cfg=data_cfg, train=True, config=config),
            make_transform(data_cfg=data_cfg, train=False, config=config))


def node_data(node_config: dict, config: FederateConfig, spec: RoundSpec) -> ClientData:
    """This node's training and validation rows."""
    split = node_split(node_config, spec, unlabelled=config.objective == "byol")
    train_transform, eval_transform = _transforms(config, spec)
    return client_data(node_client_id(node_config),
                       SplitImages(split, config.image_size, classes=list(spec.classes)),
                       split.entries, train_transform=train_transform,
                       eval_transform=eval_transform)


def node_rows(node_config: dict, config: FederateConfig, spec: RoundSpec, rows: str):
    """The node's `rows` (val, test, train or all) to score, or None when it has none."""
    split = node_split(node_config, spec)
    entries = [e for e in split.entries if e.split in ROWS[rows]]
    if not entries:
        return None
    images = SplitImages(split.subset(entries), config.image_size, classes=list(spec.classes))
    return images.dataset(entries, _transforms(config, spec)[1])


def _own_rows(source: Path, classes: list[str], volumes: VolumeOptions, *,
              unlabelled: bool = False) -> list:
    """A node's own dataset's rows, with absolute paths, labelled by the server's classes;
    its volumes as the slices `volumes` keep (node config `slices=`, `window=`)."""
    dataset = read_dataset(source)
    if any(is_volume(dataset.root / r.path) for r in dataset.rows):
        dataset = expand_volumes(dataset, volumes, skip_bad=False)
    if unlabelled:
        dataset.rows = [dataclasses.replace(r, label=classes[0]) for r in dataset.rows]
    unknown = sorted({r.label for r in dataset.rows} - set(classes))
    if unknown:
        raise FedctError(f"{source}: class {unknown[0]!r} is not one the server trains "
                         f"({', '.join(classes)})")
    return [dataclasses.replace(r, path=str((Path(dataset.root) / r.path).resolve()))
            for r in dataset.rows]


def _node_model(config: FederateConfig, spec: RoundSpec):
    model = build_model(model_spec(config, spec.architecture, len(spec.classes),
                                   groupnorm=spec.groupnorm))
    device = pick_device(config.device)
    return place_model(model, config, device), device


def node_round(node_config: dict, run_id: int, config: FederateConfig, global_weights: Weights,
               spec: RoundSpec, *, control: Weights | None = None) -> ClientReply:
    """Train the server's model on this node's data, from its state as it was before this
    round (`node_state`); the state is saved after the round, under the run's key (the
    Flower run id for a message without one)."""
    data = node_data(node_config, config, spec)
    warning = privacy.delta_warning(len(data.train), config)
    if warning and spec.round == 1:
        print(f"warning: client {data.client_id}: {warning}", file=sys.stderr)
    model, device = _node_model(config, spec)
    run = spec.run or str(run_id)
    state = load_state(node_config, run, data.client_id, config, through_round=spec.round - 1)
    reply, state = run_client_round(model, global_weights, data, config, state,
                                    round_number=spec.round, planned_rounds=spec.planned_rounds,
                                    device=device, num_classes=len(spec.classes), control=control)
    save_state(node_config, run, data.client_id, spec.round, state)
    return reply


def node_evaluate(node_config: dict, run_id: int, config: FederateConfig,
                  global_weights: Weights, spec: RoundSpec, rows: str = "val") -> Evaluation:
    """Score the server's model on this node's `rows` (its own FedBN layers in it, when it
    trained in this run); only aggregates are returned."""
    client_id = node_client_id(node_config)
    dataset = node_rows(node_config, config, spec, rows)
    if dataset is None:
        return Evaluation(client_id)
    model, device = _node_model(config, spec)
    state = load_state(node_config, spec.run or str(run_id), client_id, config,
                       through_round=spec.round)
    return client_evaluate(model, global_weights, dataset, config, state, client_id=client_id,
                           device=device, positive_index=spec.positive_index)
