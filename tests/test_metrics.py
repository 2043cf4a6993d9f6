import bisect
import collections
import tracemalloc

import numpy as np
import pytest
from scipy import special
from sklearn import calibration
from sklearn import metrics as sk_metrics
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


# --- The calibration metrics other papers compare (issue 14) ----------------------------------


def bisect_bin(value, num_bins):
    """Independent binning: the first right edge m / M at or above `value` (0 joins bin 0)."""
    return max(bisect.bisect_left([m / num_bins for m in range(1, num_bins + 1)], value), 0)


def sklearn_binned_gap(hits, scores, num_bins):
    """sum_m |B_m| / n * |mean hit(B_m) - mean score(B_m)| over equal-width right-closed bins.

    Per-bin means from `sklearn.calibration.calibration_curve` (which bins by
    `searchsorted(edges, score)`: right-closed too), counts from `bisect_bin`.
    """
    counts = collections.Counter(bisect_bin(s, num_bins) for s in scores)
    mean_hit, mean_score = calibration.calibration_curve(
        hits, scores, n_bins=num_bins, strategy="uniform"
    )
    filled = sorted(counts)  # calibration_curve returns the non-empty bins, in order.
    assert len(filled) == len(mean_hit)
    weights = np.array([counts[m] for m in filled]) / len(scores)
    return float(np.sum(weights * np.abs(mean_hit - mean_score)))


def calibrated_by_construction():
    """600 two-class predictions, 40 at each of 15 confidences 0.65, 0.675, ..., 1.0, of which a
    fraction equal to the confidence are right.

    Every statistic is calibrated at once: per confidence level, top-label accuracy equals the
    confidence, and the frequency of each class c equals p_c; each level is exactly one
    equal-mass bin of 15 (the levels are distinct and equally populated).
    """
    probs, labels = [], []
    for k in range(15):
        confidence = 0.65 + 0.025 * k
        right = round(40 * confidence)
        probs += [[confidence, 1.0 - confidence]] * 40
        labels += [0] * right + [1] * (40 - right)
    return np.array(probs), np.array(labels)


@pytest.mark.parametrize("num_bins", [15, 20])
def test_ece_matches_scikit_learn_calibration_curve(num_bins):
    probs, labels = random_predictions(seed=5)
    correct = (probs.argmax(1) == labels).astype(int)
    assert metrics.expected_calibration_error(probs, labels, num_bins) == pytest.approx(
        sklearn_binned_gap(correct, probs.max(1), num_bins), abs=1e-12
    )


def test_mce_matches_a_loop_over_bins():
    probs, labels = random_predictions(seed=6)
    confidence, prediction = probs.max(1), probs.argmax(1)
    largest = 0.0
    for m in range(20):
        in_bin = [i for i in range(len(labels)) if bisect_bin(confidence[i], 20) == m]
        if in_bin:
            accuracy = sum(prediction[i] == labels[i] for i in in_bin) / len(in_bin)
            largest = max(largest, abs(accuracy - sum(confidence[i] for i in in_bin) / len(in_bin)))
    assert metrics.maximum_calibration_error(probs, labels, 20) == pytest.approx(largest, abs=1e-12)


def test_mce_by_hand():
    # Four at confidence 0.9, two right (gap 0.4); one at 0.55, right (gap 0.45). The maximum
    # ignores bin sizes: MCE = 0.45, where ECE = (4 * 0.4 + 0.45) / 5 = 0.41.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.55, 0.45]])
    labels = np.array([0, 0, 1, 1, 0])
    assert metrics.maximum_calibration_error(probs, labels) == pytest.approx(0.45)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.41)


def loop_adaptive_ece(probs, labels, num_bins):
    """Independent computation: Python's stable sort, then consecutive slices of q + 1 (the first
    r of them) and q examples, n = q * num_bins + r."""
    confidence = [max(row) for row in probs.tolist()]
    correct = [row.index(max(row)) == y for row, y in zip(probs.tolist(), labels.tolist())]
    order = sorted(range(len(confidence)), key=lambda i: confidence[i])
    q, r = divmod(len(order), num_bins)
    ece, start = 0.0, 0
    for b in range(num_bins):
        members = order[start : start + q + (b < r)]
        start += len(members)
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean = sum(confidence[i] for i in members) / len(members)
            ece += len(members) / len(order) * abs(accuracy - mean)
    assert start == len(order)
    return ece


@pytest.mark.parametrize("rounded", [False, True])
def test_adaptive_ece_matches_a_python_loop(rounded):
    # 500 = 15 * 33 + 5 examples: five bins of 34, ten of 33. Rounded to 0.05, the confidences
    # tie in long runs, which the equal-mass cuts split by index order.
    probs, labels = random_predictions(seed=7)
    if rounded:
        probs = np.round(probs / 0.05) * 0.05
    for num_bins in (15, 7):
        assert metrics.adaptive_calibration_error(probs, labels, num_bins) == pytest.approx(
            loop_adaptive_ece(probs, labels, num_bins), abs=1e-12
        )


def test_adaptive_ece_by_hand():
    # Confidences 0.55, 0.6, 0.7, 0.8, 0.9, the second wrong. Two equal-mass bins of 5 examples:
    # the first takes the extra one, {0.55, 0.6, 0.7} (accuracy 2/3, confidence 0.6167, gap 0.05)
    # and {0.8, 0.9} (accuracy 1, confidence 0.85, gap 0.15): 3/5 * 0.05 + 2/5 * 0.15 = 0.09.
    # (Cut 2 + 3 instead, it would be 2/5 * 0.075 + 3/5 * 0.2 = 0.15.)
    confidence = np.array([0.55, 0.6, 0.7, 0.8, 0.9])
    probs = np.stack([confidence, 1.0 - confidence], axis=1)
    labels = np.array([0, 1, 0, 0, 0])
    assert metrics.adaptive_calibration_error(probs, labels, 2) == pytest.approx(0.09)
    # Fewer examples than bins: one example per bin, the other ten empty; the mean of
    # |1 - 0.55|, |0 - 0.6|, |1 - 0.7|, |1 - 0.8|, |1 - 0.9| = (0.45 + 0.6 + 0.3 + 0.2 + 0.1) / 5.
    assert metrics.adaptive_calibration_error(probs, labels, 15) == pytest.approx(1.65 / 5)


def test_adaptive_ece_splits_tied_confidences_by_index_order():
    # Ten at confidence 0.7, the first seven right: calibrated as one bin (ECE 0), but three
    # equal-mass bins cut the tie into indices {0..3} (all right), {4..6} (all right), {7..9}
    # (all wrong): 0.4 * 0.3 + 0.3 * 0.3 + 0.3 * 0.7 = 0.42.
    probs = np.array([[0.7, 0.3]] * 10)
    labels = np.array([0] * 7 + [1] * 3)
    assert metrics.expected_calibration_error(probs, labels, 15) == pytest.approx(0.0, abs=1e-12)
    assert metrics.adaptive_calibration_error(probs, labels, 3) == pytest.approx(0.42)


def loop_classwise_ece(probs, labels, num_bins):
    """Independent computation: for each class and bin, explicit interval tests on p_c."""
    n, num_classes = probs.shape
    total = 0.0
    for c in range(num_classes):
        for m in range(num_bins):
            lo, hi = m / num_bins, (m + 1) / num_bins
            p = probs[:, c]
            in_bin = ((p > lo) & (p <= hi)) | ((m == 0) & (p == 0.0))
            if in_bin.any():
                frequency = np.mean(labels[in_bin] == c)
                total += in_bin.sum() / n * abs(frequency - p[in_bin].mean())
    return total / num_classes


def test_classwise_ece_matches_a_loop_and_scikit_learn():
    probs, labels = random_predictions(seed=8)
    expected = loop_classwise_ece(probs, labels, 15)
    per_class = [
        sklearn_binned_gap((labels == c).astype(int), probs[:, c], 15)
        for c in range(probs.shape[1])
    ]
    assert expected == pytest.approx(np.mean(per_class), abs=1e-12)
    # Chunks of 3 examples (21 probabilities): the result must not depend on the chunking.
    for chunk in (21, 2**22):
        got = metrics.classwise_calibration_error(probs, labels, 15, max_chunk_entries=chunk)
        assert got == pytest.approx(expected, abs=1e-12)


def test_classwise_ece_by_hand():
    # Two examples at p = (0.6, 0.3, 0.1), labelled 0 and 1. Class 0: p 0.6 against frequency
    # 0.5 (gap 0.1); class 1: 0.3 against 0.5 (0.2); class 2: 0.1 against 0 (0.1). Mean 0.4 / 3,
    # where the top-label ECE sees only |0.5 - 0.6| = 0.1.
    probs = np.array([[0.6, 0.3, 0.1]] * 2)
    labels = np.array([0, 1])
    assert metrics.classwise_calibration_error(probs, labels) == pytest.approx(0.4 / 3)
    assert metrics.expected_calibration_error(probs, labels, 15) == pytest.approx(0.1)
    # A probability of exactly 0 joins the first bin: class 2 of (1, 0, 0) is p 0, frequency 0.
    assert metrics.classwise_calibration_error(
        np.array([[1.0, 0.0, 0.0]]), np.array([0])
    ) == pytest.approx(0.0, abs=1e-15)


def test_brier_score_matches_a_loop_and_scikit_learn():
    probs, labels = random_predictions(seed=9)
    loop = np.mean(
        [
            sum((p - (c == y)) ** 2 for c, p in enumerate(row))
            for row, y in zip(probs.tolist(), labels.tolist())
        ]
    )
    got = metrics.brier_score(probs, labels)
    assert got == pytest.approx(loop, abs=1e-12)
    # scikit-learn's multi-class Brier score, not halved: sum over classes, mean over examples.
    assert got == pytest.approx(
        sk_metrics.brier_score_loss(
            labels, probs, labels=np.arange(probs.shape[1]), scale_by_half=False
        ),
        abs=1e-12,
    )


def test_brier_score_by_hand():
    # p = (0.7, 0.2, 0.1): labelled 0, 0.3^2 + 0.2^2 + 0.1^2 = 0.14; labelled 1,
    # 0.7^2 + 0.8^2 + 0.1^2 = 1.14. Mean 0.64. One-hot right answers score 0, wrong ones 2.
    probs = np.array([[0.7, 0.2, 0.1]] * 2)
    assert metrics.brier_score(probs, np.array([0, 1])) == pytest.approx(0.64)
    assert metrics.brier_score(np.eye(3), np.arange(3)) == 0.0
    assert metrics.brier_score(np.eye(3), np.array([1, 2, 0])) == pytest.approx(2.0)


def test_every_calibration_metric_is_zero_when_calibrated_by_construction():
    probs, labels = calibrated_by_construction()
    for value in (
        metrics.expected_calibration_error(probs, labels, 20),
        metrics.expected_calibration_error(probs, labels, 15),
        metrics.adaptive_calibration_error(probs, labels, 15),
        metrics.classwise_calibration_error(probs, labels, 15),
        metrics.maximum_calibration_error(probs, labels, 20),
    ):
        assert value == pytest.approx(0.0, abs=1e-12)


def test_classification_metrics_report_the_five_calibration_metrics():
    rng = np.random.default_rng(10)
    logits = rng.normal(scale=2.0, size=(300, 6))
    labels = rng.integers(0, 6, size=300)
    probs = special.softmax(logits, axis=-1)
    got = metrics.classification_metrics(logits, labels, num_bins=10)
    assert got["ece"] == metrics.expected_calibration_error(probs, labels, 10)
    # The five keep their own bin counts, whatever num_bins says.
    assert got["ece_15"] == pytest.approx(loop_ece(probs, labels, 15), abs=1e-12)
    assert got["adaptive_ece"] == pytest.approx(loop_adaptive_ece(probs, labels, 15), abs=1e-12)
    assert got["classwise_ece"] == pytest.approx(loop_classwise_ece(probs, labels, 15), abs=1e-12)
    assert got["mce"] == metrics.maximum_calibration_error(probs, labels, 20)
    assert got["brier"] == pytest.approx(
        sk_metrics.brier_score_loss(labels, probs, labels=np.arange(6), scale_by_half=False)
    )
    # Without them: the paper's metrics alone, as the per-epoch logs have them.
    plain = metrics.classification_metrics(logits, labels, num_bins=10, extra_calibration=False)
    assert set(got) - set(plain) == {"ece_15", "adaptive_ece", "classwise_ece", "mce", "brier"}
    assert set(plain) == {"top1_error", "top5_error", "nll", "ece", "aurc", "num_examples"}
    assert {k: got[k] for k in plain} == plain
