"""Label skew: SCAFFOLD's control variates and the clients' prior-correcting local losses."""

import csv

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.errors import FedctError
from fedct.federated import simulation
from fedct.federated.local_loss import LocalLoss
from fedct.federated.protocol import Update
from fedct.federated.strategies import scaffold
from fedct.federated.strategies.base import RunningAverage, check_update
from fedct.runs import load_resume, read_checkpoint


@pytest.fixture(scope="module")
def skewed_split(synth_dir, tmp_path_factory):
    """Four clients holding one class each: the worst label skew there is."""
    out = tmp_path_factory.mktemp("skew") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="shards", clients=4, seed=0,
                                                          classes_per_client=1))
    return out


def run(split_dir, out, **extra):
    config = build_config(FederateConfig, None, {**TINY, **extra})
    return simulation.run_federate(split_dir, out, config, init="none", quiet=True)


# ------------------------------------------------------------------ local losses


def test_local_losses_shift_or_scale_the_logits_by_the_clients_own_counts():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 3), torch.tensor([1, 2, 1, 1, 2, 1, 2, 1])
    counts = torch.tensor([0, 30, 10])  # class 0 absent: counted as one example
    held = torch.tensor([1.0, 30.0, 10.0])

    def loss(kind, **kw):
        return LocalLoss(kind, counts, **kw)(logits, labels)

    assert loss("ce", label_smoothing=0.1) == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert loss("balanced-softmax") == pytest.approx(
        F.cross_entropy(logits + torch.log(held / held.sum()), labels).item())
    assert loss("fedlc", fedlc_tau=0.7) == pytest.approx(
        F.cross_entropy(logits - 0.7 * held ** -0.25, labels).item())
    assert loss("fedrs", fedrs_alpha=0.3) == pytest.approx(
        F.cross_entropy(logits * torch.tensor([0.3, 1.0, 1.0]), labels).item())
    weight = torch.tensor([1.0, 2.0, 0.5])
    assert loss("balanced-softmax", weight=weight) == pytest.approx(
        F.cross_entropy(logits + torch.log(held / held.sum()), labels, weight=weight).item())


def test_a_one_class_client_still_learns_under_every_local_loss():
    logits = torch.zeros(4, 2, requires_grad=True)
    labels = torch.ones(4, dtype=torch.long)
    for kind in ("balanced-softmax", "fedlc", "fedrs"):
        value = LocalLoss(kind, torch.tensor([0, 4]))(logits, labels)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and value > 0 and grad.abs().sum() > 0, kind


def test_balanced_softmax_moves_less_towards_the_clients_own_majority():
    """The prior-adjusted loss is smaller when the logits already say 'majority class':
    so a skewed client pushes the shared head less towards its own mix."""
    logits = torch.tensor([[0.0, 1.0]] * 4, requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0])
    counts = torch.tensor([1, 3])
    plain = LocalLoss("ce", counts)(logits, labels)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    adjusted = LocalLoss("balanced-softmax", counts)(logits, labels)
    (adjusted_grad,) = torch.autograd.grad(adjusted, logits)
    # the gradient on the majority logit: CE still pushes it up, balanced softmax pulls it down
    assert plain_grad[:, 1].sum() < 0 < adjusted_grad[:, 1].sum()


# ------------------------------------------------------------------ SCAFFOLD by hand


def test_the_correction_equals_the_corrected_gradient_for_plain_sgd():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    c = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    c_i = {"weight": torch.randn(2, 3), "bias": torch.zeros(2)}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = scaffold.attach_correction(model, optimizer, c, c_i)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    handle.remove()
    for name, param in model.named_parameters():  # y = x - lr (g - c_i + c)
        expected = start[name] - 0.1 * (grads[name] - c_i[name] + c[name])
        assert torch.allclose(param.detach(), expected, atol=1e-6)


def test_option_two_control_updates_and_the_server_sum():
    x = {"w": torch.tensor([1.0, 2.0])}
    y = {"w": torch.tensor([0.4, 2.6])}
    c, c_i = {"w": torch.tensor([0.1, -0.1])}, {"w": torch.tensor([0.5, 0.0])}
    new, delta = scaffold.client_control_update(x, y, c, c_i, steps=3, lrs={"w": 0.1})
    # c_i+ = c_i - c + (x - y) / (K lr)
    assert torch.allclose(new["w"], torch.tensor([0.5 - 0.1 + 2.0, 0.0 + 0.1 - 2.0]))
    assert torch.allclose(delta["w"], new["w"] - c_i["w"])
    same, none = scaffold.client_control_update(x, y, c, c_i, steps=0, lrs={"w": 0.1})
    assert torch.equal(same["w"], c_i["w"]) and not none["w"].any()
    running = RunningAverage({"w": torch.zeros(2)})
    running.add(Update({"w": y["w"]}, 3, {}, control={"w": torch.tensor([1.0, 2.0])}))
    running.add(Update({"w": y["w"]}, 3, {}, control={"w": torch.tensor([3.0, -2.0])}))

    def server(run):
        return scaffold.server_control(c, run.control_sum, examples=run.examples,
                                       updates=run.count, num_clients=4)["w"]

    # equal sizes: the paper's c + (1/N) * sum over the round's clients, N the federation's 4
    assert torch.allclose(server(running), torch.tensor([0.1 + 1.0, -0.1 + 0.0]))
    running.add(Update({"w": y["w"]}, 6, {}, control={"w": torch.tensor([0.0, 4.0])}))
    # sizes 3, 3, 6: c + (3/4) * examples-weighted mean of the changes
    assert torch.allclose(server(running), torch.tensor([0.1 + 0.75 * 1.0, -0.1 + 0.75 * 2.0]))


def test_updates_without_a_sound_control_variate_are_rejected():
    reference, control = {"w": torch.zeros(2)}, {"w": torch.zeros(2)}
    good = Update({"w": torch.ones(2)}, 1, {}, control={"w": torch.ones(2)})
    assert check_update(good, reference, control) is None
    assert "control keys" in check_update(Update({"w": torch.ones(2)}, 1, {}), reference, control)
    bad = Update({"w": torch.ones(2)}, 1, {}, control={"w": torch.tensor([1.0, float("inf")])})
    assert "control w has NaN" in check_update(bad, reference, control)


# ------------------------------------------------------------------ end to end


def test_scaffold_with_fedbn_and_a_local_loss_resumes_bit_identically(skewed_split, tmp_path):
    settings = {"rounds": 3, "strategy": "scaffold", "local_loss": "fedlc", "fedbn": True}
    run(skewed_split, tmp_path / "full", **settings)
    config = build_config(FederateConfig, None, {**TINY, **settings})
    simulation.run_federate(skewed_split, tmp_path / "cut", config, init="none", quiet=True,
                            stop_after=2)
    saved = load_resume(tmp_path / "cut")
    control = saved["server_state"]["control"]
    client = saved["extra"]["client_states"][0]["control"]
    assert control.keys() == client.keys() and any(v.abs().sum() > 0 for v in control.values())
    assert not any("bn" in k for k in control)  # FedBN's local norms are not corrected
    simulation.run_federate(skewed_split, tmp_path / "cut", config, init="none", quiet=True,
                            resume=True)
    full, _ = read_checkpoint(tmp_path / "full" / "final")
    resumed, _ = read_checkpoint(tmp_path / "cut" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    plain = run(skewed_split, tmp_path / "fedavg", rounds=3, fedbn=True)
    assert plain["final"]["val_loss"] != pytest.approx(
        read_checkpoint(tmp_path / "full" / "final")[1]["metrics"]["val_loss"])


def test_scaffold_under_dp_spends_exactly_the_epsilon_of_fedavg(skewed_split, tmp_path):
    """The correction acts after Opacus has noised the step: post-processing, same epsilon."""
    dp = {"dp": True, "dp_train": "head", "target_epsilon": 4.0, "rounds": 2}
    plain = run(skewed_split, tmp_path / "fedavg", **dp)
    corrected = run(skewed_split, tmp_path / "scaffold", strategy="scaffold",
                    local_loss="balanced-softmax", **dp)
    assert corrected["epsilon"] == plain["epsilon"] and 0 < corrected["max_epsilon"] <= 4.0

    def rows(name):
        with (tmp_path / name / "privacy.csv").open() as handle:
            return [(r["round"], r["client"], r["epsilon"], r["noise_multiplier"])
                    for r in csv.DictReader(handle)]

    assert rows("scaffold") == rows("fedavg")
    a, _ = read_checkpoint(tmp_path / "fedavg" / "final")
    b, _ = read_checkpoint(tmp_path / "scaffold" / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_cli_takes_the_strategy_and_the_local_loss(skewed_split, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["federate", str(skewed_split), "--init", "none", "--model",
                                 "test_efficientnet", "--image-size", "32", "--rounds", "1",
                                 "--local-steps", "1", "--strategy", "scaffold", "--local-loss",
                                 "fedrs", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "strategy: scaffold" in text and "local_loss: fedrs" in text
    bad = runner.invoke(app, ["federate", str(skewed_split), "--local-loss", "focal"])
    assert bad.exit_code == 2 and "focal" in bad.output
    with pytest.raises(FedctError, match="fedrs_alpha"):
        build_config(FederateConfig, None, {"fedrs_alpha": 0})
