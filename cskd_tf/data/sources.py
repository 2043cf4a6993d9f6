"""Where images come from: scikit-learn's digits, tfds, and image folders."""

import dataclasses
import os

import numpy as np

from cskd_tf.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Split:
    """A split with random access by index.

    Attributes:
      values: array `[N, ...]`. Decoded uint8 pixels, encoded image bytes or
        file paths, according to `kind`.
      labels: int64 array `[N]`.
      kind: str. `pixels`, `encoded` or `path` (see `cskd_tf.data.pairs.decoder`).
    """

    values: np.ndarray
    labels: np.ndarray
    kind: str

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.values[indices], self.labels[indices], self.kind)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
    """A split that can only be streamed (no random access).

    Attributes:
      make: callable returning a `tf.data.Dataset` of `(encoded bytes, label)`.
      size: int. Number of examples.
      kind: str. Always `encoded` for the tfds streams.
    """

    make: object
    size: int
    kind: str = "encoded"

    def __len__(self):
        return self.size


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A data set ready for pairing.

    Attributes:
      name: str. Data set name.
      num_classes: int.
      train: Split or StreamSplit.
      test: Split or StreamSplit.
      preset: str. Augmentation preset (`cskd_tf.data.augment.PRESETS`).
      class_names: tuple of str.
      groups: tuple of int. The coarse group of each fine label (`groups[label]`),
        for hierarchical accuracy (`cskd_tf.metrics.hierarchical_accuracy`); empty
        when the data set has no hierarchy.
      group_names: tuple of str. The name of each group (`group_names[group]`).
    """

    name: str
    num_classes: int
    train: object
    test: object
    preset: str
    class_names: tuple = ()
    groups: tuple = ()
    group_names: tuple = ()


def stratified_split(split, fraction, seed=0):
    """Takes `fraction` of each class of `split` out as a validation split.

    Each class gives `round(fraction * count)` samples (a class of one gives
    none), chosen by a seeded permutation, so the split is the same every run.

    Args:
      split: Split.
      fraction: float in [0, 1).
      seed: int.

    Returns:
      `(train, validation)` Splits.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        take = int(round(fraction * len(members)))
        take = min(take, len(members) - 1)
        val.extend(rng.permutation(members)[:take])
    val = np.sort(np.asarray(val, np.int64))
    train = np.setdiff1d(np.arange(len(split)), val)
    return split.subset(train), split.subset(val)


# --- scikit-learn digits --------------------------------------------------


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline.

    Pixels 0..16 are scaled to uint8 0..255; the test split is a fixed
    stratified 20%.
    """
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    full = Split(pixels, digits.target.astype(np.int64), "pixels")
    train, test = stratified_split(full, test_fraction, seed=seed)
    return DataSource("digits", 10, train, test, "digits", tuple(str(d) for d in range(10)))


# --- TensorFlow Datasets ---------------------------------------------------

# name -> (tfds name, test split, preset, decoded pixels in memory?, streamed?)
TFDS = {
    "cifar100": ("cifar100", "test", "cifar", True, False),
    "cub": ("caltech_birds2011", "test", "imagenet", False, False),
    "stanford_dogs": ("stanford_dogs", "test", "imagenet", False, False),
    "imagenet": ("imagenet2012", "validation", "imagenet", False, True),
}
# The tfds names are accepted as aliases.
ALIASES = {v[0]: k for k, v in TFDS.items()}


def _hint(tfds_name):
    """How to provide a tfds set that is not prepared: the end of a UserError."""
    if tfds_name == "imagenet2012":  # The one set tfds cannot download.
        return (
            "put the ImageNet archives ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in DIR/downloads/manual (or run `tfds build "
            "imagenet2012 --data_dir=DIR` where they are) and pass --data_dir=DIR"
        )
    return (
        f"prepare it on a machine with internet access with `tfds build "
        f"{tfds_name} --data_dir=DIR`, copy DIR here and pass --data_dir=DIR"
    )


def _where(data_dir):
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _tfds_error(name, tfds_name, data_dir, err):
    """The one-sentence UserError for a tfds failure `err`."""
    where = _where(data_dir)
    hint = _hint(tfds_name)
    if isinstance(err, ImportError):
        # tfds 4.9.x imports importlib_resources to download but does not declare it
        # for Python >= 3.9 (tensorflow/datasets#11212).
        return UserError(
            f"Could not prepare the data set '{name}' (tfds {tfds_name}) in {where}: "
            f"tfds needs the Python module '{err.name}' to prepare data sets "
            f"(pip install {err.name}); or {hint}."
        )
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    return UserError(
        f"Could not load the data set '{name}' (tfds {tfds_name}) from {where} "
        f"({reason[:200]}); {hint}."
    )


def _unreachable_hosts(urls, timeout=5.0):
    """Hosts of `urls` that accept no TCP connection within `timeout` seconds.

    Behind a proxy a direct connection proves nothing, so then none are reported.
    """
    import urllib.parse  # pylint: disable=g-import-not-at-top
    import urllib.request  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top

    if urllib.request.getproxies():
        return []
    ports = {"http": 80, "https": 443, "ftp": 21}
    hosts = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            hosts[parts.hostname] = parts.port or ports.get(parts.scheme, 443)
    unreachable = []
    for host, port in sorted(hosts.items()):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError:
            unreachable.append(host)
    return unreachable


def _download_urls(builder):
    """The URLs tfds downloads `builder`'s data from, as far as it records them."""
    try:
        return list(builder.url_infos or ())
    except Exception:  # pylint: disable=broad-except
        # tfds cannot read its own checksum files (e.g. tensorflow/datasets#11212):
        # download_and_prepare fails the same way at once, so no probe is needed.
        return []


def _prepared_builder(name, tfds_name, data_dir):
    """The tfds builder of `tfds_name` with its data in place, downloaded if need be.

    Data already prepared under `data_dir` is used as it is. Otherwise tfds
    downloads it, when the download hosts answer: offline, tfds would retry each
    URL for minutes before failing, so an unreachable host fails at once with a
    UserError instead. ImageNet (manual download) is built from the archives in
    `data_dir/downloads/manual`, with no network.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    try:
        # `as_dataset` rather than `is_prepared()`: it is the check tfds itself
        # makes before reading (AssertionError when the data is not there), and it
        # also holds where tfds serves data without a prepared directory
        # (a read-only GCS copy, tfds.testing.mock_data).
        builder.as_dataset(split="train")
        return builder
    except AssertionError:
        pass
    where = os.fspath(builder.data_dir_root)
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS is not None:
        manual = os.path.join(where, "downloads", "manual")
        if not os.path.isdir(manual) or not os.listdir(manual):
            raise UserError(
                f"The data set '{name}' (tfds {tfds_name}) is not prepared in {where} "
                f"and tfds cannot download it; {_hint(tfds_name)}."
            )
    else:
        unreachable = _unreachable_hosts(_download_urls(builder))
        if unreachable:
            raise UserError(
                f"The data set '{name}' (tfds {tfds_name}) is not prepared in {where} "
                f"and cannot be downloaded ({', '.join(unreachable)} cannot be "
                f"reached); {_hint(tfds_name)}."
            )
    builder.download_and_prepare()
    return builder


def _decoders(decode):
    """Reads only the image and the label of each example.

    `PartialDecoding` leaves the other features (CUB's segmentation masks and
    boxes, ...) undecoded, which tfds would otherwise decode for every example;
    without `decode` the image stays encoded bytes.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.decode.PartialDecoding(
        {"image": True, "label": True},
        decoders=None if decode else {"image": tfds.decode.SkipDecoding()},
    )


def _tfds_split(builder, split, decode, chunk=4096):
    """Reads a whole split into memory as a Split."""
    ds = builder.as_dataset(split=split, as_supervised=True, decoders=_decoders(decode))
    # Read in chunks rather than with `batch_size=-1`: that single batch is sized
    # by `info.splits.total_num_examples`, and where tfds has no split sizes
    # recorded (tfds.testing.mock_data, a builder read from code) it becomes
    # sys.maxsize, which aborts the whole process inside tf.data.
    values, labels = [], []
    for v, y in ds.batch(chunk).as_numpy_iterator():
        values.append(v)
        labels.append(y)
    if not values:
        raise UserError(f"The split '{split}' of tfds {builder.name} is empty.")
    values = np.concatenate(values)
    kind = "pixels" if decode else "encoded"
    if not decode:
        values = values.astype(object)
    return Split(values, np.concatenate(labels).astype(np.int64), kind)


def _tfds_stream(builder, split):
    """A split streamed from disk as a StreamSplit."""
    decoders = _decoders(False)

    def make():
        return builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=split == "train", decoders=decoders
        )

    # tfds asserts each split's cardinality from its file instructions; it is
    # known even where `info.splits` is not filled in (e.g. under mock_data).
    size = int(make().cardinality())
    if size < 0:
        size = builder.info.splits[split].num_examples
    return StreamSplit(make, size)


def load_tfds(name, data_dir=None):
    """Loads a data set of the paper through tfds.

    CIFAR-100 is held decoded in memory (150 MB); the fine-grained sets as
    encoded bytes, decoded per element; ImageNet is streamed.

    Data prepared under `data_dir` (default `$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`) is read as it is. Data that is not there is
    downloaded and prepared on the first run when its download hosts can be
    reached; when they cannot (no internet), or anything else goes wrong in tfds,
    this raises a UserError at once, whose one sentence says how to provide the
    data (`tfds build NAME --data_dir=DIR` elsewhere, then `--data_dir=DIR`).

    Args:
      name: str. A key of `TFDS`.
      data_dir: str or None. The tfds data directory.

    Returns:
      DataSource.
    """
    tfds_name, test_split, preset, decode, streamed = TFDS[name]
    try:
        builder = _prepared_builder(name, tfds_name, data_dir)
        if streamed:
            train = _tfds_stream(builder, "train")
            test = _tfds_stream(builder, test_split)
        else:
            train = _tfds_split(builder, "train", decode)
            test = _tfds_split(builder, test_split, decode)
        label = builder.info.features["label"]
        names = tuple(label.names) if label.names else ()
        num_classes = label.num_classes
    except UserError:
        raise
    except Exception as err:  # pylint: disable=broad-except
        # tfds raises many types for "not there" (download, manual dir, checksum).
        raise _tfds_error(name, tfds_name, data_dir, err) from err
    return DataSource(name, num_classes, train, test, preset, names)


# --- Image folders -----------------------------------------------------------


def _list_images(directory):
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def _subfolders(directory):
    # Hidden folders (.ipynb_checkpoints, .git, ...) are not classes.
    return sorted(
        d
        for d in os.listdir(directory)
        if not d.startswith(".") and os.path.isdir(os.path.join(directory, d))
    )


def load_folder(root, name="folder", preset="imagenet", test_splits=("test", "val")):
    """Image folders `root/<split>/<class>/*.jpg`, read by path.

    Classes are the folder names under `root/train`, sorted; label `i` is the
    `i`-th. The test split is `root/test`, else `root/val`. Only paths are held in
    memory, so this scales to ImageNet.

    Args:
      root: str. The data directory.
      name: str. Data set name for messages.
      preset: str. Augmentation preset.
      test_splits: sequence of str. Folder names tried for the test split.
    """
    if not root:
        raise UserError(
            f"The data set '{name}' is read from image folders: pass "
            f"--data_dir=ROOT with ROOT/train/<class>/*.jpg."
        )
    if not os.path.isdir(root):
        raise UserError(
            f"The data set '{name}' is read from image folders under {root}, which does not exist."
        )
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise UserError(
            f"The data set '{name}' needs image folders "
            f"{train_dir}/<class>/*.jpg, and {train_dir} does not exist."
        )
    classes = _subfolders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class folders; expected {train_dir}/<class>/*.jpg.")
    test_dir = next(
        (os.path.join(root, s) for s in test_splits if os.path.isdir(os.path.join(root, s))), None
    )
    if test_dir is None:
        raise UserError(
            f"The data set '{name}' has no test folder: expected one of "
            f"{', '.join(os.path.join(root, s) for s in test_splits)}."
        )

    def read(directory):
        paths, labels = [], []
        for label, c in enumerate(classes):
            class_dir = os.path.join(directory, c)
            if not os.path.isdir(class_dir):
                continue
            files = _list_images(class_dir)
            if not files and directory == train_dir:
                raise UserError(
                    f"The class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})."
                )
            paths += files
            labels += [label] * len(files)
        unknown = sorted(set(_subfolders(directory)) - set(classes))
        if unknown:
            raise UserError(
                f"{directory} has class folders that {train_dir} lacks: {', '.join(unknown[:5])}."
            )
        if not paths:
            raise UserError(f"{directory} holds no images.")
        return Split(np.asarray(paths), np.asarray(labels, np.int64), "path")

    return DataSource(name, len(classes), read(train_dir), read(test_dir), preset, tuple(classes))


# --- The mixed hierarchical data set ----------------------------------------------

# The paper's mixed set (section 3.3), in label order: (group, data set, fine labels).
MIXED_PARTS = (("bird", "cub", 200), ("dog", "stanford_dogs", 120), ("indoor", "mit67", 67))
_PART_TITLES = {"cub": "CUB-200-2011", "stanford_dogs": "Stanford Dogs", "mit67": "MIT67"}


def _per_class_indices(labels, per_class, rng):
    """Sorted indices of `per_class` members of each label (all of a smaller class)."""
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _as_encoded(split):
    """A Split of paths as one of the files' bytes, so it can join encoded Splits."""
    if split.kind == "encoded":
        return split
    values = np.empty(len(split), dtype=object)  # Not `S` bytes: those drop trailing NULs.
    for i, path in enumerate(split.values):
        with open(path, "rb") as f:
            values[i] = f.read()
    return Split(values, split.labels, "encoded")


def _concat(splits, offsets):
    return Split(
        np.concatenate([s.values for s in splits]),
        np.concatenate([s.labels + o for s, o in zip(splits, offsets)]),
        "encoded",
    )


def load_mixed(data_dir, per_class=30, seed=0):
    """The paper's mixed hierarchical data set: 387 fine labels in three groups.

    Fine labels 0..199 are CUB-200-2011 (group `bird`), 200..319 Stanford Dogs
    (`dog`) and 320..386 MIT67 (`indoor`). The training split holds `per_class`
    samples of each fine label, chosen by a seeded permutation (all of a class
    that has fewer); the test split is the three original test splits (CVPR
    2020, section 3.3).

    CUB and Stanford Dogs come from tfds under `data_dir` (as `load_tfds`), MIT67
    from the image folders `data_dir/mit67/{train,test}/<class>/*.jpg` (as
    `load_folder`; `data_dir` None means the tfds default directory). The chosen
    MIT67 files are read into memory, so both splits hold encoded bytes.

    Args:
      data_dir: str or None. The tfds data directory, holding `mit67/` too.
      per_class: int or None. Training samples per fine label; None keeps all.
      seed: int. Seeds the choice; each part draws from its own stream, so the
        choice within one part does not depend on the others.

    Returns:
      DataSource with `groups` and `group_names` set.
    """
    if per_class is not None and per_class < 1:
        raise UserError(f"The data set 'mixed' needs per_class >= 1, not {per_class}.")
    # The image folders first: they are checked in a moment, the tfds sets take minutes to read.
    order = sorted(range(len(MIXED_PARTS)), key=lambda g: MIXED_PARTS[g][1] in TFDS)
    parts = {g: _mixed_part(g, data_dir, per_class, seed) for g in order}
    offsets = np.cumsum([0] + [n for _, _, n in MIXED_PARTS])[:-1]
    trains, tests, class_names = zip(*(parts[g] for g in range(len(MIXED_PARTS))))
    return DataSource(
        "mixed",
        sum(n for _, _, n in MIXED_PARTS),
        _concat(trains, offsets),
        _concat(tests, offsets),
        "imagenet",
        sum(class_names, ()),
        groups=tuple(g for g, (_, _, n) in enumerate(MIXED_PARTS) for _ in range(n)),
        group_names=tuple(g for g, _, _ in MIXED_PARTS),
    )


def _mixed_part(group, data_dir, per_class, seed):
    """Part `group` of the mixed set: `(train, test, class names)`, labels from 0."""
    group_name, part, expected = MIXED_PARTS[group]
    if part in TFDS:
        where = f"tfds {TFDS[part][0]}"
    else:
        root = os.path.join(_where(data_dir), part)
        where = f"image folders {root}/{{train,test}}/<class>/*.jpg"
    title = f"{_PART_TITLES[part]} (group '{group_name}', {where})"
    try:
        source = load_tfds(part, data_dir) if part in TFDS else load_folder(root, name=part)
    except UserError as err:
        raise UserError(f"The data set 'mixed' needs {title}: {err}") from err
    if source.num_classes != expected:
        raise UserError(
            f"The data set 'mixed' needs the {expected} classes of {title}, "
            f"and '{part}' has {source.num_classes}."
        )
    train = source.train
    if per_class is not None:
        # One stream per part: the choice in one part does not depend on the others.
        rng = np.random.default_rng([seed, group])
        train = train.subset(_per_class_indices(train.labels, per_class, rng))
    names = source.class_names or tuple(str(c) for c in range(expected))
    return (
        _as_encoded(train),
        _as_encoded(source.test),
        tuple(f"{group_name}/{n}" for n in names),
    )


def unreadable(split):
    """The images of `split` that cannot be decoded: file paths, or `#index` for stored bytes.

    Decodes every image once (in parallel); used to name the culprit after a
    decoding error stopped training, not on every run.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.data import pairs  # pylint: disable=g-import-not-at-top

    if not isinstance(split, Split) or split.kind == "pixels":
        return []
    values = tf.constant(split.values)
    decode = pairs.decoder(split.kind)

    def check(index):
        return index, tf.size(decode(tf.gather(values, index)))

    ds = tf.data.Dataset.range(len(split)).map(check, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors()
    good = {int(index) for index, _ in ds.as_numpy_iterator()}
    bad = sorted(set(range(len(split))) - good)
    if split.kind == "path":
        return [str(split.values[i]) for i in bad]
    return [f"#{i}" for i in bad]


# --- Registry ------------------------------------------------------------------

# Image-folder data sets of the paper: name -> augmentation preset.
FOLDERS = {"folder": "imagenet", "tiny_imagenet": "tiny", "mit67": "imagenet"}


def names():
    return sorted(["digits", "mixed", *TFDS, *FOLDERS])


def load(name, data_dir=None):
    """Loads a data set by name.

    Args:
      name: str. `digits` (offline, bundled with scikit-learn), a tfds set
        (`cifar100`, `cub`, `stanford_dogs`, `imagenet`, or their tfds names) or
        an image-folder set (`tiny_imagenet`, `mit67`, `folder`) under `data_dir`,
        or `mixed` (CUB + Stanford Dogs from tfds, MIT67 from `data_dir/mit67`;
        see `load_mixed`).
      data_dir: str or None. tfds data directory, or the folder root.

    Returns:
      DataSource.
    """
    name = ALIASES.get(name, name)
    if name == "digits":
        return load_digits()
    if name in TFDS:
        return load_tfds(name, data_dir)
    if name == "mixed":
        return load_mixed(data_dir)
    if name in FOLDERS:
        return load_folder(data_dir, name=name, preset=FOLDERS[name])
    raise UserError(f"Unknown data set '{name}'. Choose one of: {', '.join(names())}.")
