"""Loss terms of CS-KD, as pure per-example functions (the caller reduces)."""

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
    logits = tf.cast(logits, tf.float32)
    pair_logits = tf.stop_gradient(tf.cast(pair_logits, tf.float32))
    log_p = tf.nn.log_softmax(logits / temperature, axis=-1)
    log_q = tf.nn.log_softmax(pair_logits / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_q) * (log_q - log_p), axis=-1)
    # T^2 keeps the gradient's scale independent of T (Hinton et al., 2015).
    return temperature**2 * kl
