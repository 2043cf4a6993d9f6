"""Same-class pairs, sampled inside the tf.data graph.

Two modes, both yielding `((x, x_pair), y)` batches whose size counts anchors:

* `pair_dataset`: random access by index. The values may be decoded pixels
  (small sets), encoded image bytes or file paths (decoded per element, so
  memory holds at most the encoded data or only the paths: file paths scale to
  ImageNet). This is the authors' sampler exactly.
* `stream_pair_dataset`: for sources that can only be streamed (tfds
  ImageNet). Partners come from small same-class windows of the shuffled
  stream; memory is bounded by `num_classes * window` encoded images.
"""

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def _identity(x):
    return x


def _to_float(x):
    return tf.cast(x, tf.float32)


def decoder(kind):
    """Returns the function that turns one stored value into a uint8 image.

    Args:
      kind: str. `pixels` (the value is the image), `encoded` (JPEG/PNG/... bytes)
        or `path` (a file holding such bytes).
    """
    if kind == "pixels":
        return _identity
    if kind == "encoded":
        return lambda v: tf.io.decode_image(v, channels=3, expand_animations=False)
    if kind == "path":
        return lambda v: tf.io.decode_image(tf.io.read_file(v), channels=3, expand_animations=False)
    raise ValueError(f"Unknown value kind '{kind}'; expected pixels, encoded or path.")


def reader(kind, augment=None):
    """Returns the function from one stored value to a network input: decode, then augment.

    Args:
      kind: str. See `decoder`.
      augment: callable or None. Maps one uint8 image to a network input; None
        only casts to float32.
    """
    load = decoder(kind)
    augment = augment or _to_float
    return lambda value: augment(load(value))


def class_index(labels):
    """Indices grouped by class, for drawing a same-class partner by arithmetic.

    Args:
      labels: int array `[N]` of non-negative labels.

    Returns:
      `(order, starts, counts)`: `order[starts[c]:starts[c] + counts[c]]` are the
      indices of class `c`, in increasing order.
    """
    labels = np.asarray(labels, np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    return order, starts, counts


def pair_indices(labels, seed=0, shuffle=True):
    """An epoch of `(anchor, partner)` index pairs; each iteration is a new epoch.

    Anchors are all indices, shuffled; each partner is drawn uniformly from
    all indices of the anchor's class, the anchor included (so a class with a
    single sample pairs with itself), as in the authors' sampler. The same seed
    gives the same sequence of epochs.

    Args:
      labels: int array `[N]`.
      seed: int. Seeds the anchor order and the partner draws.
      shuffle: bool. Shuffle the anchors (False keeps their order).

    Returns:
      A `tf.data.Dataset` of int64 scalar pairs `(anchor, partner)`.
    """
    labels = np.asarray(labels, np.int64)
    order, starts, counts = class_index(labels)
    labels_t = tf.constant(labels)
    order_t, starts_t, counts_t = (tf.constant(a, tf.int64) for a in (order, starts, counts))

    anchors = tf.data.Dataset.range(len(labels))
    if shuffle:
        anchors = anchors.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    # One random int64 per anchor, new for every epoch.
    draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

    def partner(anchor, draw):
        y = labels_t[anchor]
        # The modulo bias is below counts / 2^63: negligible.
        offset = tf.math.floormod(draw, counts_t[y])
        return anchor, order_t[starts_t[y] + offset]

    return tf.data.Dataset.zip(anchors, draws).map(partner)


def pair_dataset(
    images,
    labels,
    batch_size,
    *,
    seed=0,
    kind="pixels",
    augment=None,
    shuffle=True,
    drop_remainder=False,
    clean=None,
):
    """Batches `((x, x_pair), y)` of same-class pairs, the authors' sampler.

    Args:
      images: array `[N, ...]`. Pixels (`kind="pixels"`), encoded image bytes
        (`"encoded"`) or file paths (`"path"`).
      labels: int array `[N]`.
      batch_size: int. Anchors per batch (a step sees as many partners).
      seed: int. Seeds anchor order and partner choice.
      kind: str. How to read one value: `pixels`, `encoded` or `path`.
      augment: callable or None. Maps one image to a network input; applied to
        anchor and partner separately, so each gets its own random draw. Create
        it once, outside this call (e.g. `cskd_tf.data.Augmenter(...).train`).
      shuffle: bool. Shuffle the anchors every epoch.
      drop_remainder: bool. Drop the last, short batch of an epoch.
      clean: callable or None. Given (e.g. `Augmenter(...).eval`), batches are
        `((x, x_pair, x_clean), y)` with `x_clean` the anchor image without
        random augmentation, for CS-KD-E's sample-wise term.

    Returns:
      A `tf.data.Dataset`; iterating it again gives the next epoch.
    """
    labels = np.asarray(labels, np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    values = tf.constant(images)
    labels_t = tf.constant(labels)
    read_one = reader(kind, augment)
    decode, augment = decoder(kind), augment or _to_float

    def read(anchor, partner):
        x_pair = read_one(tf.gather(values, partner))
        if clean is None:
            return (read_one(tf.gather(values, anchor)), x_pair), labels_t[anchor]
        image = decode(tf.gather(values, anchor))  # Decoded once, viewed twice.
        return (augment(image), x_pair, clean(image)), labels_t[anchor]

    ds = pair_indices(labels, seed=seed, shuffle=shuffle)
    ds = ds.map(read, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)


def stream_pair_dataset(
    dataset,
    batch_size,
    *,
    window=4,
    seed=0,
    kind="encoded",
    augment=None,
    shuffle_buffer=10_000,
    drop_remainder=False,
):
    """Same-class pairs from a stream that allows no random access.

    The stream is shuffled, cut into windows of up to `window` consecutive
    same-class elements (`group_by_window`), and each element's partner is drawn
    uniformly from its window, itself included. Every element is an anchor once
    per pass. Partners therefore come from a random subset of the class rather
    than the whole class; memory holds at most `num_classes * window` elements.

    Args:
      dataset: `tf.data.Dataset` of `(value, label)`.
      batch_size: int. Anchors per batch.
      window: int. Same-class elements a partner is drawn from.
      seed: int. Seeds the shuffles and partner draws.
      kind: str. How to read one value (see `pair_dataset`).
      augment: callable or None. As in `pair_dataset`.
      shuffle_buffer: int. Shuffle buffer before and after grouping.
      drop_remainder: bool. Drop the last, short batch.

    Returns:
      A `tf.data.Dataset` of `((x, x_pair), y)`.
    """
    read_one = reader(kind, augment)
    ds = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.group_by_window(
        key_func=lambda value, label: tf.cast(label, tf.int64),
        reduce_func=lambda key, group: group.batch(window),
        window_size=window,
    )
    draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

    def pair_in_window(group, draw):
        values, labels = group
        n = tf.shape(labels)[0]
        partners = tf.random.stateless_uniform(
            [n], seed=tf.stack([draw, 0]), minval=0, maxval=n, dtype=tf.int32
        )
        return tf.data.Dataset.from_tensor_slices((values, tf.gather(values, partners), labels))

    ds = tf.data.Dataset.zip(ds, draws).flat_map(pair_in_window)
    # Windows leave the grouping one class at a time: mix them again.
    ds = ds.shuffle(shuffle_buffer, seed=seed + 2, reshuffle_each_iteration=True)

    def read(value, partner_value, label):
        return (read_one(value), read_one(partner_value)), tf.cast(label, tf.int64)

    ds = ds.map(read, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)


def example_dataset(
    images,
    labels,
    batch_size,
    *,
    seed=0,
    kind="pixels",
    augment=None,
    shuffle=False,
    shuffle_buffer=10_000,
):
    """Batches `(x, y)` of single examples: cross-entropy training and evaluation.

    Args:
      images: array `[N, ...]` (see `pair_dataset`) or a `tf.data.Dataset` of
        `(value, label)` for streamed sources.
      labels: int array `[N]`, or None when `images` is a dataset.
      batch_size: int.
      seed: int. Seeds the shuffle.
      kind: str. How to read one value (see `pair_dataset`).
      augment: callable or None. Maps one image to a network input.
      shuffle: bool. Shuffle every epoch (training); False keeps the order.
      shuffle_buffer: int. Buffer size when `images` is a stream.
    """
    read_one = reader(kind, augment)
    if isinstance(images, tf.data.Dataset):
        ds = images
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        read = lambda v, y: (read_one(v), tf.cast(y, tf.int64))
    else:
        values = tf.constant(images)
        labels_t = tf.constant(np.asarray(labels, np.int64))
        ds = tf.data.Dataset.range(len(labels))
        if shuffle:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        read = lambda i: (read_one(tf.gather(values, i)), labels_t[i])
    ds = ds.map(read, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def split_dataset(split, batch_size, **kwargs):
    """`example_dataset` of a `Split` (arrays) or a `StreamSplit` (a stream).

    Args:
      split: Split or StreamSplit (`cskd_tf.data.sources`).
      batch_size: int.
      **kwargs: forwarded to `example_dataset` (`augment`, `shuffle`, `seed`).
    """
    if hasattr(split, "make"):  # A stream.
        return example_dataset(split.make(), None, batch_size, kind=split.kind, **kwargs)
    return example_dataset(split.values, split.labels, batch_size, kind=split.kind, **kwargs)
