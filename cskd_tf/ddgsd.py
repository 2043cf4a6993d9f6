"""DDGSDModel: the data-distortion guided self-distillation baseline (Table 2 of the paper)."""

import keras
import tensorflow as tf

from cskd_tf import backbones, losses
from cskd_tf.model import Classifier, batch_mean, _num_replicas, _Untracked


def _mean_gap(features_a, features_b, sample_weight=None):
    """`(sum_i w_i (a_i - b_i), sum_i w_i)`: the numerator and denominator of the mean gap."""
    gap = tf.cast(features_a, tf.float32) - tf.cast(features_b, tf.float32)
    if sample_weight is None:
        weights = tf.ones(tf.shape(gap)[:1], tf.float32)
    else:
        weights = tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
    return tf.linalg.matvec(gap, weights, transpose_a=True), tf.reduce_sum(weights)


def linear_mmd(features_a, features_b, sample_weight=None):
    """Linear-kernel MMD^2 between two batches of features: `||mean(a) - mean(b)||^2`.

    A statistic of the whole batch, not one value per example: the means are
    weighted by `sample_weight` when given. An empty batch gives 0.

    Args:
      features_a: float tensor `[batch, D]`. Features of the first view.
      features_b: float tensor `[batch, D]`. Features of the second view.
      sample_weight: float tensor `[batch]` or None.

    Returns:
      A float32 scalar.

    Reference: Xu & Liu, "Data-distortion guided self-distillation for deep
    neural networks", AAAI 2019 (the MMD term, with a linear kernel).
    """
    total, count = _mean_gap(features_a, features_b, sample_weight)
    return tf.reduce_sum(tf.square(tf.math.divide_no_nan(total, count)))


def _global_mmd(total, count):
    # The MMD of the global batch, as this replica's share of the loss, from this replica's
    # `_mean_gap` sums. Every replica all-reduces the sums behind the two means, so all
    # compute the same global value; the all-reduce is differentiable (its gradient is the
    # all-reduce of the gradients), so each replica's gradient is already the whole
    # batch's. The optimizer sums gradients over replicas: divide by their count, as Keras
    # does for its own losses. Averaging each replica's own MMD instead would change the
    # statistic with the number of replicas.
    replicas = _num_replicas()
    context = tf.distribute.get_replica_context()
    if replicas > 1 and context is not None:
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([total, [count]], 0))
        total, count = reduced[:-1], tf.stop_gradient(reduced[-1])
    return tf.reduce_sum(tf.square(tf.math.divide_no_nan(total, count))) / replicas


@keras.saving.register_keras_serializable(package="cskd_tf")
class DDGSDModel(Classifier):
    """Wraps a classifier so that `fit` trains it with DDGSD.

    `call` is the backbone's, so `predict`, `evaluate` and export see a plain
    classifier. `fit` takes batches `((x_a, x_b), y)` in which `x_a[i]` and
    `x_b[i]` are two independently augmented views of the same image (see
    `cskd_tf.data.pair_dataset(..., partner="self")`) and minimises

        CE(f(x_a), y) + CE(f(x_b), y)
        + lambda_consistency * mean_i T^2 [KL(sg(p_b,i) || p_a,i) + KL(sg(p_a,i) || p_b,i)]
        + lambda_mmd * ||mean_i g(x_a)_i - mean_i g(x_b)_i||^2,

    with `p = softmax(f(x) / T)`, `sg` a stop-gradient (each view is the other's
    fixed target) and `g` the backbone's pooled features (its `features` layer).
    The last term is the maximum mean discrepancy with a linear kernel between
    the features of the two views of the batch.

    The cross-entropy is the compiled loss, applied to each view, so label
    smoothing or Mixup's soft labels combine with it unchanged (a backbone's
    own losses, e.g. weight regularisers, are then added once per view; the
    registry backbones have none). Both passes run in training mode with
    gradients: batch-norm normalises each view with its own statistics, and
    both update the moving statistics.

    The MMD is a statistic of the batch. Under a distribution strategy it is
    that of the global batch: the replicas all-reduce the sums behind the
    feature means, and each contributes the result divided by the replica
    count (the optimizer sums gradients over replicas), so any number of
    replicas trains as one device does on the same global batch (batch-norm,
    which normalises each replica's share by its own statistics, aside).

    The CS-KD paper re-implements DDGSD without giving its hyper-parameters:
    the defaults here (`T = 4`, both weights 1) are our choice.

    Args:
      backbone: keras.Model. A functional classifier, images -> logits
        `[batch, classes]`, with a layer named `features` (every registry
        backbone has one).
      temperature: float. Softening temperature `T > 0` of the consistency term.
      lambda_consistency: float. Weight `>= 0` of the two-way KL term.
      lambda_mmd: float. Weight `>= 0` of the MMD term.
      **kwargs: forwarded to `keras.Model`.

    Reference: Xu & Liu, "Data-distortion guided self-distillation for deep
    neural networks", AAAI 2019; the baseline of Yun et al., CVPR 2020, Table 2.
    """

    def __init__(self, backbone, temperature=4.0, lambda_consistency=1.0, lambda_mmd=1.0, **kwargs):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not lambda_consistency >= 0:
            raise ValueError(f"lambda_consistency must be >= 0, got {lambda_consistency}.")
        if not lambda_mmd >= 0:
            raise ValueError(f"lambda_mmd must be >= 0, got {lambda_mmd}.")
        super().__init__(backbone, parts=("ce_loss", "consistency_loss", "mmd_loss"), **kwargs)
        # Shares the backbone's layers; untracked, so the weights are saved once, as the
        # backbone's.
        self._feature_model = _Untracked(backbones.feature_model(backbone))
        self.temperature = float(temperature)
        self.lambda_consistency = float(lambda_consistency)
        self.lambda_mmd = float(lambda_mmd)
        self._build_with_backbone()

    def compute_terms(self, x_a, x_b, y, sample_weight=None, training=False):
        """The three parts of the loss on one batch of view pairs, before their weights.

        Needs a compiled model (the cross-entropy is the compiled loss). Under a
        distribution strategy each part is this replica's share, already divided
        by the replica count like Keras' own losses.

        Args:
          x_a: float tensor `[batch, ...]`. First view of each image.
          x_b: float tensor `[batch, ...]`. Second view of the same images.
          y: labels `[batch]`, or soft targets `[batch, classes]`.
          sample_weight: float tensor `[batch]` or None.
          training: bool. Run the backbone in training mode.

        Returns:
          `(terms, logits_a)`: a dict of float32 scalars `ce` (the sum over both
          views), `consistency` (`T^2` times the two KL terms, not yet times
          `lambda_consistency`) and `mmd` (not yet times `lambda_mmd`), and the
          logits of the first view.
        """
        terms, logits_a, (total, count) = self._local_terms(x_a, x_b, y, sample_weight, training)
        terms["mmd"] = _global_mmd(total, count)
        return terms, logits_a

    def _local_terms(self, x_a, x_b, y, sample_weight, training):
        """`compute_terms` without the MMD: the terms, and this replica's `_mean_gap` sums."""
        logits_a, features_a = self._feature_model.value(x_a, training=training)
        logits_b, features_b = self._feature_model.value(x_b, training=training)
        # Keras losses already divide by the replica count.
        ce = self._compute_loss(
            x=x_a, y=y, y_pred=logits_a, sample_weight=sample_weight, training=training
        ) + self._compute_loss(
            x=x_b, y=y, y_pred=logits_b, sample_weight=sample_weight, training=training
        )
        # Each view is the other's fixed target: class_wise_kl stops the gradient
        # through its second argument.
        kl = losses.class_wise_kl(logits_a, logits_b, self.temperature)
        kl += losses.class_wise_kl(logits_b, logits_a, self.temperature)
        if sample_weight is not None:
            kl *= tf.cast(tf.reshape(sample_weight, [-1]), kl.dtype)
        terms = {"ce": ce, "consistency": batch_mean(kl)}
        return terms, logits_a, _mean_gap(features_a, features_b, sample_weight)

    def compute_objective(self, x, y, sample_weight):
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise ValueError(
                "DDGSDModel.fit expects batches ((x_a, x_b), y) of two views of each image; "
                'build them with cskd_tf.data.pair_dataset(..., partner="self").'
            )
        terms, logits, gap = self._local_terms(*x, y, sample_weight, training=True)
        parts = {"ce_loss": terms["ce"], "consistency_loss": terms["consistency"]}
        loss = terms["ce"] + self.lambda_consistency * terms["consistency"]
        return dict(loss=loss, parts=parts, logits=logits, gap=gap)

    def empty_objective(self, x, y):
        objective = super().empty_objective(x, y)
        objective["parts"].pop("mmd_loss")
        width = self._feature_model.value.outputs[1].shape[-1]
        objective["gap"] = (tf.zeros([width], tf.float32), tf.constant(0.0))
        return objective

    def reduce_objective(self, objective):
        # The MMD is a statistic of the global batch: its all-reduce runs on every replica.
        mmd = _global_mmd(*objective.pop("gap"))
        objective["parts"]["mmd_loss"] = mmd
        objective["loss"] += self.lambda_mmd * mmd
        return objective

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            lambda_consistency=self.lambda_consistency,
            lambda_mmd=self.lambda_mmd,
        )
        return config
