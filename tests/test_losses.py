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


# --- Exactness up to the largest temperature -------------------------------------------------


def float64_class_wise_kl(logits, pair_logits, t):
    """T^2 * KL in float64 of the float32 inputs, without cancellation: with q the partner's
    softmax, d = (pair - logits) / T and e = d - E_q[d], KL = log E_q[exp(-e)] = log1p(E_q[
    expm1(-e) + e]) (E_q[e] = 0). Where the distributions are far apart (that sum above 1), the
    plain sum, which is then exact to float64's precision."""
    a, b = pair_logits.astype(np.float64), logits.astype(np.float64)
    q = special.softmax(a / t, axis=-1)
    d = (a - b) / t
    e = d - np.sum(q * d, axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.sum(q * (np.expm1(-e) + e), axis=-1)
        close = t**2 * np.log1p(s)
    return np.where(s <= 1, close, numpy_class_wise_kl(logits, pair_logits, t))


def float64_gradient(logits, pair_logits, t):
    """d/d logits of T^2 KL: T (p - q), as q expm1(log p - log q) where p and q are close."""
    log_q = special.log_softmax(pair_logits.astype(np.float64) / t, axis=-1)
    log_p = special.log_softmax(logits.astype(np.float64) / t, axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        close = np.exp(log_q) * np.expm1(log_p - log_q)
    return t * np.where(np.abs(log_p - log_q) <= 1, close, np.exp(log_p) - np.exp(log_q))


TEMPERATURES = [0.1, 0.5, 1.0, 4.0, 20.0, 100.0, 1000.0]
# The worst relative error measured over 10, 100 and 1000 classes, logits of standard deviation 1
# to 30, partners independent or equal but for noise of 1e-3 to 1 of that: 4.6e-5 (value) and
# 4.3e-5 (gradient, of each row's largest) at T = 0.1, where logits / T reach 10^3 and float32's
# rounding of them is what remains; 6e-6 and 6e-6 at T = 1; 1.4e-6 and 2e-6 at T >= 4. Before,
# as sum(q * (log q - log p)) of log_softmax, the value was wrong by a factor of 3e5 at T = 1000.
VALUE_RTOL = {0.1: 2e-4, 0.5: 5e-5}
GRADIENT_RTOL = {0.1: 2e-4, 0.5: 1e-4}


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("noise", [None, 1.0, 1e-2, 1e-3])
def test_exact_against_float64_up_to_the_largest_temperature(t, noise):
    rng = np.random.default_rng(int(t * 10) + (0 if noise is None else int(-np.log10(noise)) + 1))
    logits = rng.normal(scale=10.0, size=(64, 100)).astype(np.float32)
    # Independent partners, or partners that nearly agree with their anchors (KL ~ noise^2).
    pair = rng.normal(scale=10.0, size=logits.shape) if noise is None else (
        logits + rng.normal(scale=10.0 * noise, size=logits.shape)
    )  # fmt: skip
    pair = pair.astype(np.float32)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        got = losses.class_wise_kl(variable, pair, t)
        total = tf.reduce_sum(got)
    gradient = tape.gradient(total, variable).numpy()
    t32 = float(np.float32(t))  # The temperature the float32 computation divides by.
    expected = float64_class_wise_kl(logits, pair, t32)
    # Values below 1e-12 T^2 are float32's zero here (they cannot move a weight).
    floor = 1e-12 * t32**2
    error = np.abs(got.numpy() - expected) / (np.abs(expected) + floor)
    assert np.max(error) <= VALUE_RTOL.get(t, 1e-5), np.max(error)
    expected_gradient = float64_gradient(logits, pair, t32)
    scale = np.max(np.abs(expected_gradient), axis=-1, keepdims=True) + 1e-6 * t32
    gradient_error = np.abs(gradient - expected_gradient) / scale
    assert np.max(gradient_error) <= GRADIENT_RTOL.get(t, 1e-5), np.max(gradient_error)


def test_exact_where_the_plain_sum_cancels():
    # T = 1000 and partners 0.01 away: the plain float32 sum(q * (log q - log p)) is off by
    # orders of magnitude (each log q - log p ~ 1e-5, their weighted sum ~ 1e-10).
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=5.0, size=(32, 10)).astype(np.float32)
    pair = (logits + rng.normal(scale=0.01, size=logits.shape)).astype(np.float32)
    t = 1000.0
    expected = float64_class_wise_kl(logits, pair, t)
    log_q = tf.nn.log_softmax(pair / t)
    plain = (t**2 * tf.reduce_sum(tf.exp(log_q) * (log_q - tf.nn.log_softmax(logits / t)), -1))
    assert np.max(np.abs(plain.numpy() - expected) / expected) > 1.0
    np.testing.assert_allclose(losses.class_wise_kl(logits, pair, t), expected, rtol=1e-5)


def test_kl_divergence_is_exact_and_its_gradient_reaches_both_sides():
    rng = np.random.default_rng(8)
    target = tf.Variable(rng.normal(scale=3.0, size=(8, 20)).astype(np.float32))
    logits = tf.Variable((target.numpy() + rng.normal(scale=0.05, size=(8, 20))).astype(np.float32))
    t = 200.0
    with tf.GradientTape() as tape:
        value = losses.kl_divergence(target, logits, t)
        total = tf.reduce_sum(value)
    g_target, g_logits = tape.gradient(total, [target, logits])
    expected = float64_class_wise_kl(logits.numpy(), target.numpy(), t) / t**2
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
    # d KL / d logits = (p - q) / T; d KL / d target_i = q_i (log q_i - log p_i - KL) / T.
    np.testing.assert_allclose(
        g_logits.numpy(), float64_gradient(logits.numpy(), target.numpy(), t) / t**2, rtol=1e-4,
        atol=1e-12,
    )  # fmt: skip
    log_q = special.log_softmax(target.numpy().astype(np.float64) / t, axis=-1)
    log_p = special.log_softmax(logits.numpy().astype(np.float64) / t, axis=-1)
    d = (target.numpy().astype(np.float64) - logits.numpy()) / t
    centred = d - np.sum(np.exp(log_q) * d, axis=-1, keepdims=True)  # log q - log p - KL.
    np.testing.assert_allclose(g_target.numpy(), np.exp(log_q) * centred / t, rtol=1e-4,
                               atol=1e-12)  # fmt: skip


def test_exact_under_xla_and_in_a_tf_function():
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=4.0, size=(16, 10)).astype(np.float32)
    pair = (logits + rng.normal(scale=0.1, size=logits.shape)).astype(np.float32)
    expected = float64_class_wise_kl(logits, pair, 500.0)
    for jit in (False, True):
        fn = tf.function(lambda a, b: losses.class_wise_kl(a, b, 500.0), jit_compile=jit)
        np.testing.assert_allclose(fn(logits, pair), expected, rtol=1e-5)


@pytest.mark.parametrize("t", [0.0, -1.0, 1000.5, 1e9])
def test_a_temperature_outside_the_exact_range_is_refused(t):
    with pytest.raises(ValueError, match=r"must be in \(0, 1000\]"):
        losses.class_wise_kl(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32), t)


def test_every_temperature_flag_is_bounded_by_the_exact_range():
    from cskd_tf import methods  # pylint: disable=g-import-not-at-top
    from cskd_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    from cskd_tf.methods import base  # pylint: disable=g-import-not-at-top

    assert base.MAX_TEMPERATURE == losses.MAX_TEMPERATURE
    names = [n for n in methods.flags() if n.endswith("temperature")]
    assert sorted(names) == [
        "dlb_temperature", "kd_temperature", "temperature", "tf_kd_temperature"
    ]  # fmt: skip
    for name in names:
        flag = methods.flags()[name]
        flag.validate(name, 0.1)
        flag.validate(name, losses.MAX_TEMPERATURE)
        with pytest.raises(UserError, match=rf"^--{name} must be > 0, got 0.0\.$"):
            flag.validate(name, 0.0)
        with pytest.raises(UserError) as err:
            flag.validate(name, 1e9)
        assert str(err.value) == (
            f"--{name} must be <= 1000, got 1000000000.0: the distillation losses are checked "
            f"to be exact in float32 up to T = 1000 only (the paper's temperatures go from 0.1 "
            f"to 20)."
        )
