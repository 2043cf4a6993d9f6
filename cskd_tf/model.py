"""CSKDModel: any Keras classifier trained with class-wise self-distillation."""

import keras
import tensorflow as tf

from cskd_tf import losses


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _is_pair(x):
    return isinstance(x, (tuple, list)) and len(x) == 2


@keras.saving.register_keras_serializable(package="cskd_tf")
class CSKDModel(keras.Model):
    """Wraps a classifier so that `fit` trains it with CS-KD.

    `call` is the backbone's, so `predict`, `evaluate` and export see a plain
    classifier. `fit` takes batches `((x, x_pair), y)` in which `x_pair[i]` is
    another sample of class `y[i]` (see `cskd_tf.data.pair_dataset`) and
    minimises

        CE(f(x), y) + lambda_cls * mean_i T^2 KL(softmax(f(x'_i)/T) || softmax(f(x_i)/T)).

    With `lambda_cls=0` it is plain cross-entropy training on the anchors (the
    partner pass still runs, as it does in the reference).

    The partner pass runs in training mode, like the authors' code: batch-norm
    normalises the partners with their own batch statistics and both passes
    update the moving statistics. It runs outside the gradient tape, so it
    costs one forward pass and keeps no activations for back-propagation.

    Args:
      backbone: keras.Model. Maps images to logits `[batch, classes]`.
      temperature: float. Softening temperature `T > 0` (paper default 4).
      lambda_cls: float. Weight `lambda_cls >= 0` of the class-wise term
        (paper default 1; 3 for CUB-200-2011).
      **kwargs: forwarded to `keras.Model`.

    Reference: Yun et al., "Regularizing Class-wise Predictions via
    Self-knowledge Distillation", CVPR 2020, section 2 and Algorithm 1.
    """

    def __init__(self, backbone, temperature=4.0, lambda_cls=1.0, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not lambda_cls >= 0:
            raise ValueError(f"lambda_cls must be >= 0, got {lambda_cls}.")
        self.backbone = backbone
        self.temperature = float(temperature)
        self.lambda_cls = float(lambda_cls)
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.cls_tracker = keras.metrics.Mean(name="cls_loss")
        if backbone.built:
            # Built with its backbone, so summary(), save() and the weights work before fit.
            self.build(backbone.input_shape)

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.backbone(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Like `keras.Model.compile`, with sparse cross-entropy on logits as the default loss."""
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not _is_pair(x):
            raise ValueError(
                "CSKDModel.fit expects batches ((x, x_pair), y); build them with "
                "cskd_tf.data.pair_dataset."
            )
        x, x_pair = x
        # Partner pass: training mode as in the reference, no gradient.
        pair_logits = tf.stop_gradient(self(x_pair, training=True))
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            # Keras losses already divide by the replica count.
            ce = self._compute_loss(
                x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
            )
            kl = losses.class_wise_kl(logits, pair_logits, self.temperature)
            if sample_weight is not None:
                kl *= tf.cast(tf.reshape(sample_weight, [-1]), kl.dtype)
            # The optimizer sums gradients over replicas: divide the per-replica
            # "batchmean" by the replica count, as Keras does for its own losses.
            cls = tf.reduce_mean(kl) / _num_replicas()
            loss = ce + self.lambda_cls * cls
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))

        batch = tf.shape(logits)[0]
        self._loss_tracker.update_state(loss * _num_replicas(), sample_weight=batch)
        self.ce_tracker.update_state(ce * _num_replicas(), sample_weight=batch)
        self.cls_tracker.update_state(cls * _num_replicas(), sample_weight=batch)
        return self.compute_metrics(x, y, logits, sample_weight=sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if _is_pair(x):  # A paired dataset evaluates on its anchors.
            x = x[0]
        logits = self(x, training=False)
        ce = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=False
        )
        self._loss_tracker.update_state(ce * _num_replicas(), sample_weight=tf.shape(logits)[0])
        logs = self.compute_metrics(x, y, logits, sample_weight=sample_weight)
        # Only the training step computes the two parts of the loss.
        return {k: v for k, v in logs.items() if k not in ("ce_loss", "cls_loss")}

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Under a distribution strategy Keras builds the compiled loss and metrics
        # by calling the model on the first element of the data, which for `fit`
        # is the pair `(x, x_pair)`: give it the anchors alone.
        if data_batch is not None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
            if _is_pair(x):
                data_batch = (x[0], y, sample_weight)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            temperature=self.temperature,
            lambda_cls=self.lambda_cls,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
