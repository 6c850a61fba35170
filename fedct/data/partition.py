"""Train/val/test splits and client partitions, both stratified by label and group-aware.

The unit everywhere is a group (a patient): all images of one group go to the same split
and the same client. Every function takes an explicit seed and is deterministic for it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from fedct.data.sources import Row
from fedct.errors import FedctError

SCHEMES = ("iid", "dirichlet", "shards", "quantity", "natural")
SPLITS = ("train", "val", "test")
MAX_DRAWS = 1000


@dataclass(frozen=True)
class Unit:
    """A group of row indices that must stay together, labelled by its majority class."""

    rows: tuple[int, ...]
    label: str


def make_units(rows: list[Row], indices: list[int] | None = None) -> list[Unit]:
    members: dict[str, list[int]] = defaultdict(list)
    for i in indices if indices is not None else range(len(rows)):
        members[rows[i].group].append(i)
    units = []
    for group in sorted(members):
        labels = Counter(rows[i].label for i in members[group])
        label = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        units.append(Unit(rows=tuple(members[group]), label=label))
    return units


def assign_fold(rows: list[Row], splits: list[str], folds: int, fold: int,
                seed: int) -> list[str]:
    """Cross-validation: the train and val rows pooled, cut into `folds` folds stratified by
    label with no group in two folds (scikit-learn's StratifiedGroupKFold), fold `fold`
    (0-based) as val and the rest as train; test rows stay test."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2 or not 0 <= fold < folds:
        raise FedctError(f"--folds {folds} --fold {fold}: need at least 2 folds and a fold "
                         f"from 0 to {folds - 1}")
    pool = [i for i, s in enumerate(splits) if s in ("train", "val")]
    groups = [rows[i].group for i in pool]
    if len(set(groups)) < folds:
        raise FedctError(f"--folds {folds}: only {len(set(groups))} groups (patients) in the "
                         "train and val rows")
    cutter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [rows[i].label for i in pool]
    held = list(cutter.split(np.zeros(len(pool)), labels, groups))[fold][1]
    out = ["train" if s in ("train", "val") else s for s in splits]
    for j in held:
        out[pool[j]] = "val"
    return out


def assign_splits(
    rows: list[Row], fractions: tuple[float, float, float], seed: int
) -> list[str]:
    """Stratified, group-aware train/val/test: each group goes where the largest deficit is."""
    if len(fractions) != 3 or not all(f >= 0 for f in fractions) or not abs(sum(fractions) - 1) <= 1e-6:
        raise FedctError(f"--fractions {fractions}: need three non-negative numbers summing to 1")
    rng = np.random.default_rng(seed)
    out = [""] * len(rows)
    by_label: dict[str, list[Unit]] = defaultdict(list)
    for unit in make_units(rows):
        by_label[unit.label].append(unit)
    for label in sorted(by_label):
        units = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        total = sum(len(u.rows) for u in units)
        filled = np.zeros(3)
        for unit in units:
            deficit = np.asarray(fractions) * total - filled
            deficit[np.asarray(fractions) == 0] = -np.inf
            target = int(np.argmax(deficit))
            filled[target] += len(unit.rows)
            for i in unit.rows:
                out[i] = SPLITS[target]
    return out


def assign_clients(
    rows: list[Row],
    indices: list[int],
    *,
    scheme: str,
    clients: int | None,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    by: str = "site",
    min_per_client: int = 1,
) -> tuple[dict[int, int], int]:
    """Partition the rows at `indices` over clients; returns row index -> client, and the count."""
    if scheme not in SCHEMES:
        raise FedctError(f"--scheme {scheme!r}: unknown (choose from {', '.join(SCHEMES)})")
    if min_per_client < 0:
        raise FedctError(f"--min-per-client {min_per_client}: must be >= 0")
    units = make_units(rows, indices)
    if scheme == "natural":
        return _natural(rows, units, by, clients, min_per_client)
    if clients is None or clients < 1:
        raise FedctError(f"--clients {clients}: need at least 1 client")
    if clients > len(units):
        raise FedctError(
            f"--clients {clients}: only {len(units)} groups (patients) in the training rows"
        )
    if scheme in ("dirichlet", "quantity") and not alpha > 0:
        raise FedctError(f"--alpha {alpha}: must be > 0")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        if scheme == "iid":
            owner = _iid(units, clients, rng)
        elif scheme == "dirichlet":
            owner = _dirichlet(units, clients, alpha, rng)
        elif scheme == "quantity":
            owner = _quantity(units, clients, alpha, rng)
        else:
            owner = _shards(units, clients, classes_per_client, rng)
        sizes = _sizes(units, owner, clients)
        if min(sizes) >= min_per_client:
            return _expand(units, owner), clients
        if scheme in ("iid", "shards"):
            break  # deterministic balancing: another draw cannot help
    raise FedctError(
        f"--scheme {scheme} with {clients} clients cannot give every client "
        f"--min-per-client {min_per_client} images ({sum(len(u.rows) for u in units)} training "
        f"images in {len(units)} groups; smallest client got {min(sizes)}): "
        "use fewer clients, a lower minimum" + (", or a larger --alpha" if scheme in ("dirichlet", "quantity") else "")
    )


def _sizes(units: list[Unit], owner: list[int], clients: int) -> list[int]:
    sizes = [0] * clients
    for unit, k in zip(units, owner, strict=True):
        sizes[k] += len(unit.rows)
    return sizes


def _expand(units: list[Unit], owner: list[int]) -> dict[int, int]:
    return {i: k for unit, k in zip(units, owner, strict=True) for i in unit.rows}


def _by_label(units: list[Unit], rng: np.random.Generator) -> dict[str, list[int]]:
    """Unit positions per label, each list shuffled."""
    groups: dict[str, list[int]] = defaultdict(list)
    for pos, unit in enumerate(units):
        groups[unit.label].append(pos)
    return {label: [groups[label][i] for i in rng.permutation(len(groups[label]))]
            for label in sorted(groups)}


def _balance(units: list[Unit], positions: list[int], holders: list[int], owner: list[int],
             load: np.ndarray, tiebreak: np.ndarray) -> None:
    """Give each unit to the holder with the fewest images of this label, then fewest overall."""
    label_load = dict.fromkeys(holders, 0)
    for pos in positions:
        k = min(holders, key=lambda h: (label_load[h], load[h], tiebreak[h]))
        owner[pos] = k
        label_load[k] += len(units[pos].rows)
        load[k] += len(units[pos].rows)


def _iid(units: list[Unit], clients: int, rng: np.random.Generator) -> list[int]:
    owner = [0] * len(units)
    load = np.zeros(clients)
    tiebreak = rng.permutation(clients)
    for positions in _by_label(units, rng).values():
        _balance(units, positions, list(range(clients)), owner, load, tiebreak)
    return owner


def _dirichlet(units: list[Unit], clients: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """Label skew: each class is spread over clients by proportions drawn from Dir(alpha)."""
    owner = [0] * len(units)
    for positions in _by_label(units, rng).values():
        owner_of = _cut(units, positions, rng.dirichlet(np.full(clients, alpha)))
        for pos, k in zip(positions, owner_of, strict=True):
            owner[pos] = k
    return owner


def _quantity(units: list[Unit], clients: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """Size skew: client shares from Dir(alpha), labels interleaved so each client stays mixed."""
    per_label = _by_label(units, rng)
    total = len(units)
    keyed = []
    for positions in per_label.values():
        for rank, pos in enumerate(positions):
            keyed.append(((rank + 0.5) / len(positions) + rng.uniform(0, 1e-9), pos))
    order = [pos for _, pos in sorted(keyed)]
    assert len(order) == total
    owner = [0] * len(units)
    for pos, k in zip(order, _cut(units, order, rng.dirichlet(np.full(clients, alpha))), strict=True):
        owner[pos] = k
    return owner


def _cut(units: list[Unit], positions: list[int], shares: np.ndarray) -> list[int]:
    """Walk the units in order and give each to the client whose share covers its midpoint."""
    sizes = np.array([len(units[p].rows) for p in positions], dtype=float)
    midpoints = (np.cumsum(sizes) - sizes / 2) / max(sizes.sum(), 1)
    bounds = np.cumsum(shares)
    return [int(min(np.searchsorted(bounds, m, side="right"), len(shares) - 1)) for m in midpoints]


def _shards(units: list[Unit], clients: int, per_client: int, rng: np.random.Generator) -> list[int]:
    """Pathological skew: each client holds only `per_client` classes."""
    per_label = _by_label(units, rng)
    labels = list(per_label)
    if not 1 <= per_client <= len(labels):
        raise FedctError(
            f"--classes-per-client {per_client}: must be between 1 and {len(labels)} classes"
        )
    if clients * per_client < len(labels):
        raise FedctError(
            f"--classes-per-client {per_client} with {clients} clients leaves classes unassigned "
            f"({len(labels)} classes)"
        )
    start = int(rng.integers(len(labels)))
    holders: dict[str, list[int]] = defaultdict(list)
    for k in range(clients):
        for j in range(per_client):
            holders[labels[(start + k * per_client + j) % len(labels)]].append(k)
    owner = [0] * len(units)
    load = np.zeros(clients)
    tiebreak = rng.permutation(clients)
    for label, positions in per_label.items():
        if not holders[label]:
            raise FedctError(f"--scheme shards: class {label!r} was given to no client")
        _balance(units, positions, holders[label], owner, load, tiebreak)
    return owner


def _natural(rows: list[Row], units: list[Unit], by: str, clients: int | None,
             min_per_client: int) -> tuple[dict[int, int], int]:
    if by not in ("site", "group"):
        raise FedctError(f"--by {by!r}: choose 'site' or 'group'")
    values: dict[int, str] = {}
    for unit in units:
        seen = {getattr(rows[i], by) for i in unit.rows}
        if "" in seen:
            raise FedctError(f"--scheme natural --by {by}: row {rows[unit.rows[0]].path} has no {by}")
        if len(seen) > 1:
            raise FedctError(f"--scheme natural --by {by}: group {rows[unit.rows[0]].group!r} "
                             f"spans several {by} values")
        values[id(unit)] = seen.pop()
    names = sorted(set(values.values()))
    if clients is not None and clients != len(names):
        raise FedctError(
            f"--clients {clients}: --scheme natural --by {by} gives {len(names)} clients "
            f"({', '.join(names)})"
        )
    index = {name: k for k, name in enumerate(names)}
    owner = [index[values[id(u)]] for u in units]
    sizes = _sizes(units, owner, len(names))
    if min(sizes) < min_per_client:
        small = names[int(np.argmin(sizes))]
        raise FedctError(f"--min-per-client {min_per_client}: {by} {small!r} has {min(sizes)} images")
    return _expand(units, owner), len(names)


def carve_local_val(rows: list[Row], client_of: dict[int, int], fraction: float,
                    seed: int) -> set[int]:
    """Move a stratified, group-aware share of each client's rows into its local validation set."""
    if not 0 <= fraction < 1:
        raise FedctError(f"--local-val {fraction}: must be in [0, 1)")
    if fraction == 0:
        return set()
    members: dict[int, list[int]] = defaultdict(list)
    for i, k in client_of.items():
        members[k].append(i)
    held = set()
    for k in sorted(members):
        units = make_units(rows, sorted(members[k]))
        if len(units) < 2:
            continue
        assigned = assign_splits([rows[i] for u in units for i in u.rows],
                                 (1 - fraction, fraction, 0.0), seed + k)
        flat = [i for u in units for i in u.rows]
        held.update(i for i, s in zip(flat, assigned, strict=True) if s == "val")
    return held


def label_distribution(labels: list[str], classes: list[str]) -> np.ndarray:
    counts = Counter(labels)
    vec = np.array([counts.get(c, 0) for c in classes], dtype=float)
    return vec / vec.sum() if vec.sum() else vec


def heterogeneity(client_labels: list[list[str]], classes: list[str]) -> float:
    """Mean total-variation distance between each client's label distribution and the pool's."""
    pooled = label_distribution([label for labels in client_labels for label in labels], classes)
    distances = [0.5 * np.abs(label_distribution(labels, classes) - pooled).sum()
                 for labels in client_labels]
    return float(np.mean(distances)) if distances else 0.0
