from collections import Counter, defaultdict

import numpy as np
import pytest

from fedct.data import partition
from fedct.data.manifest import SplitOptions, make_split
from fedct.data.sources import Dataset, Row
from fedct.errors import FedctError


def make_rows(patients=120, per_patient=3, classes=("neg", "pos"), sites=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = classes[p % len(classes)]
        for s in range(int(rng.integers(1, per_patient + 1))):
            rows.append(Row(path=f"{label}/p{p}_{s}.png", label=label, group=f"p{p}",
                            site=f"s{p % sites}"))
    return rows


def dataset(rows, classes=("neg", "pos")):
    return Dataset(root=None, source=None, rows=rows, classes=list(classes))


def check_invariants(rows, entries, clients):
    assert len(entries) == len(rows)
    split_of_group, client_of_group = defaultdict(set), defaultdict(set)
    for e in entries:
        split_of_group[e.row.group].add(e.split)
        if e.split == "train":
            assert e.client is not None and 0 <= e.client < clients
            client_of_group[e.row.group].add(e.client)
        elif e.split != "local_val":
            assert e.client is None
    assert all(len(s) == 1 for s in split_of_group.values()), "a group straddles two splits"
    assert all(len(c) == 1 for c in client_of_group.values()), "a group straddles two clients"
    assert len({e.row.path for e in entries}) == len(entries)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity", "natural"])
def test_every_scheme_keeps_groups_and_sizes(scheme):
    rows = make_rows()
    options = SplitOptions(scheme=scheme, clients=None if scheme == "natural" else 4, seed=3,
                           classes_per_client=1, alpha=1.0)
    entries, clients = make_split(dataset(rows), options)
    assert clients == 4
    check_invariants(rows, entries, clients)
    counts = Counter(e.split for e in entries)
    assert sum(counts.values()) == len(rows)
    assert abs(counts["train"] / len(rows) - 0.7) < 0.05
    assert sum(1 for e in entries if e.client is not None) == counts["train"]
    again, _ = make_split(dataset(rows), options)
    assert again == entries, "same seed must give the same manifest"


def test_different_seed_gives_different_split():
    rows = make_rows()
    a, _ = make_split(dataset(rows), SplitOptions(scheme="iid", clients=4, seed=1))
    b, _ = make_split(dataset(rows), SplitOptions(scheme="iid", clients=4, seed=2))
    assert a != b


def test_iid_is_balanced_and_shards_are_pathological():
    rows = make_rows(patients=200)
    entries, _ = make_split(dataset(rows), SplitOptions(scheme="iid", clients=4, seed=0))
    train = [e for e in entries if e.split == "train"]
    sizes = Counter(e.client for e in train)
    assert max(sizes.values()) - min(sizes.values()) <= 6
    shards, _ = make_split(dataset(rows), SplitOptions(scheme="shards", clients=4, seed=0,
                                                         classes_per_client=1))
    for k in range(4):
        assert len({e.row.label for e in shards if e.client == k}) == 1


def tv_of(entries, clients, classes=("neg", "pos")):
    labels = [[e.row.label for e in entries if e.client == k] for k in range(clients)]
    return partition.heterogeneity(labels, list(classes))


def test_large_alpha_is_close_to_iid_and_small_alpha_is_skewed():
    rows = make_rows(patients=400)
    large = np.mean([tv_of(make_split(dataset(rows), SplitOptions(
        scheme="dirichlet", alpha=1000.0, clients=5, seed=s))[0], 5) for s in range(3)])
    small = np.mean([tv_of(make_split(dataset(rows), SplitOptions(
        scheme="dirichlet", alpha=0.1, clients=5, seed=s, min_per_client=1))[0], 5)
        for s in range(3)])
    assert large < 0.05
    assert small > 0.25


def test_quantity_skews_sizes_not_labels():
    rows = make_rows(patients=400)
    entries, _ = make_split(dataset(rows), SplitOptions(scheme="quantity", alpha=0.3,
                                                        clients=5, seed=0))
    sizes = sorted(Counter(e.client for e in entries if e.split == "train").values())
    assert sizes[-1] > 2 * sizes[0]
    assert tv_of(entries, 5) < 0.15


def test_min_per_client_is_guaranteed_or_explained():
    rows = make_rows(patients=100)
    entries, _ = make_split(dataset(rows), SplitOptions(scheme="dirichlet", alpha=0.3,
                                                        clients=5, min_per_client=10, seed=0))
    assert min(Counter(e.client for e in entries if e.split == "train").values()) >= 10
    with pytest.raises(FedctError, match="min-per-client"):
        make_split(dataset(rows), SplitOptions(scheme="iid", clients=5, min_per_client=1000))


def test_local_val_is_carved_from_each_client():
    rows = make_rows(patients=200)
    entries, _ = make_split(dataset(rows), SplitOptions(scheme="iid", clients=4, local_val=0.2,
                                                        seed=0))
    check_invariants(rows, entries, 4)
    for k in range(4):
        local = sum(1 for e in entries if e.client == k and e.split == "local_val")
        train = sum(1 for e in entries if e.client == k and e.split == "train")
        assert 0.1 < local / (local + train) < 0.3


@pytest.mark.parametrize("options, message", [
    (SplitOptions(scheme="bogus"), "unknown"),
    (SplitOptions(scheme="dirichlet", alpha=0.0), "alpha"),
    (SplitOptions(scheme="dirichlet", alpha=-1.0), "alpha"),
    (SplitOptions(clients=10_000), "groups"),
    (SplitOptions(scheme="shards", classes_per_client=3), "classes-per-client"),
    (SplitOptions(scheme="natural", clients=3), "gives 4 clients"),
    (SplitOptions(fractions=(0.5, 0.2, 0.2)), "fractions"),
    (SplitOptions(fractions=(float("nan"), 0.5, 0.5)), "fractions"),
    (SplitOptions(min_per_client=-1), "min-per-client"),
    (SplitOptions(folds=5, fold=5), "a fold from 0 to 4"),
    (SplitOptions(folds=1), "at least 2 folds"),
    (SplitOptions(fold=2), "give --folds K too"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(FedctError, match=message):
        make_split(dataset(make_rows()), options)


def test_empty_class_and_keep_split_errors():
    rows = make_rows()
    with pytest.raises(FedctError, match="no images"):
        make_split(dataset(rows, classes=("neg", "pos", "other")), SplitOptions())
    with pytest.raises(FedctError, match="split value ''"):
        make_split(dataset(rows), SplitOptions(keep_split=True))


def test_cross_validation_folds_cover_train_and_val_once_and_keep_patients_whole():
    rows = make_rows(patients=100)
    folds = [make_split(dataset(rows), SplitOptions(folds=4, fold=i, clients=2, seed=3))[0]
             for i in range(4)]
    tests = [{e.row.path for e in entries if e.split == "test"} for entries in folds]
    assert all(t == tests[0] for t in tests) and tests[0]  # test rows stay where they were
    vals = [{e.row.path for e in entries if e.split == "val"} for entries in folds]
    pooled = {e.row.path for e in folds[0] if e.split != "test"}
    assert set().union(*vals) == pooled and sum(map(len, vals)) == len(pooled)
    for entries, val in zip(folds, vals, strict=True):
        check_invariants(rows, entries, 2)
        val_groups = {e.row.group for e in entries if e.split == "val"}
        assert not val_groups & {e.row.group for e in entries if e.split == "train"}
        positives = sum(e.row.label == "pos" for e in entries if e.split == "val") / len(val)
        assert 0.3 < positives < 0.7  # stratified: about the pooled share (one half)
