"""A node's client state between rounds (privacy accountant, FedBN layers, SCAFFOLD control),
kept where a resumed run finds it.

The files live in the node's `state-dir`, named by the run's key, which the coordinator
keeps with its resume state: a resumed run is a new Flower run with a new run id, and finds
them under the same key. There is one file per round the node trained, the last `KEEP`
kept. A message of round r reads the state as it was after the node's latest round before
r (its evaluation of round r's weights, as it was after round r): when the coordinator
resumes from a round it had recorded, the node replays the rounds after it from where they
started, not from rounds the coordinator never recorded. Privacy state is the exception:
the accountant, epsilon, noise multiplier and step count are always the newest, since every
update a node sent counts against its budget, recorded by the coordinator or not.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedct.data.loading import cache_dir
from fedct.federated.client import new_client_state
from fedct.files import atomic_write, save_tensors

PRIVACY_KEYS = ("accountant", "epsilon", "noise", "steps")
KEEP = 3  # a node is at most two rounds ahead of what the coordinator recorded


def state_dir(node_config: dict) -> Path:
    return Path(str(node_config.get("state-dir", cache_dir() / "nodes")))


def state_files(node_config: dict, run: str, client_id: int) -> dict[int, Path]:
    """{round: file} of this client's saved states in this run."""
    pattern = re.compile(rf"run-{re.escape(run)}-client-{client_id}-round-(\d+)\.pt")
    folder = state_dir(node_config)
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}


def load_state(node_config: dict, run: str, client_id: int, config, *,
               through_round: int) -> dict:
    """The client's state after its latest round up to `through_round`, with the newest
    privacy state; a new state when it has trained none in this run."""
    files = state_files(node_config, run, client_id)
    if not files:
        return new_client_state(config)
    newest = max(files)
    earlier = [r for r in files if r <= through_round]
    if earlier and max(earlier) == newest:
        return torch.load(files[newest], weights_only=True)
    base = torch.load(files[max(earlier)], weights_only=True) if earlier \
        else new_client_state(config)
    latest = torch.load(files[newest], weights_only=True)
    return {**base, **{k: latest[k] for k in PRIVACY_KEYS if k in latest}}


def save_state(node_config: dict, run: str, client_id: int, round_number: int,
               state: dict) -> None:
    """Save the state after `round_number`; drop states of later rounds (a replay replaces
    them: their privacy state is in this one) and all but the last `KEEP`."""
    folder = state_dir(node_config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{run}-client-{client_id}-round-{round_number}.pt"
    atomic_write(path, lambda p: save_tensors(state, p))
    files = state_files(node_config, run, client_id)
    kept = sorted(r for r in files if r <= round_number)[-KEEP:]
    for r, stale in files.items():
        if r not in kept:
            stale.unlink(missing_ok=True)
