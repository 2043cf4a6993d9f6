"""CSKDModel: any Keras classifier trained with class-wise self-distillation."""

import keras
import tensorflow as tf

from cskd_tf import losses

SAMPLE_FORMS = ("cvpr", "iclr")


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _is_pair(x):
    return isinstance(x, (tuple, list)) and len(x) in (2, 3)


def _first(x):
    """The images of a batch's `x`: `x` itself, or the first element of `(x, x_other, ...)`."""
    return x[0] if _is_pair(x) else x


def batch_mean(values):
    """The mean of per-example `values` over this replica's batch, as this replica's share.

    The reference's "batchmean", divided by the replica count because the optimizer sums
    gradients over replicas, as Keras does for its own losses (and, like Keras, an empty
    replica's share of a short last batch counts as 0). A loss term an objective reduces
    itself must go through it (or divide by the replica count) to train alike on any
    number of replicas.
    """
    total = tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), values.dtype))
    return total / _num_replicas()


def _global_share(count):
    """This replica's weight, `replicas * count / global count`, under a distribution strategy.

    Keras divides each replica's mean loss by the replica count, which is the mean over the
    global batch only when every replica holds the same number of examples. A short last
    batch is split unevenly (one example over two replicas leaves one of them empty); weighting
    each replica's mean by its share of the global batch makes any split train exactly as one
    device does on the same global batch. One scalar all-reduce per step.
    """
    count = tf.cast(count, tf.float32)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, count)
    return tf.math.divide_no_nan(_num_replicas() * count, total)


class _Untracked:
    """Holds a model out of Keras' and TensorFlow's tracking: the teacher is not saved."""

    def __init__(self, value):
        self.value = value


@keras.saving.register_keras_serializable(package="cskd_tf")
class Classifier(keras.Model):
    """A backbone trained with its compiled loss alone, and the base of every training model.

    `call` is the backbone's (so `predict`, `evaluate` and export see a plain classifier),
    and sparse cross-entropy on logits is the default loss. `fit` takes batches `(x, y)`
    (or, for the subclasses, `((x, x_other, ...), y)`: evaluation and Keras' symbolic
    build take the first element `x` alone).

    `train_step` is shared: a subclass says what its objective is (`compute_objective`)
    and this class differentiates it, applies the gradients and logs the parts. Under a
    distribution strategy with several replicas it also

    * weights each replica by its share of the global batch (`_global_share`), so a short
      last batch split unevenly over the replicas trains as on one device;
    * skips the forward and backward passes of a replica whose share of a short last batch
      is empty (it contributes zero gradients): Keras' batch-norm turns its moving
      statistics into NaN on an empty batch, and oneDNN's CPU convolution returns an empty
      input unchanged, which breaks the next layer's shapes.

    On one device neither applies and the step is the plain one.

    Args:
      backbone: keras.Model. Maps images to logits `[batch, classes]`.
      parts: sequence of str. Names of the loss parts `compute_objective` returns, each
        logged by `fit` (a subclass passes its own).
      **kwargs: forwarded to `keras.Model`.
    """

    def __init__(self, backbone, parts=(), **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._parts = [keras.metrics.Mean(name=name) for name in parts]
        if type(self) is Classifier:  # A subclass calls it once its own state exists.
            self._build_with_backbone()

    def _build_with_backbone(self):
        # Built with its backbone, so summary(), save() and the weights work before fit
        # (Keras then refuses new state: a subclass calls this last in its `__init__`).
        if self.backbone.built:
            self.build(self.backbone.input_shape)

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

    # --- The objective: what a subclass defines ----------------------------------------------

    def part_trackers(self):
        """`{name: keras.metrics.Mean}` of the loss parts `compute_objective` returns."""
        return {tracker.name: tracker for tracker in self._parts}

    def compute_objective(self, x, y, sample_weight):
        """The loss of one training batch, its parts and the logits the metrics see.

        Runs inside the gradient tape, in training mode. Every value is this replica's
        share, divided by the replica count as Keras' own losses are.

        Args:
          x: the batch's inputs (images, or a tuple of views).
          y: labels `[batch]` or soft targets `[batch, classes]`.
          sample_weight: float tensor `[batch]` or None.

        Returns:
          dict with `loss` (float32 scalar), `parts` (`{name: scalar}` for every name of
          `part_trackers`) and `logits` (`[batch, classes]`, for the compiled metrics).
        """
        logits = self(x, training=True)
        loss = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
        )
        return dict(loss=loss, parts={}, logits=logits)

    def empty_objective(self, x, y):
        """What `compute_objective` returns, as zeros, for a replica without examples."""
        classes = self.backbone.output.shape[-1]
        return dict(
            loss=tf.constant(0.0),
            parts={name: tf.constant(0.0) for name in self.part_trackers()},
            logits=tf.zeros([0, classes], tf.float32),
        )

    def reduce_objective(self, objective):
        """Completes the objective with statistics of the global batch (DDGSD's MMD).

        Runs on every replica, empty or not, outside the guard that skips empty ones, so
        that collectives see every replica. The default has none.
        """
        return objective

    # --- The shared step ----------------------------------------------------------------------

    def _guarded(self, count, compute, empty):
        if _num_replicas() == 1:
            return compute()
        return tf.cond(count > 0, compute, empty)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        count = tf.shape(_first(x))[0]
        replicas = _num_replicas()
        with tf.GradientTape() as tape:
            objective = self._guarded(
                count,
                lambda: self.compute_objective(x, y, sample_weight),
                lambda: self.empty_objective(x, y),
            )
            objective = self.reduce_objective(objective)
            loss = objective["loss"]
            if replicas > 1:
                loss = loss * _global_share(count)
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))

        # Per-replica means weighted by their example counts: the mean over the global batch.
        self._loss_tracker.update_state(objective["loss"] * replicas, sample_weight=count)
        for name, tracker in self.part_trackers().items():
            tracker.update_state(objective["parts"][name] * replicas, sample_weight=count)
        return self.compute_metrics(
            _first(x), y, objective["logits"], sample_weight=sample_weight
        )

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = _first(x)  # A paired dataset evaluates on its first elements.
        count = tf.shape(x)[0]
        classes = self.backbone.output.shape[-1]
        logits = self._guarded(
            count,
            lambda: tf.cast(self(x, training=False), tf.float32),
            lambda: tf.zeros([0, classes], tf.float32),
        )
        ce = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=False
        )
        self._loss_tracker.update_state(ce * _num_replicas(), sample_weight=count)
        logs = self.compute_metrics(x, y, logits, sample_weight=sample_weight)
        return {k: v for k, v in logs.items() if k not in self.part_trackers()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds from the first batch averaged over the replicas,
        # which fails when it is split unevenly (an odd batch on two replicas: "AddN must
        # have the same size"); the first replica's share shapes the build as well.
        strategy = self._distribute_strategy
        if strategy is not None and iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(batches)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Under a distribution strategy Keras builds the compiled loss and metrics
        # by calling the model on the first element of the data, which for `fit`
        # is the tuple `(x, x_other, ...)`: give it `x` alone.
        if data_batch is not None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
            data_batch = (_first(x), y, sample_weight)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="cskd_tf")
class CSKDModel(Classifier):
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

    The passes run in the authors' order and mode: the anchors' pass first, then
    the partners' (and CS-KD-E's clean view's) in training mode, their outputs
    fixed targets (no gradient flows into them). Batch-norm normalises each batch with its own
    statistics and both passes update the moving statistics, the anchors' first
    (the order changes no gradient, only the moving statistics). A fixed target
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
        parts = ["ce_loss", "cls_loss"]
        parts += ["sample_loss"] if lambda_sample else []
        parts += ["kd_loss"] if teacher is not None else []
        super().__init__(backbone, parts=parts, **kwargs)
        self.temperature = float(temperature)
        self.lambda_cls = float(lambda_cls)
        self.lambda_sample = float(lambda_sample)
        self.sample_form = sample_form
        self._teacher = _Untracked(teacher)
        if teacher is not None:
            teacher.trainable = False
        self.kd_alpha = float(kd_alpha)
        self.kd_temperature = float(kd_temperature)
        self._build_with_backbone()

    @property
    def teacher(self):
        return self._teacher.value

    def compute_objective(self, x, y, sample_weight):
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
            return batch_mean(values)

        # The authors' order: the anchors' pass first, then the fixed targets' passes (in
        # training mode, as theirs, and without gradient). In a graph, TensorFlow runs
        # the batch-norm updates of the passes in this program order.
        logits = self(x, training=True)
        fixed = lambda inputs: tf.stop_gradient(self(inputs, training=True))
        pair_logits = fixed(x_pair) if x_pair is not None else None
        fixed_clean = self.lambda_sample and self.sample_form == "cvpr"
        clean_logits = fixed(x_clean) if fixed_clean else None
        teacher_logits = (
            tf.stop_gradient(self.teacher(x, training=False)) if self.teacher is not None else None
        )
        # Keras losses already divide by the replica count.
        ce = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
        )
        loss = (1.0 - self.kd_alpha) * ce
        parts = {name: tf.constant(0.0) for name in self.part_trackers()}
        parts["ce_loss"] = ce
        if pair_logits is not None:
            parts["cls_loss"] = term(losses.class_wise_kl(logits, pair_logits, self.temperature))
            loss += self.lambda_cls * parts["cls_loss"]
        if clean_logits is not None:
            parts["sample_loss"] = term(
                losses.class_wise_kl(logits, clean_logits, self.temperature)
            )
            loss += self.lambda_sample * parts["sample_loss"]
        elif self.lambda_sample:  # The ICLR form: the clean view's pass is differentiated.
            clean = self(x_clean, training=True)
            parts["sample_loss"] = term(losses.kl_divergence(clean, logits, self.temperature))
            loss += self.lambda_sample * parts["sample_loss"]
        if teacher_logits is not None:
            parts["kd_loss"] = term(
                losses.class_wise_kl(logits, teacher_logits, self.kd_temperature)
            )
            loss += self.kd_alpha * parts["kd_loss"]
        return dict(loss=loss, parts=parts, logits=logits)

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
class HeadModel(Classifier):
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
        from cskd_tf import backbones  # pylint: disable=g-import-not-at-top

        if head is None:  # Reloaded from its config: `backbone` is already assembled.
            head = backbone.layers[-1]
        else:
            features = backbone.get_layer(backbones.FEATURES_LAYER).output
            backbone = keras.Model(
                backbone.input, head(features), name=f"{backbone.name}_{head.name}_head"
            )
        super().__init__(backbone, **kwargs)
        self.head = head
        self._features = keras.Model(
            self.backbone.input,
            self.backbone.get_layer(backbones.FEATURES_LAYER).output,
        )
        self._build_with_backbone()

    def compute_objective(self, x, y, sample_weight):
        features = self._features(x, training=True)
        # A head with state (AdaCos' scale) stores it in `reduce_objective`, on every replica.
        stateful = hasattr(self.head, "update_scale")
        kwargs = dict(update=False) if stateful else {}
        logits = self.head(features, y, training=True, **kwargs)
        loss = self._compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True
        )
        classes = self.backbone.output.shape[-1]
        objective = dict(loss=loss, parts={}, logits=logits[:, :classes])
        if stateful:
            objective["scale"] = self.head.batch_scale(features, y)
        return objective

    def empty_objective(self, x, y):
        objective = super().empty_objective(x, y)
        if hasattr(self.head, "update_scale"):
            objective["scale"] = tf.convert_to_tensor(self.head.scale)
        return objective

    def reduce_objective(self, objective):
        if "scale" in objective:
            count = tf.shape(objective["logits"])[0]
            self.head.update_scale(objective.pop("scale"), count)
        return objective

    @classmethod
    def from_config(cls, config):
        return super().from_config({**config, "head": None})


@keras.saving.register_keras_serializable(package="cskd_tf")
class ObjectiveModel(Classifier):
    """A backbone trained with the objective of a registered method (`cskd_tf.methods`).

    For methods that are an objective, and perhaps some state kept from step to step,
    rather than a model of their own: `compute_objective` calls the method's
    `objective(model, x, y, sample_weight)`, and its `state(model)` creates the
    variables it keeps. Everything else (the shared step, replicas, saving) is
    `Classifier`'s.

    Args:
      backbone: keras.Model. Maps images to logits `[batch, classes]`.
      method: str. The registered method's name.
      options: dict. The method's flags (`Method.flags`) by name.
      context: dict. The run's `cskd_tf.methods.Context`, without the teacher.
      **kwargs: forwarded to `keras.Model`.
    """

    def __init__(self, backbone, method, options=None, context=None, **kwargs):
        from cskd_tf import methods  # pylint: disable=g-import-not-at-top

        spec = methods.get(method)
        super().__init__(backbone, parts=spec.parts, **kwargs)
        self.method = method
        self.options = dict(options or {})
        self.context = dict(context or {})
        self._spec = _Untracked(spec)
        if spec.state is not None:
            spec.state(self)
        self._build_with_backbone()

    def compute_objective(self, x, y, sample_weight):
        return self._spec.value.objective(self, x, y, sample_weight)

    def empty_objective(self, x, y):
        empty = self._spec.value.empty
        return super().empty_objective(x, y) if empty is None else empty(self, x, y)

    def reduce_objective(self, objective):
        reduce = self._spec.value.reduce
        return objective if reduce is None else reduce(self, objective)

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, options=self.options, context=self.context)
        return config
