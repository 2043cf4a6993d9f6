"""Same-class pairs, sampled inside the tf.data graph.

Two modes, both yielding `((x, x_pair), y)` batches whose size counts anchors:

* `pair_dataset`: random access by index. The values may be decoded pixels
  (small sets), encoded image bytes or file paths (decoded per element, so
  memory holds at most the encoded data or only the paths: file paths scale to
  ImageNet). This is the authors' sampler exactly.
* `stream_pair_dataset`: for sources that can only be streamed (tfds
  ImageNet). Partners come from small same-class windows of the shuffled
  stream; memory is bounded by `num_classes * window` encoded images.

`example_dataset` gives single examples (optionally with their index in the
training set), and `previous_batch_dataset` DLB's batches: the previous step's
examples under a second augmentation, then this step's.

Every random choice of an epoch (anchor order, partners, each view's
augmentation seed) is a stateless function of a key. By default each
iteration of a dataset draws a new key, so iterating it again gives the next
epoch, as `model.fit` expects. Given `epochs=range(first, last)`, the dataset
instead holds exactly those epochs back to back, epoch `e` keyed by
`(seed, e)`, optionally without its first `skip` batches: a run resumed at any
step then sees exactly the batches an uninterrupted run would.
"""

import functools
import inspect

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
PARTNERS = ("class", "self")  # `pair_dataset`'s partner of an anchor: its class, or itself.


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


def takes_seed(augment):
    """Whether `augment` accepts a per-image `seed` (as `Augmenter.train` does)."""
    try:
        return "seed" in inspect.signature(augment).parameters
    except (TypeError, ValueError):
        return False


def reader(kind, augment=None):
    """Returns the function `(value, seed)` -> network input: decode, then augment.

    Args:
      kind: str. See `decoder`.
      augment: callable or None. Maps one uint8 image to a network input; it
        gets the view's stateless seed as `seed=` if it takes one. None only
        casts to float32.
    """
    load = decoder(kind)
    augment = augment or _to_float
    if takes_seed(augment):
        return lambda value, seed: augment(load(value), seed=seed)
    return lambda value, seed: augment(load(value))


def _check_epochs(epochs, skip):
    """Returns `epochs` (None or a non-empty `range` with step 1); ValueError otherwise."""
    if epochs is None:
        if skip:
            raise ValueError("skip needs an explicit range of epochs.")
        return None
    if not isinstance(epochs, range) or epochs.step != 1 or not len(epochs):
        raise ValueError(f"epochs must be a non-empty range(first, last), got {epochs!r}.")
    return epochs


def _epoch_keys(seed, epochs, skip):
    """`(key, skip)` per epoch: a fresh random key per iteration, or `(seed, e)` for `e` in epochs."""
    seed = int(seed)
    if _check_epochs(epochs, skip) is None:
        fresh = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        return fresh.map(
            lambda r: (tf.stack([tf.constant(seed, tf.int64), r]), tf.constant(0, tf.int64))
        )
    first = epochs.start

    def key(epoch):
        return (
            tf.stack([tf.constant(seed, tf.int64), epoch]),
            tf.where(epoch == first, tf.constant(skip, tf.int64), 0),
        )

    return tf.data.Dataset.range(epochs.start, epochs.stop).map(key)


def _draws(key, index, shape, dtype=tf.int64):
    """Full-range random integers of one epoch, the `index`-th stream of its key."""
    seed = tf.random.experimental.stateless_fold_in(key, index)
    return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=dtype)


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


def _epoch_pairs(labels, shuffle, partner):
    """`key -> (anchors, partners, seeds)` of one epoch: int64 `[N]`, `[N]` and `[N, 2, 2]`."""
    if partner not in PARTNERS:
        raise ValueError(f"Unknown partner '{partner}'; expected one of: {', '.join(PARTNERS)}.")
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    order, starts, counts = class_index(labels)
    labels_t = tf.constant(labels)
    order_t, starts_t, counts_t = (tf.constant(a, tf.int64) for a in (order, starts, counts))

    def make(key):
        anchors = tf.range(n, dtype=tf.int64)
        if shuffle:
            anchors = tf.random.experimental.stateless_shuffle(anchors, _draws(key, 0, [2]))
        if partner == "self":
            partners = anchors
        else:
            y = tf.gather(labels_t, anchors)
            # The modulo bias is below counts / 2^63: negligible.
            offset = tf.math.floormod(tf.abs(_draws(key, 1, [n]) // 2), tf.gather(counts_t, y))
            partners = tf.gather(order_t, tf.gather(starts_t, y) + offset)
        # One stateless seed per view (anchor, partner) of every element.
        return anchors, partners, tf.reshape(_draws(key, 2, [n, 4]), [n, 2, 2])

    return make


def pair_indices(labels, seed=0, shuffle=True, partner="class", epochs=None):
    """An epoch of `(anchor, partner)` index pairs; each iteration is a new epoch.

    Anchors are all indices, shuffled; each partner is drawn uniformly from
    all indices of the anchor's class, the anchor included (so a class with a
    single sample pairs with itself), as in the authors' sampler. The same seed
    gives the same sequence of epochs. With `partner="self"` every anchor is
    its own partner (DDGSD's two views of one image); the anchor order is the same.

    Args:
      labels: int array `[N]`.
      seed: int. Seeds the anchor order and the partner draws.
      shuffle: bool. Shuffle the anchors (False keeps their order).
      partner: str. `class` (a random sample of the anchor's class) or `self`.
      epochs: range or None. See the module docstring.

    Returns:
      A `tf.data.Dataset` of int64 scalar pairs `(anchor, partner)`.
    """
    make = _epoch_pairs(labels, shuffle, partner)

    def epoch(key, skip):
        anchors, partners, _ = make(key)
        return tf.data.Dataset.from_tensor_slices((anchors, partners)).skip(skip)

    return _epoch_keys(seed, epochs, 0).flat_map(epoch)


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
    partner="class",
    epochs=None,
    skip=0,
):
    """Batches `((x, x_pair), y)` of same-class pairs, the authors' sampler.

    Args:
      images: array `[N, ...]`. Pixels (`kind="pixels"`), encoded image bytes
        (`"encoded"`) or file paths (`"path"`).
      labels: int array `[N]`.
      batch_size: int. Anchors per batch (a step sees as many partners).
      seed: int. Seeds anchor order, partner choice and augmentation.
      kind: str. How to read one value: `pixels`, `encoded` or `path`.
      augment: callable or None. Maps one image to a network input; applied to
        anchor and partner separately, each with its own stateless `seed=` if
        it takes one (e.g. `cskd_tf.data.Augmenter(...).train`).
      shuffle: bool. Shuffle the anchors every epoch.
      drop_remainder: bool. Drop the last, short batch of an epoch.
      clean: callable or None. Given (e.g. `Augmenter(...).eval`), batches are
        `((x, x_pair, x_clean), y)` with `x_clean` the anchor image without
        random augmentation, for CS-KD-E's sample-wise term.
      partner: str. `class` (CS-KD's same-class partner) or `self`: `x_pair` is
        then a second, independently augmented view of the anchor's image (DDGSD).
      epochs: range or None. None: each iteration is the next epoch. A range:
        exactly those epochs, back to back (see the module docstring).
      skip: int. Batches of the range's first epoch left out (a resumed run).

    Returns:
      A `tf.data.Dataset`.
    """
    labels = np.asarray(labels, np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    values = tf.constant(images)
    labels_t = tf.constant(labels)
    read_one = reader(kind, augment)
    decode, view = decoder(kind), reader("pixels", augment)
    make = _epoch_pairs(labels, shuffle, partner)

    def read(anchor, partner_index, seeds):
        x_pair = read_one(tf.gather(values, partner_index), seeds[1])
        if clean is None:
            return (read_one(tf.gather(values, anchor), seeds[0]), x_pair), labels_t[anchor]
        image = decode(tf.gather(values, anchor))  # Decoded once, viewed twice.
        return (view(image, seeds[0]), x_pair, clean(image)), labels_t[anchor]

    def epoch(key, skip_batches):
        ds = tf.data.Dataset.from_tensor_slices(make(key)).skip(skip_batches * batch_size)
        ds = ds.map(read, num_parallel_calls=AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=drop_remainder)

    return _epoch_keys(seed, epochs, skip).flat_map(epoch).prefetch(AUTOTUNE)


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
    epochs=None,
    skip=0,
):
    """Same-class pairs from a stream that allows no random access.

    The stream is shuffled, cut into windows of up to `window` consecutive
    same-class elements (`group_by_window`), and each element's partner is drawn
    uniformly from its window, itself included. Every element is an anchor once
    per pass. Partners therefore come from a random subset of the class rather
    than the whole class; memory holds at most `num_classes * window` elements.
    The shuffles and draws are seeded by the epoch's key, so a given epoch is
    the same stream whenever it is read (the source must stream in a fixed order).

    Args:
      dataset: `tf.data.Dataset` of `(value, label)`.
      batch_size: int. Anchors per batch.
      window: int. Same-class elements a partner is drawn from.
      seed: int. Seeds the shuffles, partner draws and augmentation.
      kind: str. How to read one value (see `pair_dataset`).
      augment: callable or None. As in `pair_dataset`.
      shuffle_buffer: int. Shuffle buffer before and after grouping.
      drop_remainder: bool. Drop the last, short batch.
      epochs, skip: as in `pair_dataset`.

    Returns:
      A `tf.data.Dataset` of `((x, x_pair), y)`.
    """
    read_one = reader(kind, augment)

    def epoch(seeds, reshuffle, skip_batches):
        ds = dataset.shuffle(shuffle_buffer, seed=seeds[0], reshuffle_each_iteration=reshuffle)
        ds = ds.group_by_window(
            key_func=lambda value, label: tf.cast(label, tf.int64),
            reduce_func=lambda _, group: group.batch(window),
            window_size=window,
        )
        draws = tf.data.Dataset.random(seed=seeds[1], rerandomize_each_iteration=reshuffle)

        def pair_in_window(group, draw):
            values, labels = group
            n = tf.shape(labels)[0]
            partners = tf.random.stateless_uniform(
                [n], seed=tf.stack([draw, 0]), minval=0, maxval=n, dtype=tf.int32
            )
            return tf.data.Dataset.from_tensor_slices((values, tf.gather(values, partners), labels))

        ds = tf.data.Dataset.zip(ds, draws).flat_map(pair_in_window)
        # Windows leave the grouping one class at a time: mix them again.
        ds = ds.shuffle(shuffle_buffer, seed=seeds[2], reshuffle_each_iteration=reshuffle)
        views = tf.data.Dataset.random(seed=seeds[3], rerandomize_each_iteration=reshuffle)
        ds = tf.data.Dataset.zip(ds, views).skip(skip_batches * batch_size)

        def read(element, view):
            value, partner_value, label = element
            anchor_seed, partner_seed = tf.unstack(_view_seeds(view, 2))
            x = read_one(value, anchor_seed)
            return (x, read_one(partner_value, partner_seed)), tf.cast(label, tf.int64)

        ds = ds.map(read, num_parallel_calls=AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=drop_remainder)

    return _stream_epochs(epoch, seed, epochs, skip).prefetch(AUTOTUNE)


def _view_seeds(draw, count):
    return tf.random.experimental.stateless_split(tf.stack([draw, tf.constant(0, tf.int64)]), count)


def _stream_epochs(make, seed, epochs, skip):
    """Streams take Python-int seeds (tf.data's shuffle cannot take a tensor seed once a global
    seed is set): epochs of a range are built one by one, each with seeds from `(seed, epoch)`,
    and concatenated; without a range, one dataset reshuffles on every iteration."""
    if _check_epochs(epochs, skip) is None:
        return make(_int_seeds(seed, -1), True, 0)
    parts = [make(_int_seeds(seed, e), False, skip if e == epochs.start else 0) for e in epochs]
    return functools.reduce(tf.data.Dataset.concatenate, parts)


def _int_seeds(seed, epoch):
    return [int(v) for v in np.random.SeedSequence([int(seed), epoch + 1]).generate_state(4)]


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
    epochs=None,
    skip=0,
    indices=False,
):
    """Batches `(x, y)` of single examples: cross-entropy training and evaluation.

    Args:
      images: array `[N, ...]` (see `pair_dataset`) or a `tf.data.Dataset` of
        `(value, label)` for streamed sources.
      labels: int array `[N]`, or None when `images` is a dataset.
      batch_size: int.
      seed: int. Seeds the shuffle and the augmentation.
      kind: str. How to read one value (see `pair_dataset`).
      augment: callable or None. Maps one image to a network input (with a
        stateless `seed=` if it takes one).
      shuffle: bool. Shuffle every epoch (training); False keeps the order.
      shuffle_buffer: int. Buffer size when `images` is a stream.
      epochs, skip: as in `pair_dataset`.
      indices: bool. Batches `((x, index), y)` instead, `index` (int64) each example's
        place in `images` (in a stream: in its fixed order, counted before the shuffle),
        for state kept per training example (PS-KD).
    """
    read_one = reader(kind, augment)
    if isinstance(images, tf.data.Dataset):
        stream = images

        def stream_epoch(seeds, reshuffle, skip_batches):
            ds = stream
            if indices:  # Numbered in the stream's fixed order, before the shuffle.
                ds = ds.enumerate().map(lambda index, element: (*element, index))
            if shuffle:
                ds = ds.shuffle(shuffle_buffer, seed=seeds[0], reshuffle_each_iteration=reshuffle)
            views = tf.data.Dataset.random(seed=seeds[1], rerandomize_each_iteration=reshuffle)
            ds = tf.data.Dataset.zip(ds, views).skip(skip_batches * batch_size)

            def read(element, view):
                value, label = element[:2]
                x = read_one(value, _view_seeds(view, 1)[0])
                return ((x, element[2]) if indices else x), tf.cast(label, tf.int64)

            return ds.map(read, num_parallel_calls=AUTOTUNE).batch(batch_size)

        return _stream_epochs(stream_epoch, seed, epochs, skip).prefetch(AUTOTUNE)

    values = tf.constant(images)
    labels_t = tf.constant(np.asarray(labels, np.int64))
    n = len(labels)

    def elements(key):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, _draws(key, 0, [2]))
        ds = tf.data.Dataset.from_tensor_slices(order)
        return ds.map(lambda i: (tf.gather(values, i), tf.gather(labels_t, i), i))

    def epoch(key, skip_batches):
        base = _draws(key, 1, [2])

        def read(value, label, index):
            x = read_one(value, tf.random.experimental.stateless_fold_in(base, index))
            return ((x, index) if indices else x), label

        ds = elements(key).skip(skip_batches * batch_size)
        return ds.map(read, num_parallel_calls=AUTOTUNE).batch(batch_size)

    return _epoch_keys(seed, epochs, skip).flat_map(epoch).prefetch(AUTOTUNE)


def previous_batch_dataset(
    images,
    labels,
    batch_size,
    *,
    seed=0,
    kind="pixels",
    augment=None,
    epochs=None,
    skip=0,
):
    """DLB's batches: the previous step's examples under a second augmentation, then this step's.

    The batch of step `t` holds the rows of step `t - 1`'s examples, each under
    its second view, followed by the rows of step `t`'s own examples under their
    first view: `((x, position, previous), y)`, with `position` (int64) a row's
    place in its own step's batch and `previous` (bool) true for the first kind.
    This step's rows are exactly `example_dataset(..., shuffle=True)`'s batch (the
    same order, the same augmentation); a sample's second view is another
    stateless function of (seed, epoch, index). The previous examples of an
    epoch's first step are the last batch of the epoch before, as the authors
    carry the previous batch across epochs; the run's very first step (epoch 0,
    batch 0) has none.

    A batch thus holds up to `2 * batch_size` rows, and every component has that
    many: a distribution strategy splits each batch into contiguous shares in
    which the previous step's rows still come first.

    Args:
      images: array `[N, ...]` (see `pair_dataset`).
      labels: int array `[N]`.
      batch_size: int. Examples of one step (the previous step's come on top).
      seed: int. Seeds the order and both views' augmentation.
      kind: str. How to read one value (see `pair_dataset`).
      augment: callable or None. As in `pair_dataset`.
      epochs: range. The epochs, back to back: needed, for the first batch of an
        epoch repeats the last batch of the epoch before.
      skip: int. Batches of the range's first epoch left out (a resumed run).

    Returns:
      A `tf.data.Dataset`.

    Reference: Shen et al., "Self-Distillation from the Last Mini-Batch for
    Consistency Regularization", CVPR 2022, section 3.
    """
    if _check_epochs(epochs, skip) is None:
        raise ValueError(
            "previous_batch_dataset needs epochs=range(first, last): the first batch of an "
            "epoch repeats the last batch of the epoch before."
        )
    labels = np.asarray(labels, np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    n = len(labels)
    steps = -(-n // batch_size)
    values = tf.constant(images)
    labels_t = tf.constant(labels)
    read_one = reader(kind, augment)
    none = tf.constant(-1, tf.int64)

    def batches(key):
        """An epoch's examples by batch, `[steps, batch_size]`, -1 past the last one's end."""
        order = tf.random.experimental.stateless_shuffle(  # As example_dataset's.
            tf.range(n, dtype=tf.int64), _draws(key, 0, [2])
        )
        return tf.reshape(tf.concat([order, tf.fill([steps * batch_size - n], none)], 0),
                          [steps, batch_size])  # fmt: skip

    def epoch(key, skip_batches):
        before = key - tf.constant([0, 1], tf.int64)  # The key of the epoch before.
        current = batches(key)
        tail = batches(before)[-1]
        tail = tf.where(key[1] > 0, tail, tf.fill([batch_size], none))  # None before epoch 0.
        previous = tf.concat([tail[None], current[:-1]], 0)
        # The first view's base (example_dataset's), the second view's of this epoch's
        # examples and of the epoch before's.
        bases = tf.stack([_draws(key, 1, [2]), _draws(key, 2, [2]), _draws(before, 2, [2])])
        step = tf.range(steps, dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices((step, previous, current))
        return ds.skip(skip_batches).map(lambda t, p, c: (t, p, c, bases))

    def read(index, base, position, previous):
        seed_ = tf.random.experimental.stateless_fold_in(base, index)
        x = read_one(tf.gather(values, index), seed_)
        return (x, position, previous), tf.gather(labels_t, index)

    def rows(step, previous, current, bases):
        previous = tf.boolean_mask(previous, previous >= 0)
        current = tf.boolean_mask(current, current >= 0)
        p, c = tf.size(previous), tf.size(current)
        second = tf.where(step > 0, bases[1], bases[2])
        elements = (
            tf.concat([previous, current], 0),
            tf.concat([tf.tile(second[None], [p, 1]), tf.tile(bases[0][None], [c, 1])], 0),
            tf.concat([tf.range(p, dtype=tf.int64), tf.range(c, dtype=tf.int64)], 0),
            tf.concat([tf.ones([p], tf.bool), tf.zeros([c], tf.bool)], 0),
        )
        ds = tf.data.Dataset.from_tensor_slices(elements).map(read, num_parallel_calls=AUTOTUNE)
        return ds.batch(2 * batch_size)  # The step's one batch.

    ds = _epoch_keys(seed, epochs, skip).flat_map(epoch)
    # One inner dataset (one batch) per step: in order, a few steps read at once.
    ds = ds.interleave(rows, cycle_length=2, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)


def split_dataset(split, batch_size, **kwargs):
    """`example_dataset` of a `Split` (arrays) or a `StreamSplit` (a stream).

    Args:
      split: Split or StreamSplit (`cskd_tf.data.sources`).
      batch_size: int.
      **kwargs: forwarded to `example_dataset` (`augment`, `shuffle`, `seed`, `epochs`, `skip`).
    """
    if hasattr(split, "make"):  # A stream.
        return example_dataset(split.make(), None, batch_size, kind=split.kind, **kwargs)
    return example_dataset(split.values, split.labels, batch_size, kind=split.kind, **kwargs)


def training_dataset(split, batches, batch_size, seed, augmenter, epochs=None, skip=0):
    """The training batches a method asks for (`cskd_tf.methods.Batches`), from `split`.

    Args:
      split: `sources.Split` (held in memory) or `sources.StreamSplit`.
      batches: `cskd_tf.methods.Batches`. Single examples (with their indices, or after
        the previous step's examples), same-class pairs or two views of each image, with
        or without the clean view.
      batch_size: int. Anchors per batch.
      seed: int. Seed of every random choice.
      augmenter: `cskd_tf.data.Augmenter`. Its `train` augments every view, its `eval`
        makes the clean view.
      epochs: range or None. As in `pair_dataset`.
      skip: int. Batches of the first epoch to leave out (a resumed epoch).

    Returns:
      tf.data.Dataset: `(x, y)`, `((x, index), y)`, `((x, position, previous), y)`,
      `((x, x_other), y)` or `((x, x_other, x_clean), y)`.

    Raises:
      UserError: for the previous step's examples from a stream, which cannot be read twice.
    """
    common = dict(seed=seed, augment=augmenter.train, epochs=epochs, skip=skip)
    if batches.previous:
        if hasattr(split, "make"):
            from cskd_tf.errors import UserError  # pylint: disable=g-import-not-at-top

            raise UserError(
                "The previous step's examples (DLB) need random access to the training set, "
                "which a streamed data set does not give."
            )
        return previous_batch_dataset(
            split.values, split.labels, batch_size, kind=split.kind, **common
        )
    if batches.partner is None:
        if batches.indices:
            common["indices"] = True
        return split_dataset(split, batch_size, shuffle=True, **common)
    if hasattr(split, "make"):  # A stream: partners from windows of the stream.
        return stream_pair_dataset(split.make(), batch_size, kind=split.kind, **common)
    return pair_dataset(
        split.values,
        split.labels,
        batch_size,
        kind=split.kind,
        clean=augmenter.eval if batches.clean else None,
        partner=batches.partner,
        **common,
    )
