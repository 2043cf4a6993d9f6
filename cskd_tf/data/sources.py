"""Where images come from: scikit-learn's digits, tfds, and image folders."""

import dataclasses
import os

import numpy as np
import tensorflow as tf

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
  """
  name: str
  num_classes: int
  train: object
  test: object
  preset: str
  class_names: tuple = ()


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
  return DataSource("digits", 10, train, test, "digits",
                    tuple(str(d) for d in range(10)))


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


def _tfds_error(name, data_dir, err):
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return UserError(
      f"Could not load the data set '{name}' with tfds from {where} "
      f"({reason[:200]}); prepare it where there is internet access with "
      f"`tfds build {name} --data_dir=DIR` (ImageNet needs its archives in "
      f"DIR/downloads/manual) and pass --data_dir=DIR.")


def _tfds_split(tfds_name, split, data_dir, decode):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  ds = tfds.load(tfds_name, split=split, data_dir=data_dir, as_supervised=True,
                 batch_size=-1, decoders=decoders)
  images, labels = tfds.as_numpy(ds)
  kind = "pixels" if decode else "encoded"
  if not decode:
    images = np.asarray(images, dtype=object)
  return Split(images, np.asarray(labels, np.int64), kind)


def _tfds_stream(tfds_name, split, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  builder.download_and_prepare()
  size = builder.info.splits[split].num_examples

  def make():
    return builder.as_dataset(
        split=split, as_supervised=True, shuffle_files=split == "train",
        decoders={"image": tfds.decode.SkipDecoding()})

  return StreamSplit(make, size)


def load_tfds(name, data_dir=None):
  """Loads a data set of the paper through tfds.

  CIFAR-100 is held decoded in memory (150 MB); the fine-grained sets as
  encoded bytes, decoded per element; ImageNet is streamed.
  """
  tfds_name, test_split, preset, decode, streamed = TFDS[name]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if streamed:
      train = _tfds_stream(tfds_name, "train", data_dir)
      test = _tfds_stream(tfds_name, test_split, data_dir)
    else:
      train = _tfds_split(tfds_name, "train", data_dir, decode)
      test = _tfds_split(tfds_name, test_split, data_dir, decode)
    info = tfds.builder(tfds_name, data_dir=data_dir).info
    label = info.features["label"]
    names = tuple(label.names) if label.names else ()
    num_classes = label.num_classes
  except UserError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    # tfds raises many types for "not there" (download, manual dir, checksum).
    raise _tfds_error(tfds_name, data_dir, err) from err
  return DataSource(name, num_classes, train, test, preset, names)


# --- Image folders -----------------------------------------------------------


def _list_images(directory):
  return sorted(
      os.path.join(directory, f) for f in os.listdir(directory)
      if f.lower().endswith(IMAGE_EXTENSIONS))


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
    raise UserError(f"The data set '{name}' is read from image folders: pass "
                    f"--data_dir=ROOT with ROOT/train/<class>/*.jpg.")
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    raise UserError(f"The data set '{name}' needs image folders "
                    f"{train_dir}/<class>/*.jpg, and {train_dir} does not exist.")
  classes = sorted(d for d in os.listdir(train_dir)
                   if os.path.isdir(os.path.join(train_dir, d)))
  if not classes:
    raise UserError(f"{train_dir} has no class folders; expected "
                    f"{train_dir}/<class>/*.jpg.")
  test_dir = next((os.path.join(root, s) for s in test_splits
                   if os.path.isdir(os.path.join(root, s))), None)
  if test_dir is None:
    raise UserError(f"The data set '{name}' has no test folder: expected one of "
                    f"{', '.join(os.path.join(root, s) for s in test_splits)}.")

  def read(directory):
    paths, labels = [], []
    for label, c in enumerate(classes):
      class_dir = os.path.join(directory, c)
      if not os.path.isdir(class_dir):
        continue
      files = _list_images(class_dir)
      if not files and directory == train_dir:
        raise UserError(f"The class folder {class_dir} has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}).")
      paths += files
      labels += [label] * len(files)
    unknown = sorted(set(os.listdir(directory)) - set(classes))
    unknown = [u for u in unknown if os.path.isdir(os.path.join(directory, u))]
    if unknown:
      raise UserError(f"{directory} has class folders that {train_dir} lacks: "
                      f"{', '.join(unknown[:5])}.")
    if not paths:
      raise UserError(f"{directory} holds no images.")
    return Split(np.asarray(paths), np.asarray(labels, np.int64), "path")

  return DataSource(name, len(classes), read(train_dir), read(test_dir), preset,
                    tuple(classes))


# --- Registry ------------------------------------------------------------------

# Image-folder data sets of the paper: name -> augmentation preset.
FOLDERS = {"folder": "imagenet", "tiny_imagenet": "tiny", "mit67": "imagenet"}


def names():
  return sorted(["digits", *TFDS, *FOLDERS])


def load(name, data_dir=None):
  """Loads a data set by name.

  Args:
    name: str. `digits` (offline, bundled with scikit-learn), a tfds set
      (`cifar100`, `cub`, `stanford_dogs`, `imagenet`, or their tfds names) or
      an image-folder set (`tiny_imagenet`, `mit67`, `folder`) under `data_dir`.
    data_dir: str or None. tfds data directory, or the folder root.

  Returns:
    DataSource.
  """
  name = ALIASES.get(name, name)
  if name == "digits":
    return load_digits()
  if name in TFDS:
    return load_tfds(name, data_dir)
  if name in FOLDERS:
    return load_folder(data_dir, name=name, preset=FOLDERS[name])
  raise UserError(f"Unknown data set '{name}'. Choose one of: {', '.join(names())}.")
