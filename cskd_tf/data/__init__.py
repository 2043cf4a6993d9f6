"""Data: sources, same-class pairing and augmentation."""

from cskd_tf.data.augment import Augmenter
from cskd_tf.data.augment import PRESETS
from cskd_tf.data.pairs import example_dataset
from cskd_tf.data.pairs import pair_dataset
from cskd_tf.data.pairs import pair_indices
from cskd_tf.data.pairs import split_dataset
from cskd_tf.data.pairs import stream_pair_dataset
from cskd_tf.data.pairs import training_dataset
from cskd_tf.data.sources import DataSource
from cskd_tf.data.sources import Split
from cskd_tf.data.sources import StreamSplit
from cskd_tf.data.sources import load
from cskd_tf.data.sources import stratified_split
