"""Mixup as a batch transform: each batch mixed with a permutation of itself.

The per-batch randomness (a key per batch, and `lam ~ Beta(alpha, alpha)` and a permutation
drawn from it) is shared with CutMix (`cskd_tf.data.cutmix`).
"""

import tensorflow as tf


def map_batches(dataset, transform, seed=0, first_batch=None):
    """Maps `transform(batch, key)` over `dataset`, with one random key per batch.

    Args:
      dataset: tf.data.Dataset of batches.
      transform: Callable `(batch, key) -> batch`; `key` is an int64 scalar.
      seed: int.
      first_batch: int or None. None: the keys change every time the dataset is iterated.
        An int: batch `i` of the dataset gets the key `first_batch + i`, so the draws of a
        given training step are the same whenever it runs (the dataset of a resumed run
        starts at its step).

    Returns:
      tf.data.Dataset of the transformed batches.
    """
    if first_batch is None:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    else:
        keys = tf.data.Dataset.counter(first_batch)
    return tf.data.Dataset.zip((dataset, keys)).map(transform, num_parallel_calls=tf.data.AUTOTUNE)


def draw(seed, key, alpha, batch_size, extra=0):
    """One batch's `lam ~ Beta(alpha, alpha)` and permutation, stateless in `(seed, key)`.

    Args:
      seed: int or int scalar tensor.
      key: int64 scalar tensor. The batch's key (`map_batches`).
      alpha: float > 0.
      batch_size: int32 tensor `[1]`, the shape of the permutation.
      extra: int. Further stateless seeds to return, for the caller's own draws.

    Returns:
      (lam float32 scalar, permutation int32 `[batch]`, seeds int64 `[extra, 2]`).
    """
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.cast(seed, tf.int64), key]), 3 + extra
    )
    # Beta(a, a) as the ratio of two Gamma(a) draws.
    g1 = tf.random.stateless_gamma([], seeds[0], alpha)
    g2 = tf.random.stateless_gamma([], seeds[1], alpha)
    lam = g1 / (g1 + g2)
    permutation = tf.argsort(tf.random.stateless_uniform(batch_size, seeds[2]))
    return lam, permutation, seeds[3:]


def mix_labels(labels, num_classes, lam, permutation):
    """`lam * one_hot(y) + (1 - lam) * one_hot(y[permutation])`, float32 `[batch, C]`."""
    return _mix(tf.one_hot(tf.cast(labels, tf.int32), num_classes), lam, permutation)


def _mix(v, lam, permutation):
    lam = tf.cast(lam, tf.float32)
    v = tf.cast(v, tf.float32)
    return lam * v + (1.0 - lam) * tf.gather(v, permutation)


def mix_batch(x, labels, num_classes, lam, permutation):
    """Mixes a batch: `lam * v + (1 - lam) * v[permutation]` for inputs and one-hot labels.

    Args:
      x: float tensor `[batch, ...]`, or a tuple of them (anchors and partners),
        all mixed with the same `lam` and `permutation`.
      labels: int tensor `[batch]`.
      num_classes: int.
      lam: float scalar tensor in [0, 1].
      permutation: int tensor `[batch]`.

    Returns:
      (mixed x, soft labels `[batch, num_classes]` float32).
    """
    mix = lambda v: _mix(v, lam, permutation)  # noqa: E731
    mixed = tuple(mix(v) for v in x) if isinstance(x, (tuple, list)) else mix(x)
    return mixed, mix_labels(labels, num_classes, lam, permutation)


def mixup(dataset, num_classes, alpha=1.0, seed=0, first_batch=None):
    """Applies Mixup to every batch of `dataset`.

    Each batch draws one `lam ~ Beta(alpha, alpha)` and one permutation
    (Zhang et al.), from stateless draws keyed by `seed` and a per-batch random
    number that changes every epoch: the same seed gives the same mixing.
    With pairs `((x, x_pair), y)` the partners are mixed with the anchors'
    `lam` and permutation, so the partner of a mixed anchor is the same mix of
    the two anchors' partners: CS-KD's class-wise term then applies to mixed
    inputs and mixed labels, as in the paper's Table 3.

    Args:
      dataset: tf.data.Dataset of batches `(x, y)` or `((x, x_pair), y)`, integer labels.
      num_classes: int.
      alpha: float > 0. Beta parameter (1.0 for CIFAR in Zhang et al.).
      seed: int.
      first_batch: int or None. None: the per-batch random numbers change every
        time the dataset is iterated. An int: batch `i` of the dataset is keyed
        by `first_batch + i`, so the mixing of a given training step is the same
        whenever it runs (the dataset of a resumed run starts at its step).

    Returns:
      tf.data.Dataset of the same batches with mixed inputs and soft labels `[batch, C]`.

    Reference: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    """

    def transform(batch, key):
        x, labels = batch
        lam, permutation, _ = draw(seed, key, alpha, tf.shape(labels)[:1])
        return mix_batch(x, labels, num_classes, lam, permutation)

    return map_batches(dataset, transform, seed=seed, first_batch=first_batch)
