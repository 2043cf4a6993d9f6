"""Angular-margin classifier heads: the AdaCos and Virtual-softmax baselines.

CS-KD compares against both (Yun et al., CVPR 2020, section 3.1 "Baselines",
Tables 1 and 6). Each head replaces a network's last dense layer: it maps pooled
penultimate features `[batch, D]` to logits, and in training takes the labels,
because both methods shape the logits with the target class.

Both heads compute in float32 whatever the input dtype (their default dtype
policy is float32, as Keras advises for a mixed-precision model's output layer)
and return float32 logits.
"""

import math

import keras
import tensorflow as tf

# Clip before arccos, as the reference AdaCos implementation does: arccos has an
# infinite slope at +-1.
_COS_CLIP = 1e-7
# Squared-norm floor: keeps the norm's gradient finite for an all-zero vector.
_MIN_SQUARED_NORM = 1e-12


def _norm(v, axis):
    return tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(v), axis=axis), _MIN_SQUARED_NORM))


def _flat_labels(labels):
    return tf.reshape(tf.cast(labels, tf.int32), [-1])


@keras.saving.register_keras_serializable(package="cskd_tf")
class AdaCosHead(keras.layers.Layer):
    """Cosine classifier with the adaptive AdaCos scale.

    Logits are `s * cos(theta)`, where `cos(theta_ij)` is the cosine between
    feature `x_i` and column `j` of the kernel `W [D, C]`, and `s` is a
    non-trainable scalar variable (the `scale` weight) initialised to the fixed
    AdaCos scale `sqrt(2) * log(C - 1)` (paper eq. 13).

    A call with `training=True` and labels updates `s` from the batch (dynamic
    AdaCos, paper eqs. 15-16 and Algorithm 1):

        B_avg   = (1/N) sum_i sum_{j != y_i} exp(s_old * cos(theta_ij))
        s_new   = log(B_avg) / cos(min(pi/4, theta_med))

    where `theta_med` is the median of the target-class angles
    `theta_{i,y_i} = arccos(clip(cos, -1 + 1e-7, 1 - 1e-7))` over the batch. The
    median is the lower one (element `(N - 1) // 2` of the sorted angles) when
    `N` is even, as `torch.median` gives in the reference implementation.
    `s_new` is assigned to the variable and the returned logits are
    `s_new * cos(theta)`: the paper's Algorithm 1 computes the step's
    probabilities with the scale of that step, and so does the reference
    implementation the CS-KD authors used (4uiiurz1/pytorch-adacos). No gradient
    flows through the scale. `log(B_avg)` is computed as a log-sum-exp, so it
    cannot overflow. An empty batch (a replica's share of a short last batch)
    leaves `s` unchanged.

    Differences from that reference implementation, which follow the paper
    instead: no additive angular margin (it adds ArcFace's `m = 0.5` to the
    target angle; AdaCos is margin-free), and the median is taken over the
    target-class angles only (it takes the median over all `N * C` angles).

    Under a `tf.distribute` strategy each replica computes `s_new` from its own
    batch and returns logits scaled by it; the variable has aggregation `MEAN`,
    so the value stored (and used by the next step and at inference) is the
    mean of the replicas' `s_new`. `cskd_tf.model.HeadModel` instead calls the
    head with `update=False` and stores the mean weighted by the replicas'
    example counts (`update_scale`), so that an empty replica, whose `s_new` is
    the old scale, does not pull the scale back.

    Call arguments:
      features: float tensor `[batch, D]`.
      labels: int tensor `[batch]` (or `[batch, 1]`), or None. Needed only to
        update the scale.
      training: bool. With labels, update the scale and use the new one.

    Call returns:
      float32 logits `[batch, num_classes]`.

    Args:
      num_classes: int. Number of classes `C >= 3` (with two classes the fixed
        scale `sqrt(2) * log(C - 1)` is 0 and the update keeps it there).
      kernel_initializer: str or keras.initializers.Initializer. Initialiser of
        `W` (Glorot uniform, like the reference's Xavier uniform).
      **kwargs: forwarded to `keras.layers.Layer`.

    Reference: Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits for
    Effectively Learning Deep Face Representations", CVPR 2019, section 4.
    """

    def __init__(self, num_classes, kernel_initializer="glorot_uniform", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_classes < 3:
            raise ValueError(f"AdaCosHead needs num_classes >= 3, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.initial_scale = math.sqrt(2.0) * math.log(self.num_classes - 1)

    def build(self, input_shape):
        # autocast=False: the weights stay float32 even under a float16 compute policy.
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.num_classes),
            initializer=self.kernel_initializer,
            dtype="float32",
            autocast=False,
            name="kernel",
        )
        self.scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_scale),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="mean",
            name="scale",
        )

    def call(self, features, labels=None, training=False, update=True):
        cos = self._cosines(features)
        if not training or labels is None:
            return self.scale * cos
        new_scale = tf.stop_gradient(self._new_scale(tf.stop_gradient(cos), labels))
        if update:
            self.scale.assign(new_scale)
        return new_scale * cos

    def batch_scale(self, features, labels):
        """`s_new` of this batch, as a training call computes it, without storing it."""
        return tf.stop_gradient(self._new_scale(self._cosines(features), labels))

    def update_scale(self, scale, count):
        """Stores the mean of the replicas' `scale`, weighted by their `count` of examples.

        Call it on every replica (in replica context, outside control flow) with the
        batch's `batch_scale` and size; on one device it stores `scale`.
        """
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            count = tf.cast(count, tf.float32)
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack([scale * count, count]))
            scale = tf.where(sums[1] > 0, tf.math.divide_no_nan(sums[0], sums[1]), self.scale)
        self.scale.assign(scale)

    def _cosines(self, features):
        x = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)
        w = tf.math.l2_normalize(tf.convert_to_tensor(self.kernel), axis=0)
        return tf.matmul(x, w)

    def _new_scale(self, cos, labels):
        labels = _flat_labels(labels)
        old_scale = tf.convert_to_tensor(self.scale)
        n = tf.shape(cos)[0]
        is_target = tf.one_hot(labels, self.num_classes, on_value=True, off_value=False)
        # log B_avg = logsumexp over (i, j != y_i) of s_old * cos_ij, minus log N.
        non_target = tf.where(is_target, -math.inf, old_scale * cos)
        log_b_avg = tf.reduce_logsumexp(non_target) - tf.math.log(tf.cast(n, tf.float32))
        target_cos = tf.gather(cos, labels, axis=1, batch_dims=1)
        theta = tf.acos(tf.clip_by_value(target_cos, -1.0 + _COS_CLIP, 1.0 - _COS_CLIP))
        # Lower median; the padding element only keeps the index valid for an empty batch.
        theta = tf.concat([tf.sort(theta), [0.0]], axis=0)
        theta_med = theta[tf.maximum(n - 1, 0) // 2]
        new_scale = log_b_avg / tf.cos(tf.minimum(math.pi / 4, theta_med))
        return tf.where(n > 0, new_scale, old_scale)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="cskd_tf")
class VirtualSoftmaxHead(keras.layers.Layer):
    """Linear classifier that adds a virtual class in training (Virtual-softmax).

    At inference the logits are `x W` for a kernel `W [D, C]`, with no bias: the
    paper's analysis of the virtual class is for a bias-free linear layer, so
    this head has none.

    A call with `training=True` and labels returns `C + 1` logits: the `C`
    logits `x W`, then the virtual class's logit. The virtual class of example
    `i` has the weight `W_virt = ||W_{y_i}|| x_i / ||x_i||`, so its logit is

        W_virt . x_i = ||W_{y_i}|| * ||x_i||,

    which by Cauchy-Schwarz is at least the target logit `W_{y_i} . x_i`.
    Softmax cross-entropy of these `C + 1` logits against the original label
    `y_i` (the virtual class is never a label) is the Virtual-softmax loss. The
    gradient flows through both norms, as in the paper's formulation, where the
    virtual logit is a function of `x_i` and `W_{y_i}`.

    Call arguments:
      features: float tensor `[batch, D]`.
      labels: int tensor `[batch]` (or `[batch, 1]`), or None.
      training: bool. With labels, append the virtual logit.

    Call returns:
      float32 logits `[batch, num_classes]`, or `[batch, num_classes + 1]` in
      training with labels.

    Args:
      num_classes: int. Number of (real) classes `C >= 1`.
      kernel_initializer: str or keras.initializers.Initializer. Initialiser of `W`.
      **kwargs: forwarded to `keras.layers.Layer`.

    Reference: Chen et al., "Virtual Class Enhanced Discriminative Embedding
    Learning", NeurIPS 2018, section 3.
    """

    def __init__(self, num_classes, kernel_initializer="glorot_uniform", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"VirtualSoftmaxHead needs num_classes >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.num_classes),
            initializer=self.kernel_initializer,
            dtype="float32",
            autocast=False,
            name="kernel",
        )

    def call(self, features, labels=None, training=False):
        x = tf.cast(features, tf.float32)
        w = tf.convert_to_tensor(self.kernel)
        logits = tf.matmul(x, w)
        if not training or labels is None:
            return logits
        target_w_norm = tf.gather(_norm(w, axis=0), _flat_labels(labels))
        virtual = target_w_norm * _norm(x, axis=-1)
        return tf.concat([logits, virtual[:, None]], axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


HEADS = {"adacos": AdaCosHead, "virtual_softmax": VirtualSoftmaxHead}


def get(name, num_classes, **kwargs):
    """Builds a classifier head by name.

    Args:
      name: str. One of `HEADS`: `adacos` or `virtual_softmax`.
      num_classes: int. Number of classes.
      **kwargs: forwarded to the head's constructor (e.g. `kernel_initializer`).
        `name` here is the kind of head, so the layer keeps its default name;
        build `HEADS[name](num_classes, name=...)` to choose it.

    Returns:
      keras.layers.Layer.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in HEADS:
        raise ValueError(f"Unknown head '{name}'. Choose one of: {', '.join(HEADS)}.")
    return HEADS[name](num_classes, **kwargs)
