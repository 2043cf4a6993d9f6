import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cskd_tf import losses


def numpy_class_wise_kl(logits, pair_logits, t):
    """Independent computation: T^2 * sum q (log q - log p), in float64."""
    log_p = special.log_softmax(logits.astype(np.float64) / t, axis=-1)
    log_q = special.log_softmax(pair_logits.astype(np.float64) / t, axis=-1)
    return t**2 * np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 4.0, 10.0, 20.0])
def test_matches_numpy_on_random_logits(t):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(16, 10)).astype(np.float32)
    pair = rng.normal(scale=3.0, size=(16, 10)).astype(np.float32)
    got = losses.class_wise_kl(logits, pair, t).numpy()
    assert got.shape == (16,)
    np.testing.assert_allclose(got, numpy_class_wise_kl(logits, pair, t), rtol=2e-4, atol=1e-5)


def test_hand_computed_value():
    # Two classes, T = 1: p = softmax([0, 0]) = (1/2, 1/2), q = softmax([ln 3, 0]) = (3/4, 1/4).
    # KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2).
    got = losses.class_wise_kl([[0.0, 0.0]], [[np.log(3.0), 0.0]], 1.0).numpy()
    np.testing.assert_allclose(got, [0.75 * np.log(1.5) + 0.25 * np.log(0.5)], rtol=1e-6)
    # T = 2 scales logits by 1/2 and the result by 4: q = softmax([ln 3 / 2, 0]).
    q = np.array([np.sqrt(3), 1]) / (np.sqrt(3) + 1)
    expected = 4 * np.sum(q * np.log(q / 0.5))
    got = losses.class_wise_kl([[0.0, 0.0]], [[np.log(3.0), 0.0]], 2.0).numpy()
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_zero_for_identical_logits():
    logits = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(losses.class_wise_kl(logits, logits, 4.0), np.zeros(8), atol=1e-6)


@pytest.mark.parametrize("t", [0.1, 1.0, 20.0])
def test_stable_for_huge_logits(t):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], np.float32)
    pair = np.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, 5e3]], np.float32)
    got = losses.class_wise_kl(logits, pair, t).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, numpy_class_wise_kl(logits, pair, t), rtol=1e-4)
    assert got[1] == pytest.approx(0.0, abs=1e-3)


def test_no_gradient_to_partner():
    logits = tf.Variable(np.random.default_rng(2).normal(size=(4, 6)), dtype=tf.float32)
    pair = tf.Variable(np.random.default_rng(3).normal(size=(4, 6)), dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(losses.class_wise_kl(logits, pair, 4.0))
    g_logits, g_pair = tape.gradient(loss, [logits, pair])
    assert g_pair is None
    # d/dz [T^2 KL(q || softmax(z/T))] = T (softmax(z/T) - q).
    p = special.softmax(logits.numpy() / 4.0, axis=-1)
    q = special.softmax(pair.numpy() / 4.0, axis=-1)
    np.testing.assert_allclose(g_logits.numpy(), 4.0 * (p - q), rtol=1e-4, atol=1e-6)
