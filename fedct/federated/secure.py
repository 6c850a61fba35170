"""Secure aggregation on Flower: Flower's SecAgg+ around fedct's own client and server steps.

Flower 1.42 offers SecAgg+ as a workflow (`SecAggPlusWorkflow`, written for its legacy
Strategy API) and a client mod (`secaggplus_mod`). fedct keeps both as they are and adapts
at the edges:

- server: `SecureRound` stands in for the legacy Strategy the workflow calls. It hands the
  workflow each scheduled node's train message (the global weights, the round's spec and
  the SCAFFOLD control, as a FitIns) and receives back only the example-weighted mean of
  the nodes' updates (the workflow unmasks nothing else) with each node's scalar metrics.
- node: the ClientApp's train handler runs `node_round` as always, checks the update
  (keys, shapes, NaN/Inf) before it is masked, and answers with its change against the
  global weights (and its control change) as a FitRes: the mod weights it by the node's
  examples, clips, quantises and masks it, and sends nothing else of it.

The server step then runs on the mean as on a plain round's average (`RunningAverage`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from fedct.federated import protocol
from fedct.federated.protocol import (
    ClientReply,
    RoundResult,
    RoundSpec,
    SecureSum,
    Status,
    Update,
    Weights,
)
from fedct.federated.strategies.base import check_update

KEYS, CONTROL_KEYS = "fedct-keys", "fedct-control-keys"


def workflow(config, timeout: float):
    """Flower's SecAgg+ workflow for this run's settings."""
    from flwr.server.workflow import SecAggPlusWorkflow

    threshold = config.secagg_threshold
    return SecAggPlusWorkflow(
        num_shares=config.secagg_shares or 1.0,  # 1.0: every node of the round
        reconstruction_threshold=float(threshold) if threshold <= 1 else int(threshold),
        max_weight=float(config.secagg_max_weight), clipping_range=float(config.secagg_clip),
        timeout=timeout)


def _arrays(weights: Weights) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float64) for t in weights.values()]


def encode_train(weights: Weights, spec: RoundSpec, control: Weights):
    """Server -> node in a secure round: the same content as a plain round, as a FitIns."""
    from flwr.common import FitIns, ndarrays_to_parameters

    config = {**protocol.to_values(spec), KEYS: list(weights), CONTROL_KEYS: list(control)}
    return FitIns(ndarrays_to_parameters(_arrays(weights) + _arrays(control)), config)


def is_secure_train(content) -> bool:
    return "fitins.parameters" in content.array_records


def decode_train(content) -> tuple[Weights, RoundSpec, Weights]:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    # FitIns' own decoder takes scalars only; the key lists are read from the record itself
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        content.array_records["fitins.parameters"], keep_input=True))
    config = dict(content.config_records["fitins.config"])
    keys, control_keys = list(config.pop(KEYS)), list(config.pop(CONTROL_KEYS, []))
    tensors = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in arrays]
    spec = protocol.from_values(RoundSpec, config)
    return (dict(zip(keys, tensors[:len(keys)], strict=True)), spec,
            dict(zip(control_keys, tensors[len(keys):], strict=True)))


def encode_reply(reply: ClientReply, global_weights: Weights, control: Weights, config):
    """Node -> server (through the SecAgg+ mod): the update's change against the global
    weights as a FitRes weighted by its examples, after the checks the server cannot make
    on a masked update. A node without a usable update weighs in with zero examples."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, ndarrays_to_parameters
    from flwr.common import Status as FlowerStatus

    update = reply.update
    if reply.status is Status.TRAINED:
        problem = ("no update" if update is None
                   else check_update(update, global_weights, control or None))
        if not problem and update.examples > config.secagg_max_weight:
            problem = (f"{update.examples} examples, more than secagg_max_weight "
                       f"{config.secagg_max_weight}")
        if problem:
            reply = dataclasses.replace(reply, update=None, status=Status.REJECTED, detail=problem)
    trained = reply.status is Status.TRAINED
    changes = [(update.weights[k].double() - v.double()).numpy() if trained
               else np.zeros(tuple(v.shape)) for k, v in global_weights.items()]
    changes += [update.control[k].double().numpy() if trained else np.zeros(tuple(v.shape))
                for k, v in control.items()]
    examples = update.examples if trained else 0
    weight = examples / config.secagg_max_weight
    clipped = int(sum(np.count_nonzero(np.abs(c) * weight > config.secagg_clip) for c in changes))
    metrics = {**protocol.to_values(dataclasses.replace(reply, summed_securely=trained)),
               **({f"metric-{k}": float(v) for k, v in update.metrics.items()} if trained else {}),
               "secagg-clipped": clipped}
    return compat.fitres_to_recorddict(
        FitRes(FlowerStatus(Code.OK, ""), ndarrays_to_parameters(changes), examples, metrics),
        keep_input=True)


def decode_reply(fitres) -> ClientReply:
    """The node's reply as the coordinator sees it: scalars and its example count only."""
    metrics = dict(fitres.metrics)
    update_metrics = {k[len("metric-"):]: float(metrics.pop(k)) for k in list(metrics)
                      if k.startswith("metric-")}
    clipped = int(metrics.pop("secagg-clipped", 0))
    reply = protocol.from_values(ClientReply, metrics, update=None)
    if clipped:
        print(f"warning: client {reply.client_id}: {clipped} values of its example-weighted "
              "update were clipped to +-secagg_clip; raise secagg_clip", file=sys.stderr)
    if reply.summed_securely:  # the update's metrics, its weights only in the sum
        return dataclasses.replace(reply, update=Update({}, int(fitres.num_examples),
                                                        update_metrics))
    return reply


@dataclass
class Node:
    """What the workflow needs of a ClientProxy: the node's id."""

    node_id: int


@dataclass
class SecureRound:
    """The legacy Strategy that SecAggPlusWorkflow drives, for one round: it sends fedct's
    train messages and keeps what comes back: the mean of the updates and each reply."""

    messages: dict[int, object]  # node id -> FitIns
    mean: list[np.ndarray] | None = None
    replies: dict[int, ClientReply] = field(default_factory=dict)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(Node(node_id), fitins) for node_id, fitins in self.messages.items()]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        for node, fitres in results:
            self.replies[node.node_id] = decode_reply(fitres)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


def train_on_nodes(grid, context, node_of: dict[int, int], setup, schedule: list[list[int]],
                   planned: dict[int, int], timeout: float, round_number: int,
                   global_weights: Weights, control: Weights, *, run_key: str = "",
                   present: list[int] | None = None) -> RoundResult:
    """One secure round: the scheduled nodes' replies in client order (none carries weights)
    and the `SecureSum` of their updates (None when SecAgg+ halted or fewer than 3 nodes
    answered). `present`: the scheduled clients whose nodes have just answered (the
    previous round's evaluation), else a roll call finds them."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    chosen = schedule[round_number - 1]
    if present is None:
        present = roll_call(grid, [k for k in chosen if k in node_of], node_of, timeout)
    if len(present) < 3:  # with two, each would learn the other's update from the sum
        return RoundResult([ClientReply(k, None, status=Status.FAILED,
                                        detail="no secure round: fewer than 3 nodes answered"
                                        if k in present else "did not answer the roll call")
                            for k in chosen])
    strategy = SecureRound({node_of[k]: encode_train(global_weights,
                                                     setup.round_spec(round_number, planned[k],
                                                                      run_key),
                                                     control) for k in present})
    legacy = LegacyContext(context, strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: round_number})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow(setup.config, timeout)(grid, legacy)
    client_of_node = {n: k for k, n in node_of.items()}
    by_client = {client_of_node[n]: r for n, r in strategy.replies.items()}
    replies = [by_client[k] if k in by_client else
               ClientReply(k, None, status=Status.FAILED,
                           detail="no node for it" if k not in node_of
                           else "dropped out of the secure round")
               for k in chosen]
    return RoundResult(replies, secure_mean(strategy.mean, by_client.values(), round_number,
                                            global_weights, control))


def secure_mean(mean: list[np.ndarray] | None, replies, round_number: int,
                global_weights: Weights, control: Weights) -> SecureSum | None:
    """The unmasked mean change as new weights and control changes (None: nothing summed,
    or the mean is not finite)."""
    summed = [r for r in replies if r.summed_securely]
    if mean is None or not summed:
        return None
    names = list(global_weights)
    mean = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in mean]
    if not all(torch.isfinite(m).all() for m in mean):
        print(f"round {round_number}: the securely summed mean has NaN or Inf; global model "
              "unchanged", file=sys.stderr)
        return None
    weights = {k: _moved(global_weights[k], change) for k, change in zip(names, mean, strict=False)}
    changes = dict(zip(list(control), mean[len(names):], strict=True))
    return SecureSum(weights, changes, sum(r.update.examples for r in summed), len(summed))


def roll_call(grid, clients: list[int], node_of: dict[int, int], timeout: float) -> list[int]:
    """The clients whose nodes answer now. Flower's SecAgg+ halts a round when a node it
    sampled never answers its first stage, so the round takes only the nodes that answer."""
    answers = grid.send_and_receive([protocol.query_message(node_of[k]) for k in clients],
                                    timeout=timeout)
    alive = {a.metadata.src_node_id for a in answers if not a.has_error()}
    return [k for k in clients if node_of[k] in alive]


def _moved(reference: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The global tensor plus the mean change (rounded for integer buffers)."""
    if reference.is_floating_point():
        return (reference.double() + change).to(reference.dtype)
    return (reference.double() + change).round().to(reference.dtype)


def secure_aggregation_mod(msg, context, call_next):
    """Flower's SecAgg+ mod for the train messages of a secure round; in a run whose config
    asks for secure aggregation a plain train message is refused, so no update leaves the
    node in the clear."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    config, _ = protocol.split_run_config(dict(context.run_config))
    if config.secure_aggregation:
        raise RuntimeError("this run asks for secure aggregation: a plain train message is "
                           "refused")
    return call_next(msg, context)
