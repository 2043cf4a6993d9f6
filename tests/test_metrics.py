import tracemalloc

import numpy as np
import pytest
from scipy import special
from sklearn import neighbors

from cskd_tf import metrics


def random_predictions(n=500, c=7, seed=0):
    rng = np.random.default_rng(seed)
    probs = special.softmax(rng.normal(scale=2.0, size=(n, c)), axis=-1)
    labels = rng.integers(0, c, size=n)
    return probs, labels


def loop_ece(probs, labels, num_bins):
    """Independent computation: a loop over bins with explicit interval tests."""
    confidence, prediction = probs.max(1), probs.argmax(1)
    ece = 0.0
    for m in range(num_bins):
        lo, hi = m / num_bins, (m + 1) / num_bins
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            accuracy = np.mean(prediction[in_bin] == labels[in_bin])
            ece += in_bin.mean() * abs(accuracy - confidence[in_bin].mean())
    return ece


@pytest.mark.parametrize("num_bins", [15, 20])
def test_ece_matches_a_loop_over_bins(num_bins):
    probs, labels = random_predictions()
    assert metrics.expected_calibration_error(probs, labels, num_bins) == pytest.approx(
        loop_ece(probs, labels, num_bins), abs=1e-6
    )


def test_ece_is_zero_when_calibrated_by_construction():
    # Ten predictions at confidence 0.8, eight of them right; four at 0.5 (two classes), two right.
    probs = np.array([[0.8, 0.1, 0.1]] * 10 + [[0.5, 0.5, 0.0]] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [0, 0, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_over_confident_model_by_hand():
    # Confidence 0.9 everywhere, half right: ECE = |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1]] * 4)
    labels = np.array([0, 0, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_top_k_error_and_nll_by_hand():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    labels = np.array([1, 2])
    assert metrics.top_k_error(logits, labels, 1) == 0.5
    assert metrics.top_k_error(logits, labels, 2) == 0.0
    assert metrics.negative_log_likelihood(logits, labels) == pytest.approx(
        -(np.log(0.2) + np.log(0.6)) / 2
    )


@pytest.mark.parametrize("k", [1, 3])
def test_recall_at_k_matches_scikit_learn_brute_force(k):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 5, size=300)
    index = neighbors.NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(features)
    _, nearest = index.kneighbors(features)
    expected = np.mean(np.any(labels[nearest[:, 1:]] == labels[:, None], axis=1))
    # A tiny budget forces many chunks: the result must not depend on it.
    for budget in (4 * 300 * 7, 256 * 2**20):
        assert metrics.recall_at_k(features, labels, k, max_chunk_bytes=budget) == pytest.approx(
            expected
        )


def test_recall_is_one_on_separable_embeddings():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 10)
    features = 100.0 * np.eye(4)[labels] + rng.normal(scale=0.1, size=(40, 4))
    assert metrics.recall_at_k(features, labels, 1) == 1.0


@pytest.mark.slow
def test_recall_on_imagenet_validation_size_stays_within_one_gib():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(50_000, 512)).astype(np.float32)
    labels = rng.integers(0, 1000, size=50_000)
    tracemalloc.start()
    try:
        value = metrics.recall_at_k(features, labels, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.0 <= value <= 0.01  # Random features: about chance, 1/1000.
    assert peak < 2**30


def test_aurc_by_hand():
    # Four predictions; the two errors are the least confident: risks 0, 0, 1/3, 2/4.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    assert metrics.area_under_risk_coverage(probs, labels) == pytest.approx((1 / 3 + 1 / 2) / 4)
    # The same errors ranked most confident: risks 1, 1, 2/3, 2/4.
    labels = np.array([1, 1, 0, 0])
    assert metrics.area_under_risk_coverage(probs, labels) == pytest.approx(
        (1 + 1 + 2 / 3 + 1 / 2) / 4
    )
