"""DP that keeps accuracy: cached head features, augmentation multiplicity, norms-only
training with frozen statistics, full-batch DP."""

import csv

import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.loading import cache_dir
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.federated import client as client_module
from fedct.federated import features, simulation
from fedct.federated.setup import prepare_setup
from fedct.models import FrozenStatsNorm
from fedct.runs import read_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpsplit") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="iid", clients=2, seed=0))
    return out


def config(**extra):
    return build_config(FederateConfig, None, {**TINY, **extra})


def one_update(split_dir, cfg, *, round_number=1):
    """Client 0's update from a fresh (seeded) model of `cfg`, with its new state."""
    torch.manual_seed(0)
    setup = prepare_setup(cfg, init="none", split_dir=split_dir)
    data = client_module.client_data(0, setup.images, setup.split.select(clients=[0]),
                                     train_transform=setup.transform(train=True),
                                     eval_transform=setup.transform(train=False))
    state = client_module.new_client_state(cfg)
    noise = 1.0 if cfg.dp else None
    return client_module.client_update(
        setup.model, setup.model.state_dict(), data, setup.config, state,
        round_number=round_number, device=torch.device("cpu"), num_classes=2, noise=noise)


@pytest.mark.parametrize("dp", [False, True])
def test_cached_features_train_the_head_as_the_image_path_does(split_dir, dp):
    """Without augmentation (one view, no dropout), the head trained on cached features equals
    the head trained on images, step for step, with and without DP (same samples, same noise)."""
    settings = {"augment": False, "drop_rate": 0.0, "freeze": "head", "dp": dp,
                "local_steps": 3, "batch_size": 8}
    images, _ = one_update(split_dir, config(cache_features=False, **settings))
    cached, state = one_update(split_dir, config(cache_features=True, **settings))
    for key in images.weights:
        assert torch.allclose(images.weights[key].float(), cached.weights[key].float(),
                              atol=1e-5), key
    head = [k for k in images.weights if k.startswith("classifier.")]
    torch.manual_seed(0)
    fresh = prepare_setup(config(**settings), init="none", split_dir=split_dir).model.state_dict()
    assert head and not torch.equal(cached.weights[head[0]], fresh[head[0]])  # it did train
    assert images.metrics["steps"] == cached.metrics["steps"] == 3
    if dp:
        assert state["epsilon"] > 0


def test_views_average_each_examples_gradient_before_clipping():
    """Augmentation multiplicity: Opacus's per-example gradient of the head on K views is the
    mean of the K single-view gradients, so clipping bounds one example, not one view."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    head = features.FeatureHead(torch.nn.Linear(5, 2), drop_rate=0.0)
    loss_fn = features.ViewsLoss(torch.nn.CrossEntropyLoss(), views=3)
    x, y = torch.randn(4, 3, 5), torch.tensor([0, 1, 1, 0])
    wrapped = GradSampleModule(head)
    loss_fn(wrapped(x), y).backward()
    per_example = head.classifier.weight.grad_sample
    for i in range(4):
        by_hand = []
        for view in range(3):
            head.classifier.weight.grad = None
            torch.nn.functional.cross_entropy(head.classifier(x[i, view:view + 1]),
                                              y[i:i + 1]).backward()
            by_hand.append(head.classifier.weight.grad.clone())
        assert torch.allclose(per_example[i], torch.stack(by_hand).mean(0), atol=1e-6)
    wrapped._close()


def test_feature_cache_is_computed_once_and_follows_the_backbone(split_dir):
    cfg = config(freeze="head", feature_views=2)
    setup = prepare_setup(cfg, init="none", split_dir=split_dir)
    dataset = setup.images.dataset(setup.split.select(clients=[0], split="train"),
                                   setup.transform(train=True))
    before = set(cache_dir().glob("features-*.pt"))
    first = features.cached_features(setup.model, dataset, cfg, seed=1, device=torch.device("cpu"))
    again = features.cached_features(setup.model, dataset, cfg, seed=1, device=torch.device("cpu"))
    assert len(set(cache_dir().glob("features-*.pt")) - before) == 1
    assert torch.equal(first.features, again.features)
    assert first.features.shape == (len(dataset), 2, setup.model.num_features)
    assert not torch.equal(first.features[:, 0], first.features[:, 1])  # two augmented views
    with torch.no_grad():  # a new backbone: new features, never the old ones
        next(p for n, p in setup.model.named_parameters() if not p.requires_grad).add_(0.5)
    moved = features.cached_features(setup.model, dataset, cfg, seed=1, device=torch.device("cpu"))
    assert len(set(cache_dir().glob("features-*.pt")) - before) == 2
    assert not torch.allclose(moved.features, first.features)


def test_norms_training_keeps_statistics_and_convolutions_and_loads_into_plain_batchnorm(
        split_dir, tmp_path):
    from safetensors.torch import save_file

    from fedct.evaluation import load_model
    from fedct.models import create_model

    init = tmp_path / "init.safetensors"  # pretrained weights, with statistics to keep
    save_file(create_model("test_efficientnet", 2, pretrained="none").state_dict(), init)
    out = tmp_path / "norms"
    report = simulation.run_federate(split_dir, out, config(dp=True, dp_train="norms",
                                                            target_epsilon=4.0), init=str(init),
                                     quiet=True)
    assert 0 < report["max_epsilon"] <= 4.0
    final, meta = read_checkpoint(out / "final")
    setup = prepare_setup(config(dp=True, dp_train="norms"), init=str(init), split_dir=split_dir)
    assert any(isinstance(m, FrozenStatsNorm) for m in setup.model.modules())
    start = setup.model.state_dict()
    assert set(final) == set(start) and not meta["dp_safe"]
    norms = {f"{name}.{p}" for name, m in setup.model.named_modules()
             if isinstance(m, FrozenStatsNorm) for p in ("weight", "bias")}
    for key, value in final.items():
        same = torch.equal(value.float(), start[key].float())
        trains = key.startswith("classifier.") or key in norms
        assert same != trains, key  # only the head and the norms' scale and shift moved
    model, _ = load_model(out / "final")  # the plain model, BatchNorm in eval mode
    assert not any(isinstance(m, FrozenStatsNorm) for m in model.modules())
    setup.model.load_state_dict(final)
    x = torch.randn(3, 3, 32, 32)
    setup.model.eval()
    assert torch.allclose(model.eval()(x), setup.model(x), atol=1e-5)


def test_full_batch_dp_samples_every_example_every_step(split_dir, tmp_path):
    from opacus.accountants import RDPAccountant

    from fedct.privacy import sample_rate, steps_per_round

    cfg = config(batch_size="all", local_epochs=2, local_steps=0)
    assert cfg.batch_size == "all" and sample_rate(50, cfg.batch_size) == 1.0
    assert steps_per_round(50, cfg) == 2
    out = tmp_path / "all"
    simulation.run_federate(split_dir, out, config(dp=True, batch_size="all", local_steps=3,
                                                   target_epsilon=3.0, rounds=2),
                            init="none", quiet=True)
    with (out / "privacy.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["round"] == "2"]
    for row in rows:
        independent = RDPAccountant()
        independent.history = [(float(row["noise_multiplier"]), 1.0, 6)]
        assert float(row["epsilon"]) == pytest.approx(independent.get_epsilon(1e-5), rel=1e-3)
        assert float(row["epsilon"]) <= 3.0 + 1e-6
    assert len(rows) == 2 and load_split(split_dir).num_clients == 2


def test_bad_dp_settings_are_one_line_errors(split_dir, tmp_path):
    base = ["federate", str(split_dir), "--init", "none", "--model", "test_efficientnet",
            "--out", str(tmp_path / "x")]
    for extra, message in [(["--batch-size", "most"], "batch_size 'most'"),
                           (["--feature-views", "0"], "feature_views 0"),
                           (["--dp", "--dp-train", "norms", "--config", str(tmp_path / "c.yaml")],
                            "freeze_bn")]:
        (tmp_path / "c.yaml").write_text("freeze_bn: true\n")
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output, result.output
