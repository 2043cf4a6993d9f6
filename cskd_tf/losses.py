"""Loss terms of CS-KD, as pure per-example functions (the caller reduces)."""

import keras
import tensorflow as tf


def class_wise_kl(logits, pair_logits, temperature=4.0):
    """Class-wise self-distillation term, one value per example.

    Computes `T^2 * KL(softmax(pair_logits / T) || softmax(logits / T))` over the
    last axis. The partner's logits are a fixed target: no gradient flows
    through `pair_logits`.

    Both distributions come from `log_softmax`, so the value stays finite for
    logits of any magnitude and for temperatures far below 1 (no probability is
    ever clipped or passed through `log`).

    Args:
      logits: float tensor `[batch, classes]`. Predictions on the anchors.
      pair_logits: float tensor `[batch, classes]`. Predictions on the partners
        (other samples of the same class).
      temperature: float. Softening temperature `T > 0`.

    Returns:
      A float32 tensor `[batch]`.

    Reference: Yun et al., "Regularizing Class-wise Predictions via
    Self-knowledge Distillation", CVPR 2020, eq. (1).
    """
    # T^2 keeps the gradient's scale independent of T (Hinton et al., 2015).
    return temperature**2 * kl_divergence(tf.stop_gradient(pair_logits), logits, temperature)


def kl_divergence(target_logits, logits, temperature=1.0):
    """`KL(softmax(target_logits / T) || softmax(logits / T))` per example, gradient through both.

    The plain divergence, without `T^2` and without a fixed target: the ICLR
    submission's sample-wise term `L_sam` is written this way (both
    distributions from the trained network). From `log_softmax`, so finite for
    any logits.

    Args:
      target_logits: float tensor `[batch, classes]`. Logits of the target distribution.
      logits: float tensor `[batch, classes]`. Logits of the distribution fitted to it.
      temperature: float. `T > 0`.

    Returns:
      A float32 tensor `[batch]`.
    """
    log_q = tf.nn.log_softmax(tf.cast(target_logits, tf.float32) / temperature, axis=-1)
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
    return tf.reduce_sum(tf.exp(log_q) * (log_q - log_p), axis=-1)


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
