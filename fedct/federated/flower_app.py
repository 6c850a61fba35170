"""The Flower app (Message API, flwr 1.42): a thin ServerApp and ClientApp over fedct's own code.

The ClientApp decodes the server's message (`protocol`), runs `node.node_round` (the
embedded engine's client step on the node's own images) and encodes the reply. The
ServerApp builds the run's setup (`prepare_setup`), finds which node is which client, and
hands the run driver (`engine.run_rounds`) a `FlowerTransport`, which sends and receives
Flower messages. Only weights and metrics cross the network.

Run config (kebab-case, written by `fedct federate --engine flower`): every FederateConfig
field plus the keys of `protocol.RunExtras`. Node config: see `fedct.federated.node`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedct.errors import FedctError
from fedct.federated import protocol, secure
from fedct.federated.protocol import (
    ClientReply,
    Evaluation,
    Hello,
    RoundResult,
    Status,
    Weights,
)
from fedct.federated.secure import secure_aggregation_mod

if TYPE_CHECKING:  # the ClientApp loads this module: torch and the server only where used
    from fedct.federated.engine import Accept
    from fedct.federated.setup import RunSetup

client_app = ClientApp(mods=[secure_aggregation_mod])
server_app = ServerApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (no data leaves the node)."""
    from fedct.federated.node import node_client_id

    return Message(protocol.encode_hello(Hello(node_client_id(context.node_config))),
                   reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from fedct.federated.node import node_evaluate, node_round
    from fedct.training import set_threads

    set_threads()
    config, _ = protocol.split_run_config(dict(context.run_config))
    if secure.is_secure_train(msg.content):  # the SecAgg+ mod masks what this returns
        weights, spec, control = secure.decode_train(msg.content)
        reply = node_round(dict(context.node_config), context.run_id, config, weights, spec,
                           control=control)
        return Message(secure.encode_reply(reply, weights, control, config), reply_to=msg)
    weights, spec, control = protocol.decode_train(msg.content)
    evaluation, first = None, protocol.decode_evaluate_first(msg.content)
    if first is not None:  # the previous round's evaluation, before these weights train
        _, extras = protocol.split_run_config(dict(context.run_config))
        evaluation = node_evaluate(dict(context.node_config), context.run_id, config, weights,
                                   first, rows=extras.eval_rows)
    reply = node_round(dict(context.node_config), context.run_id, config, weights, spec,
                       control=control)
    return Message(protocol.encode_reply(reply, evaluation), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedct.federated.node import node_evaluate
    from fedct.training import set_threads

    set_threads()
    config, extras = protocol.split_run_config(dict(context.run_config))
    weights, spec, _ = protocol.decode_train(msg.content)
    evaluation = node_evaluate(dict(context.node_config), context.run_id, config, weights, spec,
                               rows=extras.eval_rows)
    return Message(protocol.encode_evaluation(evaluation), reply_to=msg)


def discover_nodes(grid: Grid, expected: int, wait: float) -> dict[int, int]:
    """{client id: node id} of the nodes that answer within `wait` seconds."""
    deadline = time.monotonic() + wait
    while len(grid.get_node_ids()) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
    answers = grid.send_and_receive([protocol.query_message(n) for n in sorted(grid.get_node_ids())],
                                    timeout=wait)
    return {protocol.decode_hello(a.content).client_id: a.metadata.src_node_id
            for a in answers if not a.has_error()}


def exchange(grid: Grid, node_of: dict[int, int], messages: list[Message],
             timeout: float) -> dict[int, Message]:
    """The nodes' answers to `messages` that came within `timeout`, by client id."""
    client_of_node = {n: k for k, n in node_of.items()}
    return {client_of_node[m.metadata.src_node_id]: m
            for m in grid.send_and_receive(messages, timeout=timeout)
            if m.metadata.src_node_id in client_of_node}


def train_replies(chosen: list[int], node_of: dict[int, int], answers: dict[int, Message],
                  timeout: float, accept: Accept) -> list[ClientReply]:
    """The round's replies in client order, each decoded only when the server takes it; a
    silent node counts as failed."""
    replies = []
    for k in chosen:
        message = answers.pop(k, None)
        if k not in node_of:
            reply = ClientReply(k, None, status=Status.FAILED, detail="no node for it")
        elif message is None:
            reply = ClientReply(k, None, status=Status.FAILED,
                                detail=f"no reply within {timeout:.0f}s")
        elif message.has_error():
            reply = ClientReply(k, None, status=Status.FAILED, detail=str(message.error.reason))
        else:
            reply = protocol.decode_reply(message.content)
        replies.append(accept(reply))
    return replies


def evaluation_of(k: int, node_of: dict[int, int], message: Message | None) -> Evaluation:
    """Client k's evaluation from its answer (an evaluate reply, or a train reply that
    carries one)."""
    if message is None:
        return Evaluation(k, status=Status.FAILED,
                          detail="no node for it" if k not in node_of else "no reply")
    if message.has_error():
        return Evaluation(k, status=Status.FAILED, detail=str(message.error.reason))
    return protocol.decode_evaluation(message.content)


def evaluate_message(node: int, spec, weights: Weights) -> Message:
    return Message(protocol.encode_train(weights, spec), dst_node_id=node,
                   message_type="evaluate", group_id=f"eval-{spec.round}")


def evaluate_on_nodes(grid: Grid, node_of: dict[int, int], timeout: float, spec,
                      weights: Weights, asked: list[int]) -> Iterator[Evaluation]:
    """The asked clients' evaluations of `weights`, in client order."""
    answers = exchange(grid, node_of, [evaluate_message(node_of[k], spec, weights)
                                       for k in asked if k in node_of], timeout)
    for k in asked:
        yield evaluation_of(k, node_of, answers.get(k))


@dataclass
class FlowerTransport:
    """A round's messages over Flower's grid, to the nodes found by `discover_nodes`.

    A round's evaluation rides with the next round's train messages: each node asked scores
    the new global weights, then trains on them, in one message; the answers wait in
    `ahead` for that round's `train`. A node asked that does not train next gets an
    evaluate message in the same exchange; the last round evaluates on its own."""

    grid: Grid
    context: Context
    node_of: dict[int, int]
    setup: RunSetup
    schedule: list[list[int]]
    planned: dict[int, int]
    timeout: float
    engine: str = "flower"
    ahead: dict[int, dict[int, Message]] = field(default_factory=dict)  # round: answers
    # the nodes keep their state under this key; saved with the run's resume state, so a
    # resumed run (a new Flower run) finds it
    run_key: str = field(default_factory=lambda: secrets.token_hex(8))

    def spec(self, round_number: int, k: int | None = None):
        return self.setup.round_spec(round_number, 0 if k is None else self.planned[k],
                                     self.run_key)

    def train_message(self, round_number: int, k: int, weights: Weights, control: Weights,
                      evaluate_first=None) -> Message:
        return Message(protocol.encode_train(weights, self.spec(round_number, k), control,
                                             evaluate_first),
                       dst_node_id=self.node_of[k], message_type="train",
                       group_id=str(round_number))

    def train(self, round_number: int, weights: Weights, message: Weights,
              accept: Accept) -> RoundResult:
        chosen = self.schedule[round_number - 1]
        answers = self.ahead.pop(round_number, None)
        if answers is None:
            answers = exchange(self.grid, self.node_of,
                               [self.train_message(round_number, k, weights, message)
                                for k in chosen if k in self.node_of], self.timeout)
        return RoundResult(train_replies(chosen, self.node_of, answers, self.timeout, accept))

    def evaluate(self, round_number: int, weights: Weights, asked: list[int],
                 next_message: Weights | None = None) -> list[Evaluation]:
        spec = self.spec(round_number)
        if next_message is None or round_number >= len(self.schedule):
            return list(evaluate_on_nodes(self.grid, self.node_of, self.timeout, spec, weights,
                                          asked))
        upcoming = [k for k in self.schedule[round_number] if k in self.node_of]
        messages = [self.message_ahead(round_number + 1, k, weights, next_message,
                                       spec if k in asked else None) for k in upcoming]
        messages += [evaluate_message(self.node_of[k], spec, weights) for k in asked
                     if k in self.node_of and k not in upcoming]
        answers = exchange(self.grid, self.node_of, messages, self.timeout)
        del messages
        evaluations = [evaluation_of(k, self.node_of, answers.get(k)) for k in asked]
        self.ahead = {round_number + 1: {k: answers[k] for k in upcoming if k in answers}}
        return evaluations

    def message_ahead(self, round_number: int, k: int, weights: Weights, control: Weights,
                      evaluate_first) -> Message:
        """What a node of round `round_number` gets with the previous round's evaluation:
        that round's train message, which asks it to score the weights first if it was
        asked to (`evaluate_first`, the evaluation's spec)."""
        return self.train_message(round_number, k, weights, control, evaluate_first)

    def state_dict(self) -> dict:
        return {"run_key": self.run_key}  # the nodes keep their own state in their state-dir

    def load_state_dict(self, state: dict) -> None:
        self.run_key = str(state.get("run_key", self.run_key))


class SecureFlowerTransport(FlowerTransport):
    """Training through SecAgg+: the replies carry no weights, the round returns their sum.

    SecAgg+'s stages cannot carry an evaluation, so a round's evaluation goes on its own;
    it serves as the next round's roll call instead: the next round's nodes not asked get a
    query in the same exchange, and the round takes the nodes that answered."""

    def message_ahead(self, round_number: int, k: int, weights: Weights, control: Weights,
                      evaluate_first) -> Message:
        """The evaluation, or a query for a node not asked: the answers are the roll call."""
        if evaluate_first is None:
            return protocol.query_message(self.node_of[k])
        return evaluate_message(self.node_of[k], evaluate_first, weights)

    def train(self, round_number: int, weights: Weights, message: Weights,
              accept: Accept) -> RoundResult:
        answers = self.ahead.pop(round_number, None)
        present = None if answers is None else [
            k for k in self.schedule[round_number - 1]
            if k in answers and not answers[k].has_error()]
        result = secure.train_on_nodes(self.grid, self.context, self.node_of, self.setup,
                                       self.schedule, self.planned, self.timeout, round_number,
                                       weights, message, run_key=self.run_key, present=present)
        return RoundResult([accept(r) for r in result.replies], result.secure_sum)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from rich.console import Console

    from fedct.federated.grid import QuickGrid

    if isinstance(grid, Grid) and not isinstance(grid, QuickGrid):
        grid = QuickGrid(grid)  # Flower's own grid waits 3 s between pulls of replies

    from fedct.federated.engine import run_rounds
    from fedct.federated.setup import (
        eval_schedule,
        planned_rounds,
        prepare_setup,
        sample_schedule,
    )
    from fedct.federated.view import RoundView
    from fedct.models import place_model
    from fedct.training import pick_device, seed_everything, set_threads

    config, extras = protocol.split_run_config(dict(context.run_config))
    console = Console(force_terminal=False, width=120)
    set_threads()
    if extras.evaluate:
        cross_site(grid, config, extras, console)
        return
    seed_everything(config.seed)
    setup = prepare_setup(config, init=extras.init, split_dir=extras.split_dir or None)
    config = setup.config  # with the monitor resolved
    device = pick_device(config.device)
    place_model(setup.model, config, device)
    node_of = discover_nodes(grid, extras.num_clients or config.min_clients, extras.node_wait)
    console.print(f"fedct on Flower: {len(node_of)} nodes answered (clients {sorted(node_of)})")
    needed = max(1, config.min_clients)
    if len(node_of) < needed:  # rounds without updates are no run
        raise FedctError(f"{len(node_of)} nodes answered within {extras.node_wait:.0f}s, fewer "
                         f"than min_clients {needed}: start the nodes (fedct node) and submit "
                         "again; no round was run")
    num_clients = extras.num_clients or len(node_of)
    schedule = sample_schedule(num_clients, config)
    transport = (SecureFlowerTransport if config.secure_aggregation else FlowerTransport)(
        grid, context, node_of, setup, schedule, planned_rounds(schedule, num_clients),
        extras.round_timeout)
    run_rounds(setup, Path(extras.out), transport, num_clients=num_clients, schedule=schedule,
               eval_plan=eval_schedule(num_clients, config), device=device,
               view=RoundView(console, rounds=config.rounds, dp=config.dp, live=False,
                              client_lines=True, federated=config.monitor.startswith("fed_"),
                              classes=len(setup.classes), scored=config.objective != "byol"),
               resume=extras.resume)


def cross_site(grid: Grid, config, extras, console) -> None:
    """`fedct evaluate --engine flower`: every checkpoint scored by every node that answers."""
    from fedct.federated.cross_site import checkpoints_of, report_of, spec_of
    from fedct.runs import read_checkpoint

    node_of = discover_nodes(grid, extras.num_clients or 1, extras.node_wait)
    console.print(f"fedct on Flower: {len(node_of)} nodes answered (clients {sorted(node_of)})")
    replies = {}
    for checkpoint in checkpoints_of(extras):
        weights, meta = read_checkpoint(checkpoint)
        replies[checkpoint] = list(evaluate_on_nodes(grid, node_of, extras.round_timeout,
                                                     spec_of(meta), weights, sorted(node_of)))
        console.print(f"{checkpoint}: " + ", ".join(
            f"client {e.client_id} {e.status.value} ({e.examples} rows)"
            for e in replies[checkpoint]))
    report_of(checkpoints_of(extras), replies, extras, tta=config.tta)
