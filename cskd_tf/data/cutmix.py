"""CutMix as a batch transform: a box of each batch pasted from a permutation of itself.

Each batch draws, statelessly in the seed and the batch's key as Mixup does
(`cskd_tf.data.mixup.map_batches` and `draw`), one `lam ~ Beta(alpha, alpha)`, one
permutation and one box, and is cut with probability `prob`. The box follows the authors'
code (clovaai/CutMix-PyTorch, `train.py`, `rand_bbox`): sides `int(H * sqrt(1 - lam))` and
`int(W * sqrt(1 - lam))`, a centre drawn uniformly among the pixels, the box clipped at the
image border, and the label weight recomputed from the clipped area,
`lam = 1 - box area / (H * W)`, so that it is exactly the share of the anchor's pixels left.
"""

import tensorflow as tf

from cskd_tf.data import mixup


def box(height, width, lam, center_y, center_x):
    """The box `[y1, y2) x [x1, x2)` the authors' code cuts for `lam`, clipped at the border.

    Args:
      height, width: int scalars. The images' size.
      lam: float scalar in [0, 1]. The drawn combination ratio.
      center_y, center_x: int scalars in `[0, height)` and `[0, width)`.

    Returns:
      int32 tensor `[4]`: `(y1, y2, x1, x2)`.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    ratio = tf.sqrt(1.0 - tf.cast(lam, tf.float32))
    # `np.int(W * cut_rat)`: truncation, and half of it on each side of the centre.
    cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
    cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
    center_y = tf.cast(center_y, tf.int32)
    center_x = tf.cast(center_x, tf.int32)
    y1 = tf.clip_by_value(center_y - cut_h // 2, 0, height)
    y2 = tf.clip_by_value(center_y + cut_h // 2, 0, height)
    x1 = tf.clip_by_value(center_x - cut_w // 2, 0, width)
    x2 = tf.clip_by_value(center_x + cut_w // 2, 0, width)
    return tf.stack([y1, y2, x1, x2])


def box_lambda(cut, height, width):
    """`1 - area / (H * W)` of a box `(y1, y2, x1, x2)`: the share of the anchor kept."""
    area = (cut[1] - cut[0]) * (cut[3] - cut[2])
    return 1.0 - tf.cast(area, tf.float32) / tf.cast(height * width, tf.float32)


def cut_batch(x, labels, num_classes, cut, permutation):
    """Pastes the box `cut` of `v[permutation]` into every `v` of `x`; mixes the labels.

    Args:
      x: float tensor `[batch, height, width, channels]`, or a tuple of them (anchors and
        partners), all cut with the same box and permutation.
      labels: int tensor `[batch]`.
      num_classes: int.
      cut: int tensor `[4]`, `(y1, y2, x1, x2)` (`box`).
      permutation: int tensor `[batch]`.

    Returns:
      (cut x (float32), soft labels `[batch, num_classes]` float32, the area's `lam`).
    """
    first = x[0] if isinstance(x, (tuple, list)) else x
    height, width = tf.shape(first)[1], tf.shape(first)[2]
    rows = tf.range(height)
    cols = tf.range(width)
    inside = ((rows >= cut[0]) & (rows < cut[1]))[:, None] & ((cols >= cut[2]) & (cols < cut[3]))
    inside = inside[None, :, :, None]

    def paste(v):
        v = tf.cast(v, tf.float32)
        return tf.where(inside, tf.gather(v, permutation), v)

    lam = box_lambda(cut, height, width)
    pasted = tuple(paste(v) for v in x) if isinstance(x, (tuple, list)) else paste(x)
    return pasted, mixup.mix_labels(labels, num_classes, lam, permutation), lam


def draw(seed, key, alpha, prob, batch_size, height, width):
    """One batch's CutMix draws, stateless in `(seed, key)`.

    Args:
      seed: int.
      key: int64 scalar tensor. The batch's key.
      alpha: float > 0. `lam ~ Beta(alpha, alpha)`.
      prob: float in [0, 1]. Probability that the batch is cut (else the box is empty).
      batch_size: int32 tensor `[1]`.
      height, width: int scalars.

    Returns:
      (drawn lam float32, permutation int32 `[batch]`, box int32 `[4]`, applied bool).
    """
    lam, permutation, seeds = mixup.draw(seed, key, alpha, batch_size, extra=3)
    center_y = tf.random.stateless_uniform([], seeds[0], 0, height, dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], seeds[1], 0, width, dtype=tf.int32)
    # As the authors' `r = np.random.rand(1); if r < cutmix_prob`.
    applied = tf.random.stateless_uniform([], seeds[2]) < prob
    cut = tf.where(applied, box(height, width, lam, center_y, center_x), tf.zeros([4], tf.int32))
    return lam, permutation, cut, applied


def cutmix(dataset, num_classes, alpha=1.0, prob=1.0, seed=0, first_batch=None):
    """Applies CutMix to every batch of `dataset` (with probability `prob`).

    With pairs `((x, x_pair), y)` the partners are cut with their anchors' box, `lam` and
    permutation, so the partner of a cut anchor is the same cut of the two anchors'
    partners, and CS-KD's class-wise term applies to cut inputs and mixed labels (as
    `cskd_tf.data.mixup` does for Mixup). A batch that is not cut keeps its images and gets
    one-hot labels, so every batch has the same structure.

    Args:
      dataset: tf.data.Dataset of batches `(x, y)` or `((x, x_pair), y)`, NHWC images,
        integer labels.
      num_classes: int.
      alpha: float > 0. Beta parameter (1.0 in Yun et al., section 3.1, and their code).
      prob: float in [0, 1]. Probability of cutting a batch (the authors' `cutmix_prob`:
        0.5 in their CIFAR command, 1.0 in their ImageNet one).
      seed: int.
      first_batch: int or None. As in `cskd_tf.data.mixup.mixup`.

    Returns:
      tf.data.Dataset of the same batches with cut inputs and soft labels `[batch, C]`.

    Reference: Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", ICCV 2019, section 3.1 (and the authors' code).
    """

    def transform(batch, key):
        x, labels = batch
        first = x[0] if isinstance(x, (tuple, list)) else x
        shape = tf.shape(first)
        _, permutation, cut, _ = draw(seed, key, alpha, prob, shape[:1], shape[1], shape[2])
        pasted, soft, _ = cut_batch(x, labels, num_classes, cut, permutation)
        return pasted, soft

    return mixup.map_batches(dataset, transform, seed=seed, first_batch=first_batch)
