"""The evaluation numbers of `inference.training.metrics` on small examples computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from inference.training.metrics import aurc, ece, reliability, risk_coverage, roc_curve


def test_aurc_of_a_hand_computed_example() -> None:
    # accepted by falling confidence: right, wrong, right, wrong -> risks 0/1, 1/2, 1/3, 2/4
    confidence = np.array([0.6, 0.9, 0.7, 0.8])
    errors = np.array([True, False, False, True])
    coverage, risk = risk_coverage(confidence, errors)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0.0, 1 / 2, 1 / 3, 2 / 4])
    assert aurc(confidence, errors) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)  # 0.3333


def test_aurc_rewards_doubting_the_errors() -> None:
    errors = np.array([False, False, False, True, True])
    sure_of_the_right = aurc(np.array([5, 4, 3, 2, 1.0]), errors)
    sure_of_the_wrong = aurc(np.array([1, 2, 3, 4, 5.0]), errors)
    blind = aurc(np.ones(5), errors)  # one confidence for all: every case accepted at once
    assert sure_of_the_right == pytest.approx((0 + 0 + 0 + 1 / 4 + 2 / 5) / 5)
    assert sure_of_the_wrong == pytest.approx((1 + 1 + 2 / 3 + 2 / 4 + 2 / 5) / 5)
    assert blind == pytest.approx(errors.mean())
    assert sure_of_the_right < blind < sure_of_the_wrong


def test_ties_are_accepted_together_whatever_their_order() -> None:
    a = risk_coverage(np.array([0.9, 0.5, 0.5]), np.array([False, True, False]))
    b = risk_coverage(np.array([0.9, 0.5, 0.5]), np.array([False, False, True]))
    assert a[0].tolist() == b[0].tolist() == pytest.approx([1 / 3, 1.0])
    assert a[1].tolist() == b[1].tolist() == pytest.approx([0.0, 1 / 3])
    assert np.isnan(aurc(np.array([]), np.array([], bool)))


def test_roc_curve_and_reliability() -> None:
    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.8, 0.3]), np.array([1, 1, 0, 0]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    mean_p, freq, count = reliability(np.array([0.05, 0.15, 0.12, 0.95]), np.array([0, 1, 0, 1]))
    assert mean_p == pytest.approx([0.05, 0.135, 0.95]) and freq.tolist() == [0.0, 0.5, 1.0]
    assert count.tolist() == [1, 2, 1]
    assert ece(np.array([0.05, 0.15, 0.12, 0.95]), np.array([0, 1, 0, 1])) == pytest.approx(
        (0.05 + 2 * (0.5 - 0.135) + 0.05) / 4)
