"""Keras callbacks that report the paper's metrics on held-out data during `fit`."""

import collections

import keras
import numpy as np
import tensorflow as tf

from cskd_tf import backbones
from cskd_tf import metrics

Predictions = collections.namedtuple("Predictions", ["logits", "features", "labels"])


def classifier_of(model):
    """The plain classifier inside `model`: a CSKDModel's backbone, or the model itself."""
    return getattr(model, "backbone", model)


class Predictor:
    """One inference pass that returns logits, pooled features and labels together.

    The features are the output of the backbone's layer named `features`
    (`cskd_tf.backbones.FEATURES_LAYER`), or, for a model without one, the input
    of its last layer (the penultimate activations of a functional or sequential
    classifier). The pass runs under the model's distribution strategy: each
    global batch is split over the replicas and the results are gathered back in
    order, so it gives the same arrays on one device and on several.

    Args:
      model: keras.Model. A built classifier (images -> logits) or a CSKDModel.
    """

    def __init__(self, model):
        net = classifier_of(model)
        self._strategy = model.distribute_strategy
        if isinstance(self._strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Each worker would see only its shard of the data: predict on this
            # worker alone (callbacks run outside the strategy's scope).
            self._strategy = tf.distribute.get_strategy()
        with self._strategy.scope():
            try:
                self._net = backbones.feature_model(net)
            except ValueError:
                penultimate = getattr(net.layers[-1], "input", None) if net.layers else None
                if penultimate is None or not hasattr(net, "inputs"):
                    raise ValueError(
                        f"Cannot find the features of model '{net.name}': name its penultimate "
                        f"layer '{backbones.FEATURES_LAYER}'."
                    ) from None
                self._net = keras.Model(net.inputs, [net.outputs[0], penultimate])
        self._step = None

    def _share_first_replicas_statistics(self):
        # Under MirroredStrategy every replica updates its own copy of batch-norm's moving
        # statistics from its share of each batch, and the copies drift apart; saving and
        # export read the first replica's. Each replica predicts with its own copy, so make
        # them all the first's (as PyTorch's DataParallel and DDP broadcast device 0's
        # buffers), lest a prediction depend on the replica that made it.
        # (A multi-worker model predicts on the local worker alone: one replica, see __init__.)
        if self._strategy.num_replicas_in_sync == 1:
            return
        with self._strategy.scope():
            for variable in self._net.non_trainable_variables:
                value = getattr(variable, "value", variable)
                if isinstance(value, tf.distribute.DistributedValues):
                    value.assign(value.read_value())

    def _replica_step(self, x, y):
        def predict():
            logits, features = self._net(x, training=False)
            # Under mixed precision the features come out in float16.
            return tf.cast(logits, tf.float32), tf.cast(features, tf.float32)

        def empty():  # A replica's empty share of a short last batch: no pass (see Classifier).
            widths = [output.shape[-1] for output in self._net.outputs]
            return tuple(tf.zeros([0, width], tf.float32) for width in widths)

        if self._strategy.num_replicas_in_sync == 1:
            return (*predict(), y)
        return (*tf.cond(tf.shape(x)[0] > 0, predict, empty), y)

    def _distributed_step(self, x, y):
        outputs = self._strategy.run(self._replica_step, args=(x, y))
        # Each replica holds a contiguous slice of the global batch; concatenating
        # them in replica order restores it. (A collective `strategy.gather` here
        # would share instance keys with the training step's all-reduce.)
        return tuple(
            tf.concat(self._strategy.experimental_local_results(o), axis=0) for o in outputs
        )

    def __call__(self, dataset):
        """Predicts on every batch of `dataset`.

        Args:
          dataset: tf.data.Dataset of batches `(x, y)` (or `(x, y, sample_weight)`,
            the weight ignored).

        Returns:
          Predictions(logits [N, C] float32, features [N, D] float32, labels [N]), numpy.
        """
        if self._step is None:  # One trace, reused every epoch.
            self._step = tf.function(self._distributed_step, reduce_retracing=True)
        self._share_first_replicas_statistics()
        dataset = dataset.map(lambda *batch: batch[:2])
        parts = ([], [], [])
        for x, y in self._strategy.experimental_distribute_dataset(dataset):
            for part, value in zip(parts, self._step(x, y)):
                part.append(value.numpy())
        return Predictions(*(np.concatenate(p) for p in parts))


def predict(model, dataset):
    """`Predictor(model)(dataset)`: logits, features and labels of one pass, as numpy."""
    return Predictor(model)(dataset)


class EvaluationCallback(keras.callbacks.Callback):
    """Adds ECE, recall@1 and the error rates on held-out data to the epoch logs.

    After the first epoch, every `every` epochs and after the last, one
    prediction pass over `data` gives logits and pooled features; from them the
    callback writes `{prefix}top1_error`, `{prefix}top5_error`, `{prefix}nll`,
    `{prefix}ece` (20 bins), `{prefix}aurc` and `{prefix}recall_at_1` (fractions)
    into `logs`. Callbacks after it in the list (`ModelCheckpoint`,
    `EarlyStopping`, `CSVLogger`, `TensorBoard`) and the `History` see them, so
    place it first. The first epoch is always evaluated so that `CSVLogger`,
    which fixes its columns at the first epoch, keeps these columns.

    Args:
      data: tf.data.Dataset of batches `(x, y)`, e.g. the validation split.
      every: int. Evaluate every this many epochs (and after the first and the last).
      prefix: str. Prepended to the metric names; `"val_"` by Keras' convention.
      num_bins: int. ECE bins (the paper uses 20).

    Reference: the metrics of Yun et al., CVPR 2020, section 3.1 (ECE, R@1) and
    AURC (Geifman et al., ICLR 2019).
    """

    def __init__(self, data, every=1, prefix="val_", num_bins=20):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.data = data
        self.every = every
        self.prefix = prefix
        self.num_bins = num_bins
        self._predictor = None
        self._predictor_model = None

    def due(self, epoch):
        """Whether epoch `epoch` (0-based) is evaluated."""
        last = self.params.get("epochs") if self.params else None
        return epoch == 0 or (epoch + 1) % self.every == 0 or epoch + 1 == last

    def on_train_begin(self, logs=None):
        self._first = True

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:  # Cut short (a stop signal, a divergence): not an epoch.
            return
        # The first epoch of every `fit` is scored too (a resumed run starts late), for CSVLogger.
        first, self._first = getattr(self, "_first", True), False
        if logs is None or not (first or self.due(epoch)):
            return
        if not np.isfinite(logs.get("loss", 0.0)):  # Diverged: nothing worth scoring.
            return
        if self._predictor_model is not self.model:
            self._predictor, self._predictor_model = Predictor(self.model), self.model
        outputs = self._predictor(self.data)
        # The paper's metrics only: the calibration metrics other papers compare
        # (`ece_15`, `brier`, ...) are reported once, in metrics.json.
        results = metrics.classification_metrics(
            outputs.logits,
            outputs.labels,
            features=outputs.features,
            num_bins=self.num_bins,
            extra_calibration=False,
        )
        results.pop("num_examples")
        logs.update({self.prefix + name: value for name, value in results.items()})


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' `TensorBoard` callback, without the epochs that training stopped in midway.

    An epoch cut short (a stop signal, a diverged loss sets `model.stop_training`
    during it) is not logged: a run resumed from the middle of that epoch logs it
    whole, once. Put it before callbacks that stop training in `on_epoch_end`,
    whose epoch did end.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            super().on_epoch_end(epoch, logs)
