"""Stage 2: strategies, sampling, FedProx, FedBN, DP accounting, resume, rejection, end to end."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.errors import FedctError
from fedct.federated import client as client_module
from fedct.federated import simulation
from fedct.federated.protocol import Update
from fedct.federated.run_model import model_spec
from fedct.federated.setup import prepare_setup, sample_schedule
from fedct.federated.strategies import aggregate
from fedct.federated.strategies.base import check_update, weighted_average
from fedct.runs import read_checkpoint
from fedct.training import round_lr

runner = CliRunner()


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsplit") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="iid", clients=3, seed=0,
                                                          local_val=0.2))
    return out


def config(**extra):
    return build_config(FederateConfig, None, {**TINY, **extra})


def run(split_dir, out, init="none", **extra):
    return simulation.run_federate(split_dir, out, config(**extra), init=init, quiet=True)


def test_fedavg_is_weighted_by_examples():
    g = {"w": torch.zeros(2), "n": torch.tensor(1)}
    a = Update({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, 1, {})
    b = Update({"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}, 3, {})
    new, _ = aggregate(g, [a, b], config=config(strategy="fedavg"))
    assert torch.allclose(new["w"], torch.tensor([3.25, 6.5]))
    assert int(new["n"]) == 5  # integer buffers take the maximum


def test_adaptive_strategies_by_hand():
    cfg = config(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001, server_momentum=0.9)
    g = {"w": torch.tensor([1.0])}
    ups = [Update({"w": torch.tensor([3.0])}, 1, {})]  # delta = +2
    new, state = aggregate(g, ups, config=replace(cfg, strategy="fedavgm"), server_state={})
    assert new["w"].item() == pytest.approx(1 + 0.1 * 2)
    new2, _ = aggregate(new, [Update({"w": new["w"] + 2}, 1, {})],
                        config=replace(cfg, strategy="fedavgm"), server_state=state)
    assert new2["w"].item() == pytest.approx(1.2 + 0.1 * (0.9 * 2 + 2))
    m = 0.1 * 2
    v = 0.99 * 0.001**2 + 0.01 * 4
    adam, _ = aggregate(g, ups, config=replace(cfg, strategy="fedadam"), server_state={})
    assert adam["w"].item() == pytest.approx(1 + 0.1 * m / (v**0.5 + 0.001), rel=1e-5)
    v_yogi = 0.001**2 - 0.01 * 4 * np.sign(0.001**2 - 4)
    yogi, _ = aggregate(g, ups, config=replace(cfg, strategy="fedyogi"), server_state={})
    assert yogi["w"].item() == pytest.approx(1 + 0.1 * m / (v_yogi**0.5 + 0.001), rel=1e-5)


def test_bad_updates_are_caught():
    ref = {"w": torch.zeros(2)}
    assert check_update(Update({"w": torch.tensor([1.0, float("nan")])}, 1, {}), ref)
    assert check_update(Update({"w": torch.zeros(3)}, 1, {}), ref)
    assert check_update(Update({"v": torch.zeros(2)}, 1, {}), ref)
    assert check_update(Update({"w": torch.zeros(2)}, 1, {}), ref) is None
    avg = weighted_average([Update({"w": torch.ones(2)}, 2, {})], ref)
    assert torch.equal(avg["w"], torch.ones(2))


def test_client_sampling_is_seeded():
    a = sample_schedule(10, config(rounds=5, fraction=0.3, seed=1))
    b = sample_schedule(10, config(rounds=5, fraction=0.3, seed=1))
    c = sample_schedule(10, config(rounds=5, fraction=0.3, seed=2))
    assert a == b and a != c and all(len(r) == 3 for r in a)


def test_end_to_end_writes_the_run_directory(split_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--model",
                                 "test_efficientnet", "--out", str(out), "--image-size", "32",
                                 "--batch-size", "16", "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rounds"] == 2 and report["final"]["round"] == 2
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["round", "clients", "train_loss", "val_loss"]
    assert [r["round"] for r in rows] == ["1", "2"] and rows[0]["clients"] == "3"
    assert int(rows[0]["fed_clients"]) == 3 and int(rows[0]["fed_examples"]) > 0
    _, meta = read_checkpoint(out / "final")
    assert meta["stage"] == "federate" and meta["round"] == 2
    assert meta["operating_point"]["threshold"] == 0.5
    scored = runner.invoke(app, ["evaluate", str(out / "final"), "--split", str(split_dir),
                                 "--on", "local_val", "--per-client", "--bootstrap", "0",
                                 "--json"])
    assert scored.exit_code == 0, scored.output
    results = {r["data"]: r["threshold_0.5"] for r in json.loads(scored.stdout)["results"]}
    # federated val scores the aggregated model of the round, not a client's own: pooled over
    # the clients it equals fedct evaluate on all their local val rows, and per client too
    pooled = results.pop("all")
    assert float(rows[1]["fed_acc"]) == pytest.approx(pooled["accuracy"], abs=1e-6)
    assert float(rows[1]["fed_sensitivity"]) == pytest.approx(pooled["sensitivity"], abs=1e-6)
    assert float(rows[1]["fed_specificity"]) == pytest.approx(pooled["specificity"], abs=1e-6)
    assert abs(float(rows[1]["fed_auc"]) - pooled["auc"]) <= float(rows[1]["fed_auc_bin_error"])
    with (out / "clients.csv").open() as handle:
        clients = [r for r in csv.DictReader(handle) if r["round"] == "2"]
    assert len(clients) == len(results) == 3
    for row in clients:
        own = results[f"client {row['client']}"]
        assert float(row["acc"]) == pytest.approx(own["accuracy"], abs=1e-6)


def test_live_view_on_a_terminal_and_lines_in_logs(split_dir, tmp_path):
    import io

    from rich.console import Console

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120)
    simulation.run_federate(split_dir, tmp_path / "live", config(rounds=2), init="none",
                            console=terminal)
    shown = screen.getvalue()
    assert "rounds (2/2 done)" in shown and "round 2 clients" in shown and "trained" in shown
    assert "round 1/2:" not in shown  # no log lines under the live table
    log = io.StringIO()
    simulation.run_federate(split_dir, tmp_path / "log", config(rounds=2), init="none",
                            console=Console(file=log, force_terminal=False, width=120))
    lines = [line for line in log.getvalue().splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert " at 0.5; at threshold " in lines[0]  # each figure says its threshold


def test_the_live_tables_fit_80_columns_with_dp():
    """Every cell whole at 80 columns: the widest row (DP, 4-digit seconds, 2-digit
    clients) and the caption saying which threshold each column is at."""
    import io

    from rich.console import Console

    from fedct.federated.view import RoundView

    screen = io.StringIO()
    view = RoundView(Console(file=screen, width=80), rounds=20, dp=True, federated=True)
    row = {"round": 12, "clients": 50, "train_loss": 0.6839, "fed_acc": 0.5, "fed_auc": 0.8751,
           "threshold": 0.4832, "thr_acc": 0.7917, "thr_sensitivity": 1.0,
           "thr_specificity": 0.5833, "max_epsilon": 17.95, "seconds": 1234.5}
    view.rows, view.best_round, view.current = [row], 12, 13
    view.clients = {49: {"status": "trained", "examples": 12000, "steps": 400, "loss": 0.5,
                         "epsilon": 17.9, "seconds": 3333.3}}
    view.console.print(view._render())
    text = screen.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "12 *" in text and "1234.5" in text and "17.95" in text and "acc@.5" in text
    assert "at the threshold thr chosen on it" in " ".join(text.split())


def test_resume_equals_uninterrupted(split_dir, tmp_path):
    run(split_dir, tmp_path / "full", rounds=3, strategy="fedadam", server_lr=0.01)
    cfg = config(rounds=3, strategy="fedadam", server_lr=0.01)
    simulation.run_federate(split_dir, tmp_path / "cut", cfg, init="none", quiet=True,
                            stop_after=2)
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    simulation.run_federate(split_dir, tmp_path / "cut", cfg, init="none", quiet=True,
                            resume=True)
    full, _ = read_checkpoint(tmp_path / "full" / "final")
    resumed, _ = read_checkpoint(tmp_path / "cut" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert len((tmp_path / "cut" / "summary.csv").read_text().splitlines()) == 4


def test_a_run_resumes_only_on_the_engine_that_holds_its_clients_state(split_dir, tmp_path):
    """The embedded engine keeps the clients' states (DP accountants) in resume.pt, Flower
    nodes in their state-dir: resuming on the other engine would start them afresh."""
    cfg = config(rounds=2)
    simulation.run_federate(split_dir, tmp_path / "cut", cfg, init="none", quiet=True,
                            stop_after=1)
    result = runner.invoke(app, ["federate", "--resume", str(tmp_path / "cut"), "--engine",
                                 "flower", "--federation", "hospitals"])
    assert result.exit_code == 2, result.output
    assert "the run started with engine embedded, not flower" in result.output
    saved = tmp_path / "cut" / "config.yaml"
    saved.write_text(saved.read_text().replace("engine: embedded", "engine: flower"))
    with pytest.raises(FedctError, match="the run started with engine flower, not embedded"):
        simulation.run_federate(split_dir, tmp_path / "cut", cfg, init="none", quiet=True,
                                resume=True)


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_pulls_clients_towards_the_global_model(split_dir, tmp_path, monkeypatch, dp):
    """Also under DP, where the pull follows each privatised step (post-processing)."""
    drift = {}
    real = client_module.client_update

    def spy(model, global_weights, data, cfg, state, **kw):
        update, new_state = real(model, global_weights, data, cfg, state, **kw)
        drift.setdefault(cfg.mu, []).append(sum(
            float((update.weights[k] - global_weights[k]).float().norm())
            for k in global_weights if global_weights[k].is_floating_point()))
        return update, new_state

    monkeypatch.setattr(client_module, "client_update", spy)
    run(split_dir, tmp_path / "a", rounds=1, strategy="fedprox", mu=0.0, local_steps=4, dp=dp)
    run(split_dir, tmp_path / "b", rounds=1, strategy="fedprox", mu=50.0, local_steps=4, dp=dp)
    assert np.mean(drift[50.0]) < np.mean(drift[0.0])


def test_cosine_schedule_decays_the_client_lr_over_the_rounds(split_dir, tmp_path, monkeypatch):
    cosine = config(lr=1e-3, min_lr=1e-5, rounds=5, lr_schedule="cosine")
    lrs = [round_lr(cosine, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert lrs[2] == pytest.approx((1e-3 + 1e-5) / 2) and lrs == sorted(lrs, reverse=True)
    assert round_lr(config(lr=1e-3, rounds=5), 5) == 1e-3

    used = []
    real = client_module.make_optimizer

    def spy(model, cfg, *, lr=None):
        used.append(lr)
        return real(model, cfg, lr=lr)

    monkeypatch.setattr(client_module, "make_optimizer", spy)
    run(split_dir, tmp_path / "cos", rounds=3, local_steps=1, lr=1e-3, min_lr=0.0,
        lr_schedule="cosine")
    assert sorted(set(used), reverse=True) == pytest.approx([1e-3, 5e-4, 0.0])


def test_fedbn_keeps_norms_local(split_dir, tmp_path):
    run(split_dir, tmp_path / "bn", rounds=1, fedbn=True)
    from fedct.runs import load_resume

    states = load_resume(tmp_path / "bn")["extra"]["client_states"]
    norms = [states[k]["norms"] for k in range(3)]
    key = next(k for k in norms[0] if k.endswith("running_mean"))
    assert not torch.equal(norms[0][key], norms[1][key])
    final, _ = read_checkpoint(tmp_path / "bn" / "final")
    assert torch.allclose(final[key], sum(n[key] for n in norms) / 3, atol=0.2)


def test_nan_update_is_rejected_and_the_round_goes_on(split_dir, tmp_path, monkeypatch):
    real = client_module.client_update

    def poisoned(model, global_weights, data, cfg, state, **kw):
        update, new_state = real(model, global_weights, data, cfg, state, **kw)
        if data.client_id == 1:
            key = next(k for k, v in update.weights.items() if v.is_floating_point())
            update.weights[key] = torch.full_like(update.weights[key], float("nan"))
        return update, new_state

    monkeypatch.setattr(client_module, "client_update", poisoned)
    report = run(split_dir, tmp_path / "nan", rounds=1)
    assert report["final"]["clients"] == 2
    final, _ = read_checkpoint(tmp_path / "nan" / "final")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


@pytest.mark.parametrize("dp_train", ["head", "norms", "full"])
def test_dp_epsilon_stays_under_target_and_matches_an_independent_accountant(
        split_dir, tmp_path, dp_train):
    from opacus.accountants import RDPAccountant

    from fedct.privacy import sample_rate

    out = tmp_path / dp_train
    report = run(split_dir, out, rounds=3, dp=True, dp_train=dp_train, target_epsilon=5.0,
                 local_steps=2, fraction=1.0)
    assert report["max_epsilon"] <= 5.0 + 1e-6
    assert report["max_epsilon"] > 3.0  # calibrated to spend most of the budget
    with (out / "privacy.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["status"] for r in rows} == {"trained"} and len(rows) == 9
    for row in (r for r in rows if r["round"] == "3"):
        n = sum(1 for e in load_split(split_dir).entries
                if e.client == int(row["client"]) and e.split == "train")
        independent = RDPAccountant()
        independent.history = [(float(row["noise_multiplier"]), sample_rate(n, 16), 6)]
        assert float(row["epsilon"]) == pytest.approx(independent.get_epsilon(1e-5), rel=1e-3)
    final, meta = read_checkpoint(out / "final")
    assert not any(k.startswith("_module.") for k in final)
    assert meta["dp_safe"] == (dp_train == "full")


def test_fixed_noise_makes_clients_sit_out_at_the_target(split_dir, tmp_path):
    report = run(split_dir, tmp_path / "fixed", rounds=4, dp=True, noise_multiplier=0.6,
                 target_epsilon=6.0, local_steps=3)
    assert report["max_epsilon"] <= 6.0
    with (tmp_path / "fixed" / "privacy.csv").open() as handle:
        statuses = [r["status"] for r in csv.DictReader(handle)]
    assert "sat out" in statuses


def test_errors(split_dir, tmp_path):
    result = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--model",
                                 "test_efficientnet", "--out", str(tmp_path / "x"),
                                 "--clients-per-round", "9"])
    assert result.exit_code == 2 and "clients_per_round 9" in result.output
    result = runner.invoke(app, ["federate", str(split_dir), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "--init" in result.output
    result = runner.invoke(app, ["federate", "--init", "none", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "SPLIT_DIR is required with the embedded engine" in \
        result.output


def test_validation_pooled_federated_or_both(split_dir, tmp_path):
    """Pooled only: no client is asked. Federated only: the server scores nothing itself, a
    seeded third of the clients score each round, and threshold and best round follow them."""
    pooled = run(split_dir, tmp_path / "pooled", val="pooled")
    assert pooled["monitor"] == "val_auc" and pooled["final"]["fed_clients"] == 0
    assert not (tmp_path / "pooled" / "clients.csv").exists()
    federated = run(split_dir, tmp_path / "fed", val="federated", eval_fraction=0.34,
                    threshold="eer", rounds=3)
    assert federated["monitor"] == "fed_auc" and federated["final"]["val_auc"] is None
    assert federated["operating_point"]["source"] == "federated val"
    with (tmp_path / "fed" / "clients.csv").open() as handle:
        asked = [(r["round"], r["client"]) for r in csv.DictReader(handle)]
    saved = yaml.safe_load((tmp_path / "fed" / "config.yaml").read_text())
    assert saved["config"]["monitor"] == "fed_auc"  # auto, resolved and written
    assert asked == [(str(i + 1), str(k)) for i, ks in enumerate(saved["eval_schedule"])
                     for k in ks] and len(asked) == 3
    _, best = read_checkpoint(tmp_path / "fed" / "best")
    assert best["operating_point"] == federated["operating_point"]


def test_federated_validation_chooses_the_patient_threshold_on_the_clients_patients(
        split_dir, tmp_path):
    """With no pooled val, the clients' patient histograms (mean of each patient's slices)
    pool into the patient-level operating point: the one the server would choose with every
    client's local val rows in hand."""
    from fedct.data.loading import make_loader
    from fedct.federated.validation import pool
    from fedct.operating_point import operating_point
    from fedct.patients import patient_histogram
    from fedct.training import predict

    report = run(split_dir, tmp_path / "fed", val="federated", threshold="youden", rounds=1)
    point = report["patient_operating_point"]
    assert point["source"] == "federated val, per patient" and point["aggregate"] == "mean"
    setup = prepare_setup(config(threshold="youden"), init="none", split_dir=split_dir)
    weights, _ = read_checkpoint(tmp_path / "fed" / "final")
    setup.model.load_state_dict(weights)
    local = setup.split.select(split="local_val")
    dataset = setup.images.dataset(local, setup.transform(train=False))
    probs, labels = predict(setup.model, make_loader(
        dataset, batch_size=64, train=False, seed=0), device=torch.device("cpu"))
    central = patient_histogram([e.row.group for e in local], labels, probs,
                                setup.positive_index)
    assert point["patients"] == len({e.row.group for e in local}) == central.n_pos + central.n_neg
    expected = operating_point("youden", central, "federated val, per patient")
    assert {k: point[k] for k in expected} == pytest.approx(expected)
    assert point["auc"] == pytest.approx(central.auc())
    # a client's patient histograms are checked like its slice ones
    message = client_module.client_evaluate(
        setup.model, weights, dataset, setup.config, client_module.new_client_state(setup.config),
        client_id=0, device=torch.device("cpu"), positive_index=setup.positive_index)
    assert sum(message.patient_positives) + sum(message.patient_negatives) == point["patients"]
    pooled, checked = pool([message, replace(message, client_id=1, patient_positives=(1,) * 3)])
    assert pooled.clients == 1 and "malformed patient histograms" in checked[1].detail
    assert pooled.patient_histogram() is not None
    # a client that sent none (a patient of two labels among its rows): no patient point
    # from the others' patients alone
    pooled, _ = pool([message, replace(message, client_id=1, patient_positives=(),
                                       patient_negatives=())])
    assert pooled.clients == 2 and pooled.patient_histogram() is None
    # every patient a single slice: the patient level is the slice level
    one_each = replace(message, patient_positives=message.positives,
                       patient_negatives=message.negatives)
    assert pool([one_each])[0].patient_histogram() is None


def test_counts_release_sends_only_confusion_counts_at_the_threshold(split_dir, tmp_path):
    """The same run with eval_release counts: the clients' figures at the threshold are those
    of the full histograms, and nothing else (no AUC, no loss) reaches the server."""
    settings = {"val": "federated", "threshold": "0.4", "monitor": "fed_balanced_acc"}
    run(split_dir, tmp_path / "hist", **settings)
    run(split_dir, tmp_path / "counts", eval_release="counts", **settings)
    with (tmp_path / "hist" / "summary.csv").open() as a, \
            (tmp_path / "counts" / "summary.csv").open() as b:
        for full, counts in zip(csv.DictReader(a), csv.DictReader(b), strict=True):
            assert counts["fed_sensitivity"] == full["thr_sensitivity"]
            assert counts["fed_specificity"] == full["thr_specificity"]
            assert counts["fed_auc"] == counts["fed_loss"] == "nan" != full["fed_auc"]
    # a client's message in counts mode: 4 numbers at most
    setup = prepare_setup(config(eval_release="counts", threshold="0.4"), init="none",
                          split_dir=split_dir)
    client = client_module.client_data(0, setup.images, setup.split.select(clients=[0]),
                                       train_transform=setup.transform(train=True),
                                       eval_transform=setup.transform(train=False))
    message = client_module.client_evaluate(
        setup.model, setup.model.state_dict(), client.val, setup.config,
        client_module.new_client_state(setup.config), client_id=0,
        device=torch.device("cpu"), positive_index=setup.positive_index)
    assert np.count_nonzero(message.positives) + np.count_nonzero(message.negatives) <= 4
    assert message.loss_sum == 0.0 and message.examples == len(client.val)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_dp_full_works_for_timm_resnet_in_place_residuals(split_dir, tmp_path, mode):
    report = run(split_dir, tmp_path / mode, model="resnet10t", rounds=1, local_steps=1, dp=True,
                 dp_train="full", grad_sample_mode=mode)
    assert 0 < report["max_epsilon"] <= 8.0


def test_dp_full_with_frozen_batchnorm_keeps_batchnorm(split_dir, tmp_path):
    from fedct.evaluation import load_model

    report = run(split_dir, tmp_path / "bn", rounds=1, local_steps=2, dp=True, dp_train="full",
                 freeze_bn=True)
    assert 0 < report["max_epsilon"] <= 8.0
    model, meta = load_model(tmp_path / "bn" / "final")
    assert not meta["dp_safe"]
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    first, _ = read_checkpoint(tmp_path / "bn" / "round-0001")
    fresh = prepare_setup(config(dp=True, dp_train="full", freeze_bn=True), init="none",
                          split_dir=split_dir).model
    stats = [k for k in first if k.endswith("running_mean")]
    assert stats and all(torch.equal(first[k], fresh.state_dict()[k]) for k in stats)


@pytest.mark.parametrize("dp_train, freeze_bn, server_norm", [
    ("full", False, "GroupNorm"), ("full", True, "BatchNorm"), ("head", False, "BatchNorm"),
    ("norms", False, "FrozenStatsNorm")])
def test_server_and_node_prepare_the_same_model_for_dp(dp_train, freeze_bn, server_norm):
    from fedct.models import build_model

    cfg = config(dp=True, dp_train=dp_train, freeze_bn=freeze_bn)

    def norms(model):
        return sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})

    server_spec = model_spec(cfg, "resnet10t", 2)
    server = build_model(server_spec)
    node = build_model(model_spec(cfg, "resnet10t", 2, groupnorm=server_spec.groupnorm))
    assert server_spec.groupnorm == (server_norm == "GroupNorm")
    assert norms(server) == norms(node) and all(server_norm in n for n in norms(server))
    assert list(server.state_dict()) == list(node.state_dict())
    inplace = [m for m in node.modules() if getattr(m, "inplace", False)]
    assert bool(inplace) == (dp_train == "head")
    trains = {type(m).__name__ for m in node.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert (trains == {"FrozenStatsNorm", "Linear"}) == (dp_train == "norms")


def test_flower_dry_run_prints_tls_commands_for_every_client(split_dir, tmp_path):
    result = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--model",
                                 "test_efficientnet", "--out", str(tmp_path / "run"), "--engine",
                                 "flower", "--federation", "hospitals", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("fedct certs") for line in lines)
    link = next(line for line in lines if "flower-superlink" in line)
    assert "--ssl-certfile" in link and "--insecure" not in result.output
    nodes = [line for line in lines if line.startswith("FLWR") and "fedct node" in line]
    assert len(nodes) == 3 and all("--root-certificates" in n for n in nodes)
    assert [f"client-id={k}'" in n for k, n in enumerate(nodes)] == [True] * 3
    assert "[superlink.hospitals]" in result.output
    assert not (tmp_path / "run").exists()
    missing = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--out",
                                  str(tmp_path / "run"), "--engine", "flower"])
    assert missing.exit_code == 2 and "--federation" in missing.output


def test_certs_name_the_hosts(tmp_path):
    pytest.importorskip("cryptography")
    from cryptography import x509

    result = runner.invoke(app, ["certs", str(tmp_path / "certs"), "--host", "127.0.0.1",
                                 "--host", "superlink.example.org"])
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in names.get_values_for_type(x509.DNSName)
    assert (tmp_path / "certs" / "ca.key").stat().st_mode & 0o077 == 0


def test_flower_run_config_is_typed_and_unknown_keys_are_named():
    from fedct.errors import FedctError
    from fedct.federated.protocol import split_run_config

    config, extras = split_run_config({"local-epochs": 2, "init": "ckpt", "out": "run",
                                       "dp": "true", "node-wait": 5})
    assert config.local_epochs == 2 and config.dp is True
    assert extras.init == "ckpt" and extras.out == "run" and extras.node_wait == 5.0
    with pytest.raises(FedctError, match="Flower run config: unknown key 'roundz'"):
        split_run_config({"roundz": 3})
