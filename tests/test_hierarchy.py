"""Tests for the paper's hierarchical evaluation (CVPR 2020, section 3.3): the metrics in
cskd_tf.metrics and the mixed data set of cskd_tf.data.sources (under tfds.testing.mock_data, with a
generated MIT67 folder tree)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn import metrics as sk_metrics

from cskd_tf import data, metrics
from cskd_tf.data import sources
from cskd_tf.errors import UserError

# --- Metrics ------------------------------------------------------------------------------------

# Four fine labels in two groups; one prediction per sample: right, wrong inside the group, right,
# wrong across groups.
GROUPS = [0, 0, 1, 1]
LABELS = np.array([0, 1, 2, 3])
PREDICTED = np.array([0, 0, 2, 1])


def _one_hot_logits(predicted, num_classes, seed=0):
    """Logits whose arg-max is `predicted`, with random runners-up."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(predicted), num_classes))
    logits[np.arange(len(predicted)), predicted] = 10.0
    return logits


def test_hierarchical_accuracy_by_hand():
    logits = _one_hot_logits(PREDICTED, 4)
    # The fine error inside group 0 still predicts group 0; the cross-group one does not.
    assert metrics.hierarchical_accuracy(logits, LABELS, GROUPS) == 0.75
    assert metrics.top_k_error(logits, LABELS, 1) == 0.5
    # Probabilities (a monotone score) give the same answer.
    probs = tf.nn.softmax(logits).numpy()
    assert metrics.hierarchical_accuracy(probs, LABELS, GROUPS) == 0.75


def test_hierarchical_confusion_by_hand():
    logits = _one_hot_logits(PREDICTED, 4)
    np.testing.assert_allclose(
        metrics.hierarchical_confusion(logits, LABELS, GROUPS, 2), [[1.0, 0.0], [0.5, 0.5]]
    )
    # A third group without samples has a row of zeros.
    np.testing.assert_allclose(
        metrics.hierarchical_confusion(logits, LABELS, GROUPS, 3),
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]],
    )


@pytest.mark.parametrize("num_groups", [None, 6])
def test_hierarchical_confusion_matches_scikit_learn(num_groups):
    rng = np.random.default_rng(4)
    num_classes, n = 15, 400
    groups = rng.integers(0, 4, size=num_classes)
    groups[:4] = np.arange(4)  # Every group holds a class.
    logits = rng.normal(size=(n, num_classes))
    labels = rng.integers(0, num_classes, size=n)
    true, predicted = groups[labels], groups[logits.argmax(1)]
    g = 4 if num_groups is None else num_groups
    expected = sk_metrics.confusion_matrix(true, predicted, labels=np.arange(g), normalize="true")
    got = metrics.hierarchical_confusion(logits, labels, groups, num_groups)
    assert got.shape == (g, g)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert metrics.hierarchical_accuracy(logits, labels, groups) == pytest.approx(
        sk_metrics.accuracy_score(true, predicted)
    )


def test_hierarchical_metrics_reject_bad_groups():
    logits = _one_hot_logits(PREDICTED, 4)
    with pytest.raises(ValueError, match="one group per class"):
        metrics.hierarchical_accuracy(logits, LABELS, [0, 1, 1])
    with pytest.raises(ValueError, match="num_groups is 1"):
        metrics.hierarchical_confusion(logits, LABELS, GROUPS, 1)


def test_classification_metrics_with_groups():
    logits = _one_hot_logits(PREDICTED, 4)
    plain = metrics.classification_metrics(logits, LABELS)
    named = metrics.classification_metrics(
        logits, LABELS, groups=GROUPS, group_names=("bird", "dog")
    )
    added = {k: v for k, v in named.items() if k not in plain}
    assert added == {
        "hierarchical_accuracy": 0.75,
        # Group "bird" (labels 0, 1): both predicted in the group, one fine label wrong.
        "group_hierarchical_accuracy_bird": 1.0,
        "group_top1_error_bird": 0.5,
        # Group "dog" (labels 2, 3): the second predicted as a bird.
        "group_hierarchical_accuracy_dog": 0.5,
        "group_top1_error_dog": 0.5,
    }
    assert {k: named[k] for k in plain} == plain
    # Without names the keys carry the group index; empty groups (no hierarchy) add nothing.
    indexed = metrics.classification_metrics(logits, LABELS, groups=GROUPS)
    assert indexed["group_top1_error_1"] == 0.5 and "group_top1_error_dog" not in indexed
    assert metrics.classification_metrics(logits, LABELS, groups=()) == plain
    # A group without test samples has no rates.
    only_birds = metrics.classification_metrics(
        logits[:2], LABELS[:2], groups=GROUPS, group_names=("bird", "dog")
    )
    assert only_birds["hierarchical_accuracy"] == 1.0
    assert "group_top1_error_bird" in only_birds and "group_top1_error_dog" not in only_birds
    with pytest.raises(ValueError, match="group_names has 1 entries for 2 groups"):
        metrics.classification_metrics(logits, LABELS, groups=GROUPS, group_names=("bird",))


# --- The mixed data set -------------------------------------------------------------------------

# Random mock examples per tfds split: with 200 and 120 uniform labels, some classes have more than
# PER_CLASS of them, so the choice matters.
MOCK_EXAMPLES = 150
PER_CLASS = 2
MIT67_CLASSES = [f"scene{c:02d}" for c in range(67)]


def _mock_tfds():
    # As tests/test_sources.py: features and classes from the builders' code, no files, no network.
    return tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    )


def _write_mit67(root, classes=MIT67_CLASSES):
    """MIT67 folders under `root/mit67`: class `i` has 1 + i % 4 train and 1 + i % 2 test images.

    Returns `{split: [(file bytes, class index), ...]}` in the order `load_folder` lists them.
    """
    rng = np.random.default_rng(0)
    written = {"train": [], "test": []}
    for split, count in (("train", lambda i: 1 + i % 4), ("test", lambda i: 1 + i % 2)):
        for label, c in enumerate(classes):
            directory = os.path.join(root, "mit67", split, c)
            os.makedirs(directory)
            for i in range(count(label)):
                image = rng.integers(0, 256, (8, 8 + i, 3), dtype=np.uint8)
                # Mostly JPEG, as MIT67 is; a PNG now and then.
                if (label + i) % 5:
                    name, encoded = f"{i}.jpg", tf.io.encode_jpeg(image)
                else:
                    name, encoded = f"{i}.png", tf.io.encode_png(image)
                tf.io.write_file(os.path.join(directory, name), encoded)
                written[split].append((encoded.numpy(), label))
    return written


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed set (two seeds) with the parts it was made of, loaded once for the module."""
    root = str(tmp_path_factory.mktemp("mixed"))
    mit67 = _write_mit67(root)
    with _mock_tfds():
        parts = {name: sources.load(name, root) for name in ("cub", "stanford_dogs")}
        loaded = {seed: sources.load_mixed(root, per_class=PER_CLASS, seed=seed) for seed in (0, 1)}
        loaded["again"] = sources.load_mixed(root, per_class=PER_CLASS, seed=0)
        loaded["all"] = sources.load_mixed(root, per_class=None)
    return loaded, parts, mit67


def _part_values(parts, mit67, split):
    """`[(values, labels)]` of each part's original split, in the mixed order."""
    out = [(getattr(parts[n], split).values, getattr(parts[n], split).labels) for n in parts]
    out.append(([v for v, _ in mit67[split]], np.array([y for _, y in mit67[split]])))
    return out


@pytest.mark.slow  # The module's mixed set takes about 10 s to load.
def test_mixed_classes_and_groups(mixed):
    loaded, _, _ = mixed
    source = loaded[0]
    assert source.name == "mixed" and source.preset == "imagenet"
    assert source.num_classes == 387 and len(source.class_names) == 387
    assert source.groups == (0,) * 200 + (1,) * 120 + (2,) * 67
    assert source.group_names == ("bird", "dog", "indoor")
    for start, stop, group in ((0, 200, "bird"), (200, 320, "dog"), (320, 387, "indoor")):
        assert all(n.startswith(group + "/") for n in source.class_names[start:stop])
    assert source.class_names[320:] == tuple(f"indoor/{c}" for c in MIT67_CLASSES)
    assert len(set(source.class_names)) == 387
    for split in (source.train, source.test):
        assert isinstance(split, sources.Split) and split.kind == "encoded"
        assert split.values.dtype == object and all(isinstance(v, bytes) for v in split.values)
        assert split.labels.dtype == np.int64
        assert split.labels.min() >= 0 and split.labels.max() < 387


@pytest.mark.slow  # The module's mixed set takes about 10 s to load.
def test_mixed_test_split_is_the_three_original_test_splits(mixed):
    loaded, parts, mit67 = mixed
    test = loaded[0].test
    values, labels = [], []
    for (v, y), offset in zip(_part_values(parts, mit67, "test"), (0, 200, 320)):
        values += list(v)
        labels += list(np.asarray(y) + offset)
    assert test.values.tolist() == values and test.labels.tolist() == labels
    assert len(test) == 2 * MOCK_EXAMPLES + sum(1 + i % 2 for i in range(67))


@pytest.mark.slow  # The module's mixed set takes about 10 s to load.
def test_mixed_train_takes_per_class_samples_of_each_label(mixed):
    loaded, parts, mit67 = mixed
    train = loaded[0].train
    for (values, labels), (start, stop) in zip(
        _part_values(parts, mit67, "train"), ((0, 200), (200, 320), (320, 387))
    ):
        labels = np.asarray(labels)
        in_part = (train.labels >= start) & (train.labels < stop)
        # The part's labels are contiguous and in order: bird, then dog, then indoor.
        rows = np.flatnonzero(in_part)
        assert np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
        chosen_values = train.values[in_part]
        chosen_labels = train.labels[in_part] - start
        expected = np.minimum(np.bincount(labels, minlength=stop - start), PER_CLASS)
        assert np.bincount(chosen_labels, minlength=stop - start).tolist() == expected.tolist()
        assert expected.max() == PER_CLASS and expected.min() < PER_CLASS
        # Each chosen sample is an original one of its label (for MIT67: the bytes of a file
        # written into its class folder), none twice.
        original = {}
        for v, y in zip(values, labels):
            original.setdefault(v, set()).add(int(y))
        assert len(set(chosen_values)) == len(chosen_values)
        assert all(int(y) in original[v] for v, y in zip(chosen_values, chosen_labels))
    assert len(train) == sum(min(PER_CLASS, c) for c in _train_counts(parts, mit67))


def _train_counts(parts, mit67):
    counts = []
    for (_, labels), size in zip(_part_values(parts, mit67, "train"), (200, 120, 67)):
        counts += np.bincount(np.asarray(labels), minlength=size).tolist()
    return counts


@pytest.mark.slow  # The module's mixed set takes about 10 s to load.
def test_mixed_selection_is_seeded(mixed):
    loaded, parts, mit67 = mixed
    same, other = loaded["again"].train, loaded[1].train
    assert same.values.tolist() == loaded[0].train.values.tolist()
    assert np.array_equal(same.labels, loaded[0].train.labels)
    # Another seed: as many per label, different samples (in each part).
    count = lambda split: np.bincount(split.labels, minlength=387).tolist()
    assert count(other) == count(loaded[0].train)
    for start, stop in ((0, 200), (200, 320), (320, 387)):
        in_part = (other.labels >= start) & (other.labels < stop)
        assert other.values[in_part].tolist() != loaded[0].train.values[in_part].tolist()
    # per_class=None keeps every training sample.
    assert len(loaded["all"].train) == sum(_train_counts(parts, mit67))


@pytest.mark.slow  # The module's mixed set takes about 10 s to load.
def test_mixed_train_split_pairs(mixed):
    train = mixed[0][0].train
    ds = data.pair_dataset(
        train.values,
        train.labels,
        16,
        seed=0,
        kind=train.kind,
        augment=lambda image: tf.image.resize(image, (16, 16)),
    )
    (x, x_pair), y = next(iter(ds))
    assert x.shape == x_pair.shape == (16, 16, 16, 3)
    assert ((y.numpy() >= 0) & (y.numpy() < 387)).all()


def test_load_registers_mixed(monkeypatch):
    assert "mixed" in sources.names()
    monkeypatch.setattr(sources, "load_mixed", lambda data_dir: ("mixed", data_dir))
    assert sources.load("mixed", "/data") == ("mixed", "/data")


def test_mixed_without_mit67_is_one_clear_sentence(tmp_path):
    # The folders are checked before the tfds sets are read: no tfds data is needed.
    with pytest.raises(UserError) as info:
        sources.load_mixed(str(tmp_path))
    message = str(info.value)
    mit67 = os.path.join(str(tmp_path), "mit67")
    assert message.startswith("The data set 'mixed' needs MIT67 (group 'indoor', image folders ")
    assert f"{mit67}/{{train,test}}/<class>/*.jpg" in message
    assert f"under {mit67}, which does not exist" in message
    assert "\n" not in message and message.endswith(".")


def test_mixed_with_wrong_mit67_classes(tmp_path):
    _write_mit67(str(tmp_path), classes=MIT67_CLASSES[:3])
    with pytest.raises(UserError, match=r"needs the 67 classes of MIT67.* has 3"):
        sources.load_mixed(str(tmp_path))


def test_mixed_without_cub_names_the_part(tmp_path, offline):
    # Offline and not prepared: the tfds loader's sentence, prefixed by the part it was for.
    _write_mit67(str(tmp_path))
    with pytest.raises(UserError) as info:
        sources.load_mixed(str(tmp_path))
    message = str(info.value)
    assert message.startswith(
        "The data set 'mixed' needs CUB-200-2011 (group 'bird', tfds caltech_birds2011): "
    )
    assert "tfds build caltech_birds2011 --data_dir=DIR" in message
    assert "\n" not in message


def test_mixed_rejects_bad_per_class(tmp_path):
    with pytest.raises(UserError, match="per_class >= 1, not 0"):
        sources.load_mixed(str(tmp_path), per_class=0)
