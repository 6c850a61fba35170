"""Strategies as objects: the registry, FedMedian and FedTrimmedAvg against hand values and
scipy, their refusal under secure aggregation, and a round on the embedded engine that
equals the hand aggregation of its own updates."""

import pytest
import torch
from conftest import TINY
from scipy.stats import trim_mean
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.errors import FedctError
from fedct.federated import simulation, strategies
from fedct.federated.protocol import Update
from fedct.federated.setup import prepare_setup
from fedct.federated.strategies.base import Strategy
from fedct.runs import read_checkpoint


def config(**extra):
    return build_config(FederateConfig, None, {**TINY, **extra})


def updates(*rows, examples=None, n=None):
    return [Update({"w": torch.tensor(row), **({"n": torch.tensor(n[i])} if n else {})},
                   (examples or [1] * len(rows))[i], {}) for i, row in enumerate(rows)]


def test_the_registry_finds_every_strategy_class_and_feeds_the_choices():
    found, pending = {}, list(Strategy.__subclasses__())
    for name in strategies.names():  # importing each makes every subclass known
        strategies.get(name)
    pending = list(Strategy.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__dict__.get("name"):
            found[cls.name] = cls
    assert set(found) == set(strategies.names())
    assert strategies.names()[:6] == ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi",
                                      "scaffold")
    assert {"fedmedian", "fedtrimmedavg"} <= set(strategies.names())
    for name, cls in found.items():
        assert type(strategies.get(name)) is cls and cls.summary
    with pytest.raises(FedctError, match="strategy 'krum': choose from fedavg, fedprox"):
        config(strategy="krum")


def test_fedmedian_by_hand_ignores_examples_and_a_wild_client():
    g = {"w": torch.zeros(2), "n": torch.tensor(0)}
    three = updates([1.0, 2.0], [4.0, 8.0], [1e6, -1e6], examples=[1, 1, 1000], n=[3, 9, 5])
    new, state = strategies.aggregate(g, three, config=config(strategy="fedmedian"))
    assert new["w"].tolist() == [4.0, 2.0]  # the wild client with 1000 examples moves nothing
    assert int(new["n"]) == 9 and state == {}  # integer buffers take the maximum
    four = updates([1.0], [2.0], [10.0], [3.0])
    even, _ = strategies.aggregate({"w": torch.zeros(1)}, four, config=config(strategy="fedmedian"))
    assert even["w"].item() == 2.5  # numpy's median: the mean of the two middle values


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.25, 0.4])
def test_fedtrimmedavg_equals_scipys_trim_mean(beta):
    rows = [[1.0, -3.0], [2.0, 50.0], [3.0, 0.5], [4.0, 0.25], [100.0, -7.0]]
    new, _ = strategies.aggregate({"w": torch.zeros(2)}, updates(*rows, examples=[5, 1, 1, 1, 9]),
                                  config=config(strategy="fedtrimmedavg", trim_beta=beta))
    expected = trim_mean(torch.tensor(rows).double().numpy(), beta, axis=0)
    assert new["w"].double().numpy() == pytest.approx(expected, rel=1e-6)
    if beta == 0.2:  # cut one value from each end of five: mean of 2, 3, 4
        assert new["w"][0].item() == 3.0


def test_robust_strategies_refuse_secure_aggregation_and_a_bad_beta(tmp_path, split_dir):
    for name in ("fedmedian", "fedtrimmedavg"):
        with pytest.raises(FedctError) as caught:
            config(strategy=name, secure_aggregation=True)
        assert str(caught.value).startswith(f"strategy {name}: needs each client's update")
        assert "choose fedavg, fedprox, fedavgm, fedadam, fedyogi, scaffold" in str(caught.value)
    with pytest.raises(FedctError, match=r"trim_beta 0.5: must be in \[0, 0.5\)"):
        config(strategy="fedtrimmedavg", trim_beta=0.5)
    result = CliRunner().invoke(app, ["federate", str(split_dir), "--init", "none", "--out",
                                      str(tmp_path / "run"), "--engine", "flower",
                                      "--strategy", "fedmedian", "--secure-aggregation",
                                      "--dry-run"])
    assert result.exit_code == 2 and "needs each client's update" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "fedavgm"])
def test_an_embedded_round_equals_the_strategy_on_its_own_updates(name, split_dir, tmp_path,
                                                                  monkeypatch):
    """The run driver hands the strategy exactly the round's updates: the first round's
    global weights equal the strategy applied by hand to the updates the clients sent."""
    seen = []
    real = simulation.run_client_round

    def spy(model, global_weights, *args, **kwargs):
        seen.append({k: v.clone() for k, v in global_weights.items()})
        reply, state = real(model, global_weights, *args, **kwargs)
        seen.append(reply.update)
        return reply, state

    monkeypatch.setattr(simulation, "run_client_round", spy)
    cfg = config(strategy=name, rounds=1, trim_beta=0.0 if name == "fedtrimmedavg" else 0.2)
    simulation.run_federate(split_dir, tmp_path / "run", cfg, init="none", quiet=True)
    start, sent = seen[0], seen[1::2]
    assert len(sent) == 2 and all(torch.equal(seen[2][k], start[k]) for k in start)
    trained = {n for n, p in prepare_setup(cfg, init="none", split_dir=split_dir)
               .model.named_parameters() if p.requires_grad}
    expected, _ = strategies.aggregate(start, sent, config=cfg, trainable=trained)
    final, meta = read_checkpoint(tmp_path / "run" / "final")
    assert meta["round"] == 1
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
