import collections

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from cskd_tf import data
from cskd_tf.data import augment
from cskd_tf.data import pairs

# Class 0 has five members, class 1 three, class 2 a single one.
LABELS = np.array([0, 1, 0, 2, 0, 1, 0, 1, 0], np.int64)


def epoch_pairs(ds):
    return [tuple(map(int, p)) for p in ds]


def test_every_anchor_once_partner_same_class_singleton_self_paired():
    ds = pairs.pair_indices(LABELS, seed=0)
    for _ in range(5):  # Each iteration is a new epoch.
        got = epoch_pairs(ds)
        anchors = sorted(a for a, _ in got)
        assert anchors == list(range(len(LABELS)))
        for a, p in got:
            assert LABELS[a] == LABELS[p]
        assert dict(got)[3] == 3  # The only sample of class 2.


@pytest.mark.slow
def test_partner_is_uniform_within_the_class_self_included():
    ds = pairs.pair_indices(LABELS, seed=1)
    counts = collections.defaultdict(collections.Counter)
    for _ in range(300):
        for a, p in epoch_pairs(ds):
            counts[a][p] += 1
    for a in (0, 1):  # Anchors of class 0 (5 members) and class 1 (3 members).
        members = np.flatnonzero(LABELS == LABELS[a])
        observed = [counts[a][m] for m in members]
        assert sum(observed) == 300
        assert stats.chisquare(observed).pvalue > 1e-3, observed
        assert counts[a][a] > 0  # The anchor itself can be its partner.


def test_same_seed_same_batches_and_new_epochs_differ():
    images = np.arange(len(LABELS) * 4, dtype=np.uint8).reshape(-1, 2, 2, 1)

    def two_epochs(seed):
        ds = data.pair_dataset(images, LABELS, 4, seed=seed)
        return [[(x.numpy(), xp.numpy(), y.numpy()) for (x, xp), y in ds] for _ in range(2)]

    first, again, other = two_epochs(7), two_epochs(7), two_epochs(8)
    flat = lambda epochs: np.concatenate(
        [np.concatenate([b[0].ravel(), b[1].ravel()]) for e in epochs for b in e]
    )
    np.testing.assert_array_equal(flat(first), flat(again))
    assert not np.array_equal(flat(first), flat(other))
    assert not np.array_equal(flat(first[:1]), flat(first[1:]))
    # Batch size counts anchors; the last batch of 9 is short.
    assert [len(b[2]) for b in first[0]] == [4, 4, 1]


def test_pair_dataset_yields_the_indexed_images():
    images = (np.arange(len(LABELS))[:, None, None, None] * np.ones((1, 3, 3, 1))).astype(np.uint8)
    for (x, x_pair), y in data.pair_dataset(images, LABELS, 3, seed=0):
        a = x.numpy()[:, 0, 0, 0].astype(int)
        p = x_pair.numpy()[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(LABELS[a], y.numpy())
        np.testing.assert_array_equal(LABELS[p], y.numpy())


def test_encoded_and_path_values_decode_to_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(LABELS), 5, 5, 3), dtype=np.uint8)
    encoded = np.array([tf.io.encode_png(i).numpy() for i in images], dtype=object)
    paths = []
    for i, e in enumerate(encoded):
        path = tmp_path / f"{i}.png"
        path.write_bytes(e)
        paths.append(str(path))
    as_pixels = data.example_dataset(images, LABELS, 4)
    for values, kind in ((encoded, "encoded"), (np.array(paths), "path")):
        decoded = data.example_dataset(values, LABELS, 4, kind=kind)
        for (a, ya), (b, yb) in zip(as_pixels, decoded):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_partners_get_independent_augmentation():
    # All images identical: anchor and partner differ only by their random crops.
    images = np.tile(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1), (len(LABELS), 1, 1, 1))
    aug = data.Augmenter("digits", seed=0)
    (x, x_pair), _ = next(iter(data.pair_dataset(images, LABELS, len(LABELS), augment=aug.train)))
    assert x.shape == (len(LABELS), 8, 8, 1)
    assert np.any(x.numpy() != x_pair.numpy())


def test_pad_crop_is_a_translation_of_the_padded_image():
    aug = data.Augmenter("cifar", seed=3)
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)]).astype(np.float32)
    mean = np.array(augment.CIFAR_MEAN, np.float32)
    std = np.array(augment.CIFAR_STD, np.float32)
    ds = tf.data.Dataset.from_tensors(image).repeat(10).map(aug.train)
    for out in ds:
        pixels = np.round((out.numpy() * std + mean) * 255)
        crops = [padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        crops += [c[:, ::-1] for c in crops]
        assert any(np.allclose(pixels, c, atol=0.5) for c in crops)


@pytest.mark.parametrize("preset,size", [("imagenet", 224), ("tiny", 32)])
def test_eval_preprocessing_is_the_same_eagerly_and_in_tf_data(preset, size):
    aug = data.Augmenter(preset)
    image = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    eager = aug.eval(tf.constant(image)).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors(image).map(aug.eval))).numpy()
    assert eager.shape == (size, size, 3)
    np.testing.assert_allclose(eager, graph, rtol=1e-5, atol=1e-5)
    # Resize the shorter side, then centre crop: a constant image stays constant.
    flat = aug.eval(tf.fill([300, 400, 3], tf.constant(128, tf.uint8))).numpy()
    np.testing.assert_allclose(
        flat,
        np.broadcast_to(
            (128 / 255 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD),
            flat.shape,
        ),
        rtol=1e-4,
    )


def test_resized_crop_gives_the_network_input_size():
    aug = data.Augmenter("imagenet", seed=0)
    image = tf.constant(
        np.random.default_rng(0).integers(0, 256, size=(300, 450, 3), dtype=np.uint8)
    )
    ds = tf.data.Dataset.from_tensors(image).repeat(4).map(aug.train)
    for out in ds:
        assert out.shape == (224, 224, 3)
        assert np.all(np.isfinite(out.numpy()))


def test_stream_pairs_are_same_class_and_each_element_an_anchor_once():
    labels = np.array([0, 1, 0, 2, 0, 1, 0, 1, 0, 1, 1], np.int64)
    values = np.arange(len(labels), dtype=np.int64)
    stream = tf.data.Dataset.from_tensor_slices((values, labels))
    # Identity "load": values are indices standing for images.
    ds = pairs.stream_pair_dataset(stream, 4, window=3, seed=0, kind="pixels")
    seen = []
    for (a, p), y in ds:
        a, p, y = a.numpy().astype(int), p.numpy().astype(int), y.numpy()
        np.testing.assert_array_equal(labels[a], y)
        np.testing.assert_array_equal(labels[p], y)
        seen += list(a)
    assert sorted(seen) == list(range(len(labels)))


# --- Epoch ranges: what a resumed run reads ----------------------------------------------------


def _batches(ds):
    return [tuple(np.asarray(a) for a in tf.nest.flatten(b)) for b in ds]


def _assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def _builders():
    images = np.random.default_rng(0).integers(0, 256, size=(len(LABELS), 8, 8, 1), dtype=np.uint8)
    aug = data.Augmenter("digits", seed=0)
    stream = tf.data.Dataset.from_tensor_slices((images, LABELS))
    return {
        "pairs": lambda **k: data.pair_dataset(images, LABELS, 4, augment=aug.train, seed=3, **k),
        "examples": lambda **k: data.example_dataset(
            images, LABELS, 4, augment=aug.train, shuffle=True, seed=3, **k
        ),
        "stream pairs": lambda **k: data.stream_pair_dataset(
            stream, 4, kind="pixels", augment=aug.train, seed=3, shuffle_buffer=9, **k
        ),
        "stream examples": lambda **k: data.example_dataset(
            stream, None, 4, augment=aug.train, shuffle=True, seed=3, shuffle_buffer=9, **k
        ),
    }


@pytest.mark.parametrize("kind", ["pairs", "examples", "stream pairs", "stream examples"])
def test_a_range_of_epochs_resumed_at_any_batch_reads_the_same_batches(kind):
    import keras  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(0)  # A global seed, as every run sets (streams must cope).
    make = _builders()[kind]
    steps = 3  # 9 examples in batches of 4.
    full = _batches(make(epochs=range(0, 3)))
    assert len(full) == 3 * steps
    # Epochs differ, and each is the same whenever it is built.
    assert any(not np.array_equal(a[-1], b[-1]) for a, b in zip(full[:steps], full[steps:]))
    _assert_same(full, _batches(make(epochs=range(0, 3))))
    for first, skip in ((1, 0), (1, 2), (2, 1)):
        _assert_same(
            full[first * steps + skip :], _batches(make(epochs=range(first, 3), skip=skip))
        )


def test_without_a_range_each_iteration_is_a_new_epoch():
    make = _builders()["pairs"]
    ds = make()
    first, second = _batches(ds), _batches(ds)
    assert len(first) == len(second) == 3
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="skip needs an explicit range"):
        make(skip=1)


def test_clean_view_is_the_anchor_image_without_augmentation_and_changes_no_other_draw():
    """`pair_dataset(..., clean=aug.eval)`: `x_clean` is the evaluation preprocessing of the
    anchor's own image (the one `x` is a crop of), while `x`, `x_pair` and `y` are exactly the
    batches without it; pixels and encoded images give the same batches.

    Mutant run: the partner's image in the clean view (`clean(decode(tf.gather(values,
    partner_index)))` in `pair_dataset`'s `read`; same class, so the labels still agree):
    `assert is_crop(x[i], images[index])` fails.
    """
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(len(LABELS), 32, 32, 3), dtype=np.uint8)
    encoded = np.array([tf.io.encode_png(i).numpy() for i in images], dtype=object)
    aug = data.Augmenter("cifar", seed=0)
    clean = np.stack([aug.eval(tf.constant(i)).numpy() for i in images])  # Eagerly.
    mean, std = np.array(augment.CIFAR_MEAN), np.array(augment.CIFAR_STD)

    def is_crop(view, image):
        pixels = np.round((view * std + mean) * 255)
        padded = np.pad(image, [(4, 4), (4, 4), (0, 0)]).astype(np.float64)
        windows = [padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        return any(np.array_equal(pixels, w) or np.array_equal(pixels, w[:, ::-1])
                   for w in windows)  # fmt: skip

    common = dict(seed=3, augment=aug.train, epochs=range(2, 3))
    with_clean = list(data.pair_dataset(images, LABELS, 4, clean=aug.eval, **common))
    without = list(data.pair_dataset(images, LABELS, 4, **common))
    assert len(with_clean) == len(without) == 3
    anchors = []
    for ((x, x_pair, x_clean), y), ((x2, x_pair2), y2) in zip(with_clean, without):
        np.testing.assert_array_equal(x.numpy(), x2.numpy())
        np.testing.assert_array_equal(x_pair.numpy(), x_pair2.numpy())
        np.testing.assert_array_equal(y.numpy(), y2.numpy())
        for i, view in enumerate(x_clean.numpy()):
            matches = [a for a in range(len(images)) if np.allclose(view, clean[a], atol=1e-6)]
            assert len(matches) == 1
            index = matches[0]
            assert LABELS[index] == y.numpy()[i]
            assert is_crop(x.numpy()[i], images[index])
            anchors.append(index)
    assert sorted(anchors) == list(range(len(LABELS)))  # Every anchor once.
    # Encoded images are decoded once for both views: the same batches.
    decoded = data.pair_dataset(encoded, LABELS, 4, clean=aug.eval, kind="encoded", **common)
    for a, b in zip(tf.nest.flatten(list(decoded)), tf.nest.flatten(with_clean)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
