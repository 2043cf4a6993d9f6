"""Loss terms of CS-KD, as pure per-example functions (the caller reduces)."""

import math

import keras
import tensorflow as tf


# The largest temperature the KL terms are checked to be exact at (float32 against float64,
# tests/test_losses.py); the training flags refuse larger ones (cskd_tf.methods.base). The paper
# sweeps T from 0.1 to 20.
MAX_TEMPERATURE = 1000.0


def class_wise_kl(logits, pair_logits, temperature=4.0):
    """Class-wise self-distillation term, one value per example.

    Computes `T^2 * KL(softmax(pair_logits / T) || softmax(logits / T))` over the
    last axis. The partner's logits are a fixed target: no gradient flows
    through `pair_logits`.

    Computed as `kl_divergence` does: finite for logits of any magnitude and for
    temperatures far below 1, and exact in float32 up to `MAX_TEMPERATURE`, where
    the two softened distributions are nearly equal and a plain `sum(q * (log q -
    log p))` would lose every digit to cancellation.

    Args:
      logits: float tensor `[batch, classes]`. Predictions on the anchors.
      pair_logits: float tensor `[batch, classes]`. Predictions on the partners
        (other samples of the same class).
      temperature: float. Softening temperature, `0 < T <= MAX_TEMPERATURE`.

    Returns:
      A float32 tensor `[batch]`.

    Raises:
      ValueError: for a (Python number) temperature outside `(0, MAX_TEMPERATURE]`.

    Reference: Yun et al., "Regularizing Class-wise Predictions via
    Self-knowledge Distillation", CVPR 2020, eq. (1).
    """
    # T^2 keeps the gradient's scale independent of T (Hinton et al., 2015).
    return temperature**2 * kl_divergence(tf.stop_gradient(pair_logits), logits, temperature)


def kl_divergence(target_logits, logits, temperature=1.0):
    """`KL(softmax(target_logits / T) || softmax(logits / T))` per example, gradient through both.

    The plain divergence, without `T^2` and without a fixed target: the ICLR
    submission's sample-wise term `L_sam` is written this way (both
    distributions from the trained network).

    Computed without cancellation. With `q = softmax(a / T)`, `d = (a - b) / T`
    and `e = d - E_q[d]`, `KL = E_q[e] + log E_q[exp(-e)]` exactly; when the two
    distributions are close (large T, similar logits) this is
    `s + log1p(s - m) - (s - m)` with `s = E_q[exp(-e) - 1 + e]` and `m = E_q[e]`
    (about 0), each part from series that never subtract nearly equal numbers;
    otherwise `m + logsumexp(log q - e)`, finite for logits of any size. The
    gradient is written out the same way (`(p - q) / T` as `q * expm1(...) / T`).

    Args:
      target_logits: float tensor `[batch, classes]`. Logits of the target distribution.
      logits: float tensor `[batch, classes]`. Logits of the distribution fitted to it.
      temperature: float. `0 < T <= MAX_TEMPERATURE`.

    Returns:
      A float32 tensor `[batch]`.

    Raises:
      ValueError: for a (Python number) temperature outside `(0, MAX_TEMPERATURE]`.
    """
    if isinstance(temperature, (int, float)) and not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(
            f"The temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature}: above "
            f"{MAX_TEMPERATURE:g} the KL terms are not checked to be exact in float32."
        )
    t = tf.cast(temperature, tf.float32)
    return _kl(tf.cast(target_logits, tf.float32), tf.cast(logits, tf.float32), t)


# exp(x) - 1 - x = x^2 * sum_k x^k / (k + 2)!, for |x| <= 1 (the next term is below 1e-11).
_EXPM1_MINUS_X = [1.0 / math.factorial(k + 2) for k in range(12)]
# log1p(u) - u = u^2 * sum_k (-1)^(k + 1) u^k / (k + 2), for |u| <= 1/8 (error below 1e-9).
_LOG1P_MINUS_U = [(-1.0) ** (k + 1) / (k + 2) for k in range(8)]


def _series(x, coefficients):
    out = tf.zeros_like(x)
    for c in reversed(coefficients):
        out = out * x + c
    return x * x * out


def _expm1_minus_x(x):
    """`exp(x) - 1 - x` to a few ulps for `x <= 1` (series near 0, where it cancels)."""
    near = tf.abs(x) <= 1.0
    series = _series(tf.clip_by_value(x, -1.0, 1.0), _EXPM1_MINUS_X)
    return tf.where(near, series, tf.math.expm1(x) - x)


def _log1p_minus_u(u):
    """`log1p(u) - u` to a few ulps (series near 0, where it cancels)."""
    near = tf.abs(u) <= 0.125
    return tf.where(
        near, _series(tf.clip_by_value(u, -0.125, 0.125), _LOG1P_MINUS_U), tf.math.log1p(u) - u
    )


def _log_softmax(z, t):
    # The largest logit off before dividing: the leading classes' exponents keep their digits.
    return tf.nn.log_softmax((z - tf.reduce_max(z, axis=-1, keepdims=True)) / t, axis=-1)


def _kl_parts(a, b, t):
    """`(KL, q, e, m)` of `KL(softmax(a / t) || softmax(b / t))` along the last axis."""
    log_q = _log_softmax(a, t)
    q = tf.exp(log_q)
    d = (a - b) / t  # The logits' difference first: exact when they are close.
    e = d - tf.reduce_sum(q * d, axis=-1, keepdims=True)
    m = tf.reduce_sum(q * e, axis=-1)  # 0 but for rounding; kept, so the identity stays exact.
    # s = E_q[exp(-e) - 1 + e] >= 0, term by term without overflow: a class whose -e is large
    # has its term from log q - e.
    x = -e
    small = q * _expm1_minus_x(tf.minimum(x, 1.0))
    big = tf.maximum(x, 1.0)  # exp(x) - 1 - x = -exp(x) * expm1(log1p(x) - x).
    large = tf.exp(log_q + big) * -tf.math.expm1(tf.math.log1p(big) - big)
    s = tf.reduce_sum(tf.where(x <= 1.0, small, large), axis=-1)
    close = s <= 1.0
    u = tf.where(close, s - m, 0.0)
    near = s + _log1p_minus_u(u)  # m + log1p(s - m) = s + (log1p(u) - u).
    far = m + tf.reduce_logsumexp(log_q + x, axis=-1)  # m + log E_q[exp(-e)].
    return tf.where(close, near, far), q, e, m


@tf.custom_gradient
def _kl(a, b, t):
    kl, q, e, m = _kl_parts(a, b, t)

    def grad(upstream):
        g = upstream[..., None] / t
        # d KL / d a_i = q_i (log q_i - log p_i - KL) / t = q_i (e_i - m) / t.
        grad_a = g * q * (e - m[..., None])
        # d KL / d b_i = (p_i - q_i) / t, with p_i = q_i exp(-r_i), r_i = log q_i - log p_i.
        r = e + (kl - m)[..., None]
        near = tf.abs(r) <= 1.0
        p = tf.exp(_log_softmax(b, t))
        p_minus_q = tf.where(near, q * tf.math.expm1(-tf.clip_by_value(r, -1.0, 1.0)), p - q)
        return grad_a, g * p_minus_q, None

    return kl, grad


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Cross-entropy from logits, one value per example, with optional label smoothing.

    The target is `(1 - eps) * one_hot(label) + eps / C`, as `torch.nn.CrossEntropyLoss(
    label_smoothing=eps)` and Keras' `CategoricalCrossentropy(label_smoothing=eps)` use.

    Args:
      logits: float tensor `[batch, classes]`.
      labels: class ids `[batch]` (or `[batch, 1]`, any dtype), or float soft
        targets `[batch, classes]` (e.g. Mixup's).
      label_smoothing: float in [0, 1]. `eps`; 0 is plain cross-entropy.

    Returns:
      A float32 tensor `[batch]`.

    Reference: Szegedy et al., "Rethinking the Inception Architecture for
    Computer Vision", CVPR 2016, section 7.
    """
    logits = tf.cast(logits, tf.float32)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    classes = tf.shape(logits)[-1]
    labels = tf.convert_to_tensor(labels)
    # Keras hands losses float labels, so tell soft targets from class ids by their shape.
    if labels.shape.rank == 2 and labels.shape[-1] != 1:
        target = tf.cast(labels, tf.float32)
    else:
        target = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), classes)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / tf.cast(classes, tf.float32)
    return -tf.reduce_sum(target * log_p, axis=-1)


def entropy(logits):
    """Entropy `H(softmax(logits))` in nats, one value per example (from log_softmax).

    The maximum-entropy baseline (confidence penalty) minimises `CE - beta * H`.

    Reference: Pereyra et al., "Regularizing Neural Networks by Penalizing
    Confident Output Distributions", ICLR 2017 workshop.
    """
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    return -tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1)


@keras.saving.register_keras_serializable(package="cskd_tf")
class ClassificationLoss(keras.losses.Loss):
    """Cross-entropy on logits with label smoothing and a confidence penalty, as a Keras loss.

    `CE_eps(logits, y) - beta * H(softmax(logits))` per example, reduced by
    Keras (so it divides by the replica count under a strategy). `y` may be
    integer labels or soft targets `[batch, classes]` (Mixup).

    Args:
      label_smoothing: float in [0, 1]. Label-smoothing baseline: 0.1 is usual.
      entropy_weight: float >= 0. `beta` of the maximum-entropy baseline.
      **kwargs: forwarded to `keras.losses.Loss` (`name`, `reduction`).
    """

    def __init__(
        self, label_smoothing=0.0, entropy_weight=0.0, name="classification_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.entropy_weight = float(entropy_weight)

    def call(self, y_true, y_pred):
        loss = cross_entropy(y_pred, y_true, self.label_smoothing)
        if self.entropy_weight:
            loss -= self.entropy_weight * entropy(y_pred)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(label_smoothing=self.label_smoothing, entropy_weight=self.entropy_weight)
        return config
