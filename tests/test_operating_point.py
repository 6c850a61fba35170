"""Score histograms, the operating point and calibration, on generated scores."""

import numpy as np
import pytest

from fedct.errors import FedctError
from fedct.metrics import binary_metrics, roc_auc
from fedct.operating_point import (
    EDGES,
    ScoreHistogram,
    choose_threshold,
    expected_calibration_error,
    operating_point,
    parse_rule,
)


def scores(n: int, seed: int, separation: float = 1.5):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    logit = rng.normal(0, 2, n) + separation * truth - 0.3
    return truth, 1 / (1 + np.exp(-logit))


def test_a_histogram_auc_is_the_exact_one_within_its_bound_and_the_bound_is_small():
    for seed in range(40):
        truth, score = scores(int(60 + 10 * seed), seed)
        histogram = ScoreHistogram.of(truth, score)
        assert abs(histogram.auc() - roc_auc(truth, score)) <= histogram.tie_bound() + 1e-12
        assert histogram.tie_bound() < 0.005


def test_pooled_histograms_equal_the_pooled_rows_at_any_bin_edge():
    truth, score = scores(300, 1)
    parts = [ScoreHistogram.of(truth[i::3], score[i::3]) for i in range(3)]
    pooled = parts[0] + parts[1] + parts[2]
    whole = ScoreHistogram.of(truth, score)
    assert np.array_equal(pooled.positives, whole.positives)
    for edge in (0.5, float(EDGES[700]), float(EDGES[1300])):
        exact = binary_metrics(truth, score, edge)
        got = pooled.metrics(edge)
        assert got["acc"] == pytest.approx(exact["accuracy"])
        assert got["sensitivity"] == pytest.approx(exact["sensitivity"])
        assert got["specificity"] == pytest.approx(exact["specificity"])


def test_each_rule_meets_its_target_on_the_rows_it_was_chosen_on():
    truth, score = scores(400, 2)
    histogram = ScoreHistogram.of(truth, score)
    sens = binary_metrics(truth, score, choose_threshold("sens:0.9", histogram))
    assert sens["sensitivity"] >= 0.9
    spec = binary_metrics(truth, score, choose_threshold("spec:0.9", histogram))
    assert spec["specificity"] >= 0.9
    youden = choose_threshold("youden", histogram)
    best = max(binary_metrics(truth, score, t)["balanced_accuracy"] for t in EDGES[1:])
    assert binary_metrics(truth, score, youden)["balanced_accuracy"] == pytest.approx(best)
    assert choose_threshold("0.3", histogram) == 0.3
    point = operating_point("youden", histogram, "federated")
    assert point["source"] == "federated" and point["threshold"] == youden


def test_a_lopsided_model_gets_a_threshold_that_balances_sensitivity_and_specificity():
    """The DP failure the threshold exists for: at 0.5 half the positives are missed."""
    truth, score = scores(500, 3, separation=2.5)
    score = 1 / (1 + np.exp(2.5 - np.log(score / (1 - score))))  # every logit 2.5 lower
    at_half = binary_metrics(truth, score, 0.5)
    assert at_half["sensitivity"] < 0.5 < at_half["specificity"] - 0.3
    histogram = ScoreHistogram.of(truth, score)
    youden = binary_metrics(truth, score, choose_threshold("youden", histogram))
    assert youden["balanced_accuracy"] > at_half["balanced_accuracy"] + 0.04
    eer = binary_metrics(truth, score, choose_threshold("eer", histogram))
    assert abs(eer["sensitivity"] - eer["specificity"]) < 0.02


def test_one_class_falls_back_to_one_half_and_bad_rules_are_refused():
    only = ScoreHistogram.of(np.ones(10, bool), np.linspace(0.1, 0.9, 10))
    assert choose_threshold("youden", only) == 0.5
    assert parse_rule("SENS:0.95") == ("sens", 0.95)
    for bad in ("sens:1.5", "median", "0", "spec:"):
        with pytest.raises(FedctError, match="threshold"):
            parse_rule(bad)


def test_calibration_error_is_small_for_calibrated_scores_and_large_for_overconfident_ones():
    rng = np.random.default_rng(0)
    score = rng.random(20000)
    truth = rng.random(20000) < score
    ece, bins = expected_calibration_error(truth, score)
    assert ece < 0.02 and len(bins) == 10 and sum(b["count"] for b in bins) == 20000
    overconfident, _ = expected_calibration_error(truth, np.where(score > 0.5, 0.99, 0.01))
    assert overconfident > 0.2
