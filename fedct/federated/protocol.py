"""The messages of a federated round, typed, and their encoding to Flower's records.

Both engines pass these objects between the client step and the server step; only the
Flower apps encode them for the network. Adding a field to a message is one edit here: the
encoders walk the dataclass fields. flwr is imported inside the encoders, so the embedded
engine runs without it.

On the wire a round is three messages: `Hello` (a node says which client it is), the
global weights with a `RoundSpec` and, under SCAFFOLD, the server's control variate
(server -> node), and a `ClientReply` with the node's `Update` when it trained (node ->
server). Federated evaluation sends the aggregated weights
with a `RoundSpec` again and gets an `Evaluation` back: aggregates of the node's own
validation rows, never a row's score.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the annotation: the CLI reads the defaults below cheaply
    import torch

Weights = dict[str, "torch.Tensor"]

NODE_WAIT_SECONDS = 120.0  # how long the Flower server waits for nodes to show up
ROUND_TIMEOUT_SECONDS = 3600.0  # how long it waits for a round's replies


class Status(StrEnum):
    """What became of a client's part in a round."""

    TRAINED = "trained"
    SAT_OUT = "sat out"  # its privacy budget would pass the target
    FAILED = "failed"  # it did not answer, or answered with an error
    REJECTED = "rejected"  # its update failed the server's checks
    EVALUATED = "evaluated"  # it scored the global model on its validation rows


@dataclass(frozen=True)
class Hello:
    """A node's answer to the server's query: which client of the federation it is."""

    client_id: int


@dataclass(frozen=True)
class RoundSpec:
    """What a client needs besides the global weights: the round, and the model to rebuild."""

    round: int
    planned_rounds: int  # rounds this client is scheduled for: what its privacy budget must last
    architecture: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    groupnorm: bool  # the server's BatchNorm layers are GroupNorm (DP full)
    positive: str | None = None  # two classes: the class the histograms count; else argmax
    run: str = ""  # the run's key, under which a node keeps its state (kept across resume)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else list(self.classes).index(self.positive)


@dataclass
class Update:
    """What a client sends back: its weights, how many examples it trained on, its metrics,
    and under SCAFFOLD the change of its control variate."""

    weights: Weights
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    control: Weights = field(default_factory=dict)


@dataclass(frozen=True)
class ClientReply:
    """One client's answer in a round: an update, or why there is none."""

    client_id: int
    update: Update | None
    status: Status = Status.TRAINED
    epsilon: float | None = None
    steps: int = 0
    noise: float | None = None
    detail: str = ""
    summed_securely: bool = False  # its update went into the round's secure sum, never alone


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learns of a secure round's updates: their example-weighted mean
    (weights and SCAFFOLD control changes), the examples and how many nodes went in."""

    weights: Weights
    control: Weights
    examples: int
    count: int


@dataclass
class RoundResult:
    """What a transport returns for a round: every scheduled client's reply as the server
    accepted it (updates already collected and dropped), and the sum of the updates when
    the transport summed them itself (SecAgg+), else None."""

    replies: list[ClientReply]
    secure_sum: SecureSum | None = None


@dataclass(frozen=True)
class Evaluation:
    """A client's scores of the global model on its own validation rows, as aggregates only:
    the loss sum, argmax-correct count, and histograms of the positive-class score per label
    (bins of `fedct.operating_point`); for more than two classes, one such pair per class
    (its own score, its rows against the others, concatenated) and the argmax confusion
    matrix (row-major). For two classes, when its rows share patients, the same pair of
    histograms over its patients' mean scores (`patient_*`), for the patient-level
    operating point."""

    client_id: int
    examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    positives: tuple[int, ...] = ()
    negatives: tuple[int, ...] = ()
    confusion: tuple[int, ...] = ()
    patient_positives: tuple[int, ...] = ()
    patient_negatives: tuple[int, ...] = ()
    status: Status = Status.EVALUATED
    detail: str = ""


@dataclass(frozen=True)
class RunExtras:
    """The Flower run config's keys that are not FederateConfig fields."""

    init: str = "none"  # the starting checkpoint, on the coordinator
    out: str = ""  # the run directory, on the coordinator
    split_dir: str = ""  # optional: the coordinator's val rows and class names
    num_clients: int = 0  # 0: as many as the nodes that answer
    round_timeout: float = ROUND_TIMEOUT_SECONDS
    node_wait: float = NODE_WAIT_SECONDS
    resume: bool = False
    # cross-site evaluation (`fedct evaluate --engine flower`) instead of training:
    evaluate: str = ""  # the checkpoints to score, a JSON list of paths on the coordinator
    eval_rows: str = "val"  # which rows each node scores: val | test | train | all
    eval_bootstrap: int = 1000
    eval_seed: int = 0
    eval_threshold: float = 0.0  # > 0: score at this threshold, not the checkpoint's


def kebab(name: str) -> str:
    return name.replace("_", "-")


EXTRA_KEYS = tuple(kebab(f.name) for f in dataclasses.fields(RunExtras))


def split_run_config(run_config: dict):
    """(FederateConfig, RunExtras) from a Flower run config; an unknown key is an error naming it."""
    from fedct.config import FederateConfig
    from fedct.configure import build_config

    config = build_config(FederateConfig, None,
                          {k: v for k, v in run_config.items() if k not in EXTRA_KEYS},
                          source="Flower run config")
    extras = from_values(RunExtras, {k: v for k, v in run_config.items() if k in EXTRA_KEYS})
    return config, extras


def run_config_values(config, extras: RunExtras) -> dict:
    """The run config for `config` and `extras`, kebab-case, None values left out."""
    values = {kebab(f.name): getattr(config, f.name) for f in dataclasses.fields(config)
              if getattr(config, f.name) is not None}
    values.update(to_values(extras))
    return values


# ------------------------------------------------------------------ dataclass <-> flat values


def to_values(obj) -> dict:
    """A flat dataclass as record values: kebab-case keys, enums as their value, tuples as
    lists, None and empty tuples left out (their defaults come back)."""
    values = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or value == () or isinstance(value, Update):  # updates travel as arrays
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        values[kebab(f.name)] = value
    return values


def from_values(cls, values, **given):
    """The inverse of `to_values`, coercing each value to its field's type."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        key = kebab(f.name)
        if f.name in given or key not in values:
            continue
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        base = options[0] if options and typing.get_origin(hint) is not tuple else hint
        raw = values[key]
        if typing.get_origin(base) is tuple:
            kwargs[f.name] = tuple(typing.get_args(base)[0](v) for v in raw)
        else:
            kwargs[f.name] = base(raw)
    return cls(**kwargs)


# ------------------------------------------------------------------ Flower records


def query_message(node: int):
    """Server -> node: which client are you (or: are you there)?"""
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                   message_type="query")


def encode_hello(hello: Hello):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"hello": ConfigRecord(to_values(hello))})


def decode_hello(content) -> Hello:
    return from_values(Hello, dict(content["hello"]))


def encode_train(weights: Weights, spec: RoundSpec, control: Weights | None = None,
                 evaluate_first: RoundSpec | None = None):
    """Server -> node: the global weights and the round's spec (to train, or to evaluate),
    the server's control variate when there is one, and, with `evaluate_first`, the spec
    under which the node scores these weights before it trains on them (the previous
    round's evaluation riding with this round's train message)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    content = {"arrays": ArrayRecord.from_torch_state_dict(weights),
               "spec": ConfigRecord(to_values(spec))}
    if control:
        content["control"] = ArrayRecord.from_torch_state_dict(control)
    if evaluate_first is not None:
        content["evaluate-first"] = ConfigRecord(to_values(evaluate_first))
    return RecordDict(content)


def decode_evaluate_first(content) -> RoundSpec | None:
    """The spec to score the train message's weights under first, when it asks for that."""
    if "evaluate-first" not in content:
        return None
    return from_values(RoundSpec, dict(content["evaluate-first"]))


def decode_train(content) -> tuple[Weights, RoundSpec, Weights]:
    control = content["control"].to_torch_state_dict() if "control" in content else {}
    return (content["arrays"].to_torch_state_dict(),
            from_values(RoundSpec, dict(content["spec"])), control)


def encode_reply(reply: ClientReply, evaluation: Evaluation | None = None):
    """Node -> server: the reply, with the update's weights and metrics when it trained,
    and the evaluation the message asked for first, if it did."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    content = {"reply": ConfigRecord(to_values(reply))}
    if evaluation is not None:
        content["evaluation"] = ConfigRecord(to_values(evaluation))
    if reply.update is not None:
        content["arrays"] = ArrayRecord.from_torch_state_dict(reply.update.weights)
        if reply.update.control:
            content["control"] = ArrayRecord.from_torch_state_dict(reply.update.control)
        content["update"] = ConfigRecord({"examples": int(reply.update.examples),
                                          **{k: float(v) for k, v in reply.update.metrics.items()}})
    return RecordDict(content)


def decode_reply(content) -> ClientReply:
    update = None
    if "arrays" in content:
        values = dict(content["update"])
        examples = int(values.pop("examples"))
        update = Update(weights=content["arrays"].to_torch_state_dict(), examples=examples,
                        metrics={k: float(v) for k, v in values.items()},
                        control=(content["control"].to_torch_state_dict()
                                 if "control" in content else {}))
    return from_values(ClientReply, dict(content["reply"]), update=update)


def encode_evaluation(evaluation: Evaluation):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"evaluation": ConfigRecord(to_values(evaluation))})


def decode_evaluation(content) -> Evaluation:
    return from_values(Evaluation, dict(content["evaluation"]))
