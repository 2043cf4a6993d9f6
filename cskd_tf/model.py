"""CSKDModel: any Keras classifier trained with class-wise self-distillation."""

import keras
import tensorflow as tf

from cskd_tf import losses

SAMPLE_FORMS = ("cvpr", "iclr")


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _is_pair(x):
    return isinstance(x, (tuple, list)) and len(x) in (2, 3)


def _batchmean(values):
    # The reference's "batchmean", divided by the replica count because the optimizer sums
    # gradients over replicas, as Keras does for its own losses (and, like Keras, an empty
    # replica's share of a short last batch counts as 0).
    total = tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), values.dtype))
    return total / _num_replicas()


class _Untracked:
    """Holds a model out of Keras' and TensorFlow's tracking: the teacher is not saved."""

    def __init__(self, value):
        self.value = value


class _Classifier(keras.Model):
    """A model around `self.backbone`: `call` is the backbone's (so `predict`, `evaluate` and
    export see a plain classifier), and sparse cross-entropy on logits is the default loss."""

    def call(self, inputs, training=None):
        return self.backbone(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Like `keras.Model.compile`, with sparse cross-entropy on logits as the default loss."""
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


class _PairedClassifier(_Classifier):
    """A `_Classifier` trained on batches `((x, x_other, ...), y)`: evaluation and Keras'
    symbolic build take the first element `x` alone; `TRAINING_LOGS` are the loss parts that
    only `train_step` computes."""

    TRAINING_LOGS = ()

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if _is_pair(x):  # A paired dataset evaluates on its first elements.
            x = x[0]
        logits = self(x, training=False)
        ce = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=False
        )
        self._loss_tracker.update_state(ce * _num_replicas(), sample_weight=tf.shape(logits)[0])
        logs = self.compute_metrics(x, y, logits, sample_weight=sample_weight)
        return {k: v for k, v in logs.items() if k not in self.TRAINING_LOGS}

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Under a distribution strategy Keras builds the compiled loss and metrics
        # by calling the model on the first element of the data, which for `fit`
        # is the tuple `(x, x_other, ...)`: give it `x` alone.
        if data_batch is not None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
            if _is_pair(x):
                data_batch = (x[0], y, sample_weight)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)


@keras.saving.register_keras_serializable(package="cskd_tf")
class CSKDModel(_PairedClassifier):
    """Wraps a classifier so that `fit` trains it with CS-KD.

    `call` is the backbone's, so `predict`, `evaluate` and export see a plain
    classifier. `fit` takes batches `((x, x_pair), y)` in which `x_pair[i]` is
    another sample of class `y[i]` (see `cskd_tf.data.pair_dataset`) and
    minimises

        CE(f(x), y) + lambda_cls * mean_i T^2 KL(softmax(f(x'_i)/T) || softmax(f(x_i)/T)).

    With `lambda_cls=0` it is plain cross-entropy training on the anchors (the
    partner pass still runs, as it does in the reference, when the batches
    carry partners; plain batches `(x, y)` are accepted too).

    Two optional terms combine CS-KD with other regularisers:

    * the sample-wise term of CS-KD-E (paper eq. 3), `lambda_sample * T^2 *
      KL(softmax(f~(x_clean)/T) || softmax(f(x)/T))`, on batches
      `((x, x_pair, x_clean), y)` where `x_clean` is the same image as `x`
      without augmentation (`pair_dataset(..., clean=...)`). With
      `sample_form="iclr"` it is the ICLR submission's `lambda_sam *
      KL(P(y|x_clean; theta, T) || P(y|x; theta, T))` instead: no `T^2`, and
      the gradient flows through both views (the submission writes `theta`,
      not the fixed copy, for both);
    * knowledge distillation from a fixed `teacher` (Hinton et al., 2015):
      the loss becomes `(1 - kd_alpha) * CE + kd_alpha * T_kd^2 * KL(teacher ||
      student)` plus the CS-KD terms.

    The cross-entropy is the compiled loss, so label smoothing, a confidence
    penalty (`cskd_tf.losses.ClassificationLoss`) or Mixup's soft labels
    (`cskd_tf.data.mixup`) combine with it unchanged.

    The partner pass runs in training mode, like the authors' code: batch-norm
    normalises the partners with their own batch statistics and both passes
    update the moving statistics. It runs outside the gradient tape, so it
    costs one forward pass and keeps no activations for back-propagation.

    Args:
      backbone: keras.Model. Maps images to logits `[batch, classes]`.
      temperature: float. Softening temperature `T > 0` (paper default 4).
      lambda_cls: float. Weight `lambda_cls >= 0` of the class-wise term
        (paper default 1; 3 for CUB-200-2011).
      lambda_sample: float. Weight `lambda_E >= 0` of the sample-wise term (CS-KD-E).
      sample_form: str. `cvpr` (the paper's eq. 3) or `iclr` (the submission's `L_sam`).
      teacher: keras.Model or None. A fixed classifier distilled into this one.
      kd_alpha: float in [0, 1]. Weight of the distillation term.
      kd_temperature: float > 0. Temperature of the distillation term.
      **kwargs: forwarded to `keras.Model`.

    Reference: Yun et al., "Regularizing Class-wise Predictions via
    Self-knowledge Distillation", CVPR 2020, section 2 and Algorithm 1.
    """

    TRAINING_LOGS = ("ce_loss", "cls_loss", "sample_loss", "kd_loss")

    def __init__(
        self,
        backbone,
        temperature=4.0,
        lambda_cls=1.0,
        lambda_sample=0.0,
        sample_form="cvpr",
        teacher=None,
        kd_alpha=0.0,
        kd_temperature=4.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not lambda_cls >= 0:
            raise ValueError(f"lambda_cls must be >= 0, got {lambda_cls}.")
        if not lambda_sample >= 0:
            raise ValueError(f"lambda_sample must be >= 0, got {lambda_sample}.")
        if not 0 <= kd_alpha <= 1 or (kd_alpha > 0 and teacher is None):
            raise ValueError(f"kd_alpha must be in [0, 1] and needs a teacher, got {kd_alpha}.")
        if sample_form not in SAMPLE_FORMS:
            raise ValueError(
                f"sample_form must be one of {', '.join(SAMPLE_FORMS)}, got {sample_form!r}."
            )
        if not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}.")
        self.backbone = backbone
        self.temperature = float(temperature)
        self.lambda_cls = float(lambda_cls)
        self.lambda_sample = float(lambda_sample)
        self.sample_form = sample_form
        self._teacher = _Untracked(teacher)
        if teacher is not None:
            teacher.trainable = False
        self.kd_alpha = float(kd_alpha)
        self.kd_temperature = float(kd_temperature)
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.cls_tracker = keras.metrics.Mean(name="cls_loss")
        if self.lambda_sample:
            self.sample_tracker = keras.metrics.Mean(name="sample_loss")
        if teacher is not None:
            self.kd_tracker = keras.metrics.Mean(name="kd_loss")
        if backbone.built:
            # Built with its backbone, so summary(), save() and the weights work before fit.
            self.build(backbone.input_shape)

    @property
    def teacher(self):
        return self._teacher.value

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.built = True

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_pair = x_clean = None
        if _is_pair(x):
            x, x_pair, x_clean = (*x, None)[:3]
        elif self.lambda_cls:
            raise ValueError(
                "CSKDModel.fit expects batches ((x, x_pair), y); build them with "
                "cskd_tf.data.pair_dataset."
            )
        if self.lambda_sample and x_clean is None:
            raise ValueError(
                "lambda_sample > 0 needs batches ((x, x_pair, x_clean), y); build them with "
                "cskd_tf.data.pair_dataset(..., clean=...)."
            )
        weights = None if sample_weight is None else tf.reshape(sample_weight, [-1])

        def term(values):
            if weights is not None:
                values *= tf.cast(weights, values.dtype)
            return _batchmean(values)

        # Targets: training-mode passes as in the reference, no gradient.
        pair_logits = tf.stop_gradient(self(x_pair, training=True)) if x_pair is not None else None
        fixed_clean = self.lambda_sample and self.sample_form == "cvpr"
        clean_logits = tf.stop_gradient(self(x_clean, training=True)) if fixed_clean else None
        teacher_logits = (
            tf.stop_gradient(self.teacher(x, training=False)) if self.teacher is not None else None
        )
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            # Keras losses already divide by the replica count.
            ce = self._compute_loss(
                x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
            )
            loss = (1.0 - self.kd_alpha) * ce
            parts = {"ce": ce}
            if pair_logits is not None:
                parts["cls"] = term(losses.class_wise_kl(logits, pair_logits, self.temperature))
                loss += self.lambda_cls * parts["cls"]
            if clean_logits is not None:
                parts["sample"] = term(losses.class_wise_kl(logits, clean_logits, self.temperature))
                loss += self.lambda_sample * parts["sample"]
            elif self.lambda_sample:  # The ICLR form: the clean view's pass is differentiated.
                clean = self(x_clean, training=True)
                parts["sample"] = term(losses.kl_divergence(clean, logits, self.temperature))
                loss += self.lambda_sample * parts["sample"]
            if teacher_logits is not None:
                parts["kd"] = term(
                    losses.class_wise_kl(logits, teacher_logits, self.kd_temperature)
                )
                loss += self.kd_alpha * parts["kd"]
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))

        batch = tf.shape(logits)[0]
        self._loss_tracker.update_state(loss * _num_replicas(), sample_weight=batch)
        trackers = {"ce": self.ce_tracker, "cls": self.cls_tracker}
        trackers.update(sample=getattr(self, "sample_tracker", None))
        trackers.update(kd=getattr(self, "kd_tracker", None))
        for name, value in parts.items():
            trackers[name].update_state(value * _num_replicas(), sample_weight=batch)
        return self.compute_metrics(x, y, logits, sample_weight=sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            lambda_cls=self.lambda_cls,
            lambda_sample=self.lambda_sample,
            sample_form=self.sample_form,
            kd_alpha=self.kd_alpha,
            kd_temperature=self.kd_temperature,
        )
        # The teacher only shapes training: a saved model keeps the student alone.
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("kd_alpha"):  # Saved without its teacher: reloads as a plain student.
            config["kd_alpha"] = 0.0
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="cskd_tf")
class HeadModel(_Classifier):
    """A backbone whose last dense layer is replaced by a head that sees the labels in training.

    For the angular-margin baselines (`cskd_tf.heads`: AdaCos, Virtual-softmax),
    whose training logits depend on the target class. `backbone` (the
    attribute) is a plain functional classifier, images -> the head's
    inference logits, that keeps the `features` layer, so prediction, the
    evaluation callback and export treat it like any other backbone. Training
    applies the compiled loss to the head's training logits (Virtual-softmax
    adds a virtual class, which is never a label) and counts accuracy over the
    real classes only.

    Args:
      backbone: keras.Model. A registry backbone (with a `features` layer).
      head: keras.layers.Layer. Called as `head(features, labels, training)`;
        None when `backbone` is an assembled one (as `from_config` passes it).
      **kwargs: forwarded to `keras.Model`.
    """

    def __init__(self, backbone, head, **kwargs):
        super().__init__(**kwargs)
        from cskd_tf import backbones  # pylint: disable=g-import-not-at-top

        if head is None:  # Reloaded from its config: `backbone` is already assembled.
            self.backbone = backbone
            self.head = backbone.layers[-1]
        else:
            features = backbone.get_layer(backbones.FEATURES_LAYER).output
            self.head = head
            self.backbone = keras.Model(
                backbone.input, head(features), name=f"{backbone.name}_{head.name}_head"
            )
        self._features = keras.Model(
            self.backbone.input,
            self.backbone.get_layer(backbones.FEATURES_LAYER).output,
        )
        self.build(self.backbone.input_shape)

    def build(self, input_shape):
        self.built = True

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            logits = self.head(self._features(x, training=True), y, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self._loss_tracker.update_state(loss * _num_replicas(), sample_weight=tf.shape(logits)[0])
        classes = self.backbone.output.shape[-1]
        return self.compute_metrics(x, y, logits[:, :classes], sample_weight=sample_weight)

    @classmethod
    def from_config(cls, config):
        return super().from_config({**config, "head": None})
