"""Tests for cskd_tf.data.sources: tfds sets (under tfds.testing.mock_data), missing data, image
folders, the stratified split and the bundled digits."""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cskd_tf import data
from cskd_tf.data import sources
from cskd_tf.errors import UserError

# name -> (num_classes, preset input side, kind of the train split).
TFDS_SETS = {
    "cifar100": (100, 32, "pixels"),
    "cub": (200, 224, "encoded"),
    "stanford_dogs": (120, 224, "encoded"),
    "imagenet": (1000, 224, "stream"),
}
# Enough mock examples that some classes have several (the labels are uniform random), so that
# same-class partners other than the anchor itself occur.
MOCK_EXAMPLES = 200


def _mock_tfds():
    # USE_CODE: the features and classes come from the builders' code; no metadata files and no
    # network are needed, and every split holds `MOCK_EXAMPLES` random examples.
    return tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    )


def _decode(value, kind):
    """Reference decoding, independent of cskd_tf.data.pairs.decoder."""
    if kind == "pixels":
        return np.asarray(value)
    if kind == "encoded":
        return tf.io.decode_image(value, channels=3, expand_animations=False).numpy()
    return tf.io.decode_image(tf.io.read_file(value), channels=3, expand_animations=False).numpy()


def _fingerprint_np(image):
    return (image.shape[0], image.shape[1], int(image.astype(np.int64).sum()))


def _fingerprint(image):
    """A graph-side `augment` that maps an image to (height, width, pixel sum): identifies it."""
    shape = tf.cast(tf.shape(image)[:2], tf.int64)
    return tf.concat([shape, [tf.reduce_sum(tf.cast(image, tf.int64))]], axis=0)


def _class_of(values, labels, kind):
    """Fingerprint -> label, for every example of a split."""
    table = {}
    for value, label in zip(values, labels):
        key = _fingerprint_np(_decode(value, kind))
        assert key not in table, "two examples share a fingerprint; the check would be blind"
        table[key] = int(label)
    return table


def _assert_same_class_pairs(ds, table, num_batches):
    """Every anchor and partner of `ds` (fingerprinted) is a known example of the batch label."""
    others = 0
    for (x, x_pair), y in ds.take(num_batches):
        for a, p, label in zip(x.numpy(), x_pair.numpy(), y.numpy()):
            assert table[tuple(int(v) for v in a)] == label
            assert table[tuple(int(v) for v in p)] == label
            others += not np.array_equal(a, p)
    # Classes with several members exist, so some partners are not the anchor itself.
    assert others > 0


# --- tfds sets under mock_data ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TFDS_SETS))
def test_tfds_source_under_mock(name):
    num_classes, side, kind = TFDS_SETS[name]
    with _mock_tfds():
        source = sources.load(name)
        assert source.name == name
        assert source.num_classes == num_classes
        assert len(source.class_names) == num_classes
        assert source.preset == ("cifar" if name == "cifar100" else "imagenet")
        assert data.PRESETS[source.preset].input_shape == (side, side, 3)
        for split in (source.train, source.test):
            assert len(split) == MOCK_EXAMPLES
            if kind == "stream":
                assert isinstance(split, sources.StreamSplit)
                assert split.kind == "encoded"
                ds = split.make()
                assert ds.element_spec[0].dtype == tf.string
                pairs = list(ds.as_numpy_iterator())
                assert len(pairs) == MOCK_EXAMPLES
                values = [v for v, _ in pairs]
                labels = np.array([y for _, y in pairs])
            else:
                assert isinstance(split, sources.Split)
                assert split.kind == kind
                values, labels = split.values, split.labels
                assert labels.dtype == np.int64 and labels.shape == (MOCK_EXAMPLES,)
            assert labels.min() >= 0 and labels.max() < num_classes
            if kind == "pixels":
                assert values.dtype == np.uint8
                assert values.shape == (MOCK_EXAMPLES, 32, 32, 3)
            else:
                assert all(isinstance(v, bytes) for v in values)
                for v in values[:5]:
                    image = _decode(v, "encoded")
                    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
                    # The mock draws unknown image sides from [5, 50).
                    assert 5 <= image.shape[0] < 50 and 5 <= image.shape[1] < 50


@pytest.mark.parametrize("name", sorted(TFDS_SETS))
def test_tfds_source_pairs_same_class(name):
    num_classes, _, kind = TFDS_SETS[name]
    with _mock_tfds():
        source = sources.load(name)
        train = source.train
        if kind == "stream":
            pairs = list(train.make().as_numpy_iterator())
            table = _class_of([v for v, _ in pairs], [y for _, y in pairs], "encoded")
            ds = data.stream_pair_dataset(
                train.make(),
                50,
                window=4,
                seed=0,
                kind=train.kind,
                augment=_fingerprint,
                shuffle_buffer=MOCK_EXAMPLES,
            )
        else:
            table = _class_of(train.values, train.labels, train.kind)
            ds = data.pair_dataset(
                train.values, train.labels, 50, seed=0, kind=train.kind, augment=_fingerprint
            )
        # One full epoch: every example is an anchor once.
        anchors = collections.Counter()
        for (x, _), _ in ds:
            anchors.update(tuple(int(v) for v in a) for a in x.numpy())
        assert sorted(anchors) == sorted(table) and set(anchors.values()) == {1}
        _assert_same_class_pairs(ds, table, num_batches=4)
        assert max(table.values()) < num_classes


@pytest.mark.parametrize("name", sorted(TFDS_SETS))
def test_tfds_source_through_augmenter(name):
    num_classes, side, kind = TFDS_SETS[name]
    with _mock_tfds():
        source = sources.load(name)
        augment = data.Augmenter(source.preset, seed=0).train
        train = source.train
        if kind == "stream":
            ds = data.stream_pair_dataset(
                train.make(), 4, seed=0, kind=train.kind, augment=augment, shuffle_buffer=64
            )
        else:
            ds = data.pair_dataset(
                train.values, train.labels, 4, seed=0, kind=train.kind, augment=augment
            )
        (x, x_pair), y = next(iter(ds))
    for t in (x, x_pair):
        assert t.shape == (4, side, side, 3) and t.dtype == tf.float32
        assert np.isfinite(t.numpy()).all()
    assert not np.allclose(x.numpy(), x_pair.numpy())
    assert y.dtype == tf.int64 and ((y.numpy() >= 0) & (y.numpy() < num_classes)).all()


def test_tfds_aliases_resolve():
    assert sources.ALIASES == {
        "cifar100": "cifar100",
        "caltech_birds2011": "cub",
        "stanford_dogs": "stanford_dogs",
        "imagenet2012": "imagenet",
    }
    with _mock_tfds():
        source = sources.load("caltech_birds2011")
    assert source.name == "cub" and source.num_classes == 200


# --- Missing tfds data ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,tfds_name",
    [("cifar100", "cifar100"), ("cub", "caltech_birds2011"), ("imagenet", "imagenet2012")],
)
def test_missing_tfds_data_is_one_clear_sentence(tmp_path, offline, name, tfds_name):
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        sources.load(name, data_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert f"'{name}'" in message and tfds_name in message
    assert str(tmp_path) in message
    assert f"tfds build {tfds_name} --data_dir=DIR" in message
    assert "pass --data_dir=DIR" in message
    assert "\n" not in message and message.endswith(".")
    if name == "imagenet":
        assert f"not prepared in {tmp_path}" in message
        assert "ILSVRC2012_img_train.tar" in message and "DIR/downloads/manual" in message


def test_unreachable_download_host_fails_at_once(tmp_path, offline, monkeypatch):
    # Offline, tfds would retry each URL for minutes; the hosts are probed first instead.
    monkeypatch.setattr(
        sources,
        "_download_urls",
        lambda builder: ["https://www.cs.toronto.edu/~kriz/cifar-100.tar.gz"],
    )
    with pytest.raises(UserError, match=r"www\.cs\.toronto\.edu cannot be reached") as info:
        sources.load("cifar100", data_dir=str(tmp_path))
    assert f"not prepared in {tmp_path}" in str(info.value)


def test_unreachable_hosts(monkeypatch):
    calls = []

    def connect(address, timeout):
        calls.append((address, timeout))
        if address[0] == "down.example":
            raise OSError("unreachable")
        return type("Socket", (), {"close": lambda self: None})()

    monkeypatch.setattr("socket.create_connection", connect)
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    urls = [
        "https://up.example/a",
        "http://down.example/b",
        "https://up.example/c",
        "ftp://ftp.example:2121/d",
    ]
    assert sources._unreachable_hosts(urls, timeout=1.0) == ["down.example"]
    assert sorted(calls) == [
        (("down.example", 80), 1.0),
        (("ftp.example", 2121), 1.0),
        (("up.example", 443), 1.0),
    ]
    # Behind a proxy a direct connection says nothing: no host is reported.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert sources._unreachable_hosts(urls) == []


# --- Image folders ----------------------------------------------------------------------------

# class -> (train images, test images); listed unsorted on purpose.
FOLDER_CLASSES = {"cat": (5, 2), "ant": (4, 1), "bee": (1, 1)}


def _write_tree(root, test_name="test", classes=FOLDER_CLASSES):
    """Writes PNGs of varying sizes; returns {path: class name}."""
    rng = np.random.default_rng(0)
    written = {}
    for split, column in (("train", 0), (test_name, 1)):
        for c, counts in classes.items():
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(counts[column]):
                h, w = 6 + i, 9 - i
                image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                # Upper-case extensions count as images too.
                path = os.path.join(root, split, c, f"{i}.{'PNG' if i == 1 else 'png'}")
                tf.io.write_file(path, tf.io.encode_png(image))
                written[path] = c
            # Not images: ignored.
            with open(os.path.join(root, split, c, "notes.txt"), "w") as f:
                f.write("x")
    return written


def test_folder_source(tmp_path):
    written = _write_tree(str(tmp_path))
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")  # Hidden: not a class.
    source = sources.load("folder", data_dir=str(tmp_path))
    assert source.name == "folder" and source.preset == "imagenet"
    assert source.class_names == ("ant", "bee", "cat")
    assert source.num_classes == 3
    assert (len(source.train), len(source.test)) == (10, 4)
    for split, counts in ((source.train, [4, 1, 5]), (source.test, [1, 1, 2])):
        assert split.kind == "path"
        assert np.bincount(split.labels, minlength=3).tolist() == counts
        for path, label in zip(split.values, split.labels):
            assert source.class_names[label] == written[str(path)]
    # The paths go through the pairing pipeline: same-class partners, read from disk.
    table = _class_of(source.train.values, source.train.labels, "path")
    ds = data.pair_dataset(
        source.train.values, source.train.labels, 5, seed=0, kind="path", augment=_fingerprint
    )
    _assert_same_class_pairs(ds, table, num_batches=6)


def test_folder_presets_and_val(tmp_path):
    _write_tree(str(tmp_path), test_name="val")
    source = sources.load("tiny_imagenet", data_dir=str(tmp_path))
    assert source.preset == "tiny" and len(source.test) == 4
    assert all(os.sep + "val" + os.sep in str(p) for p in source.test.values)
    assert sources.load("mit67", data_dir=str(tmp_path)).preset == "imagenet"


def test_folder_prefers_test_over_val(tmp_path):
    _write_tree(str(tmp_path), test_name="test")
    _write_tree(str(tmp_path), test_name="val", classes={"ant": (4, 3)})
    source = sources.load("folder", data_dir=str(tmp_path))
    assert len(source.test) == 4


def test_folder_test_class_may_be_empty_or_missing(tmp_path):
    _write_tree(str(tmp_path), classes={"ant": (2, 1), "bee": (2, 0)})
    assert sources.load("folder", data_dir=str(tmp_path)).test.labels.tolist() == [0]
    os.remove(tmp_path / "test" / "bee" / "notes.txt")
    os.rmdir(tmp_path / "test" / "bee")
    source = sources.load("folder", data_dir=str(tmp_path))
    assert source.num_classes == 2 and source.test.labels.tolist() == [0]


@pytest.mark.parametrize(
    "breakage,match",
    [
        ("no_data_dir", r"pass --data_dir=ROOT with ROOT/train/<class>/\*\.jpg"),
        ("missing_root", r"under .*nowhere, which does not exist"),
        ("no_train", r"needs image folders .*train/<class>/\*\.jpg, and .*train does not exist"),
        ("no_classes", r"train has no class folders"),
        ("empty_class", r"The class folder .*bee has no images"),
        ("unknown_test_class", r"test has class folders that .*train lacks: wasp"),
        ("no_test", r"has no test folder: expected one of .*test, .*val"),
        ("empty_test", r"test holds no images"),
    ],
)
def test_folder_errors(tmp_path, breakage, match):
    root = str(tmp_path)
    _write_tree(root)
    data_dir = root
    if breakage == "no_data_dir":
        data_dir = None
    elif breakage == "missing_root":
        data_dir = os.path.join(root, "nowhere")
    elif breakage == "no_train":
        os.rename(os.path.join(root, "train"), os.path.join(root, "training"))
    elif breakage == "no_classes":
        data_dir = os.path.join(root, "bare")
        os.makedirs(os.path.join(data_dir, "train"))
    elif breakage == "empty_class":
        for f in os.listdir(os.path.join(root, "train", "bee")):
            if f.endswith("png"):
                os.remove(os.path.join(root, "train", "bee", f))
    elif breakage == "unknown_test_class":
        os.makedirs(os.path.join(root, "test", "wasp"))
    elif breakage == "no_test":
        os.rename(os.path.join(root, "test"), os.path.join(root, "testing"))
    elif breakage == "empty_test":
        data_dir = os.path.join(root, "bare")
        os.makedirs(os.path.join(data_dir, "train", "ant"))
        os.makedirs(os.path.join(data_dir, "test", "ant"))
        os.rename(
            os.path.join(root, "train", "ant", "0.png"),
            os.path.join(data_dir, "train", "ant", "0.png"),
        )
    with pytest.raises(UserError, match=match) as info:
        sources.load("folder", data_dir=data_dir)
    assert "\n" not in str(info.value)


# --- stratified_split ---------------------------------------------------------------------------


def _labelled(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = np.random.default_rng(1).permutation(labels)
    return sources.Split(np.arange(len(labels)) * 10, labels.astype(np.int64), "pixels")


@pytest.mark.parametrize(
    "fraction,counts,expected",
    [
        # round(0.2 * n): 10 -> 2, 5 -> 1, 3 -> round(0.6) = 1, 1 -> 0, 2 -> round(0.4) = 0.
        (0.2, [10, 5, 3, 1, 2], [2, 1, 1, 0, 0]),
        # round(0.9 * n), but a class keeps at least one sample: 2 -> 1, 1 -> 0, 10 -> 9.
        (0.9, [2, 1, 10], [1, 0, 9]),
        # Round half to even (Python's round): 0.5 * 5 = 2.5 -> 2, 0.5 * 3 = 1.5 -> 2.
        (0.5, [5, 3, 4], [2, 2, 2]),
        (0.0, [4, 1], [0, 0]),
    ],
)
def test_stratified_split_counts(fraction, counts, expected):
    full = _labelled(counts)
    train, val = sources.stratified_split(full, fraction, seed=3)
    assert np.bincount(val.labels, minlength=len(counts)).tolist() == expected
    assert (
        np.bincount(train.labels, minlength=len(counts)).tolist()
        == (np.array(counts) - np.array(expected)).tolist()
    )
    # Disjoint and complete; the values travel with their labels.
    train_ids, val_ids = train.values // 10, val.values // 10
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(len(full)))
    np.testing.assert_array_equal(full.labels[train_ids], train.labels)
    np.testing.assert_array_equal(full.labels[val_ids], val.labels)
    assert train.kind == val.kind == "pixels"


def test_stratified_split_is_seeded():
    full = _labelled([30, 30, 30])
    _, a = sources.stratified_split(full, 0.3, seed=0)
    _, b = sources.stratified_split(full, 0.3, seed=0)
    _, c = sources.stratified_split(full, 0.3, seed=1)
    np.testing.assert_array_equal(a.values, b.values)
    assert len(c) == len(a) == 27
    assert not np.array_equal(a.values, c.values)


# --- digits and the registry ---------------------------------------------------------------------


def test_load_digits():
    source = sources.load("digits")
    assert source.name == "digits" and source.preset == "digits" and source.num_classes == 10
    assert source.class_names == tuple(str(d) for d in range(10))
    assert (len(source.train), len(source.test)) == (1438, 359)
    # Per class round(0.2 * n) of scikit-learn's class counts.
    counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert np.bincount(source.test.labels).tolist() == [int(round(0.2 * n)) for n in counts]
    for split in (source.train, source.test):
        assert split.kind == "pixels"
        assert split.values.dtype == np.uint8 and split.values.shape[1:] == (8, 8, 1)
        assert split.values.min() == 0 and split.values.max() == 255
    # Pixels 0..16 scaled by 255 / 16: only the 17 values round(k * 15.9375).
    allowed = {int(round(k * 255 / 16)) for k in range(17)}
    assert set(np.unique(source.train.values).tolist()) <= allowed
    # The same images as scikit-learn's, split without loss or repetition.
    from sklearn import datasets

    digits = datasets.load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
    expected = sorted(image.tobytes() for image in pixels.reshape(-1, 64))
    got = sorted(
        v.tobytes() for split in (source.train, source.test) for v in split.values.reshape(-1, 64)
    )
    assert got == expected
    assert data.PRESETS["digits"].input_shape == (8, 8, 1)


def test_unknown_name_lists_the_choices():
    with pytest.raises(UserError) as info:
        sources.load("nope")
    message = str(info.value)
    assert "Unknown data set 'nope'" in message
    expected = [
        "cifar100",
        "cub",
        "digits",
        "folder",
        "imagenet",
        "mit67",
        "mixed",
        "stanford_dogs",
        "tiny_imagenet",
    ]
    for name in expected:
        assert name in message
    assert sources.names() == expected
