"""BYOT: auxiliary classifiers on a backbone's stages learn from its deepest classifier.

The self-distillation baseline "Be Your Own Teacher" of the CS-KD paper's Table 2 (Yun et al.,
CVPR 2020, section 3.1 "Baselines"). `stage_outputs` finds where each stage of a registry
backbone ends; `BYOTModel` attaches an auxiliary classifier there and trains the whole network
with `fit` on plain `(x, y)` batches, while prediction, evaluation and export see the backbone
alone.
"""

import re

import keras
import tensorflow as tf

from cskd_tf import backbones, losses
from cskd_tf.backbones import layers as backbone_layers
from cskd_tf.model import Classifier, batch_mean

# How the registry backbones name their stages; group 1 is the stage number. The first pattern
# that matches any layer decides, so that preact_resnet's stem `relu1` is not read as a stage.
_STAGE_PATTERNS = (
    re.compile(r"layer(\d+)_\d+_.+"),  # resnet, preact_resnet: blocks `layer{stage}_{index}_*`.
    re.compile(r"denseblock(\d+)_layer\d+_.+"),  # densenet: `denseblock{block}_layer{index}_*`.
    re.compile(r"relu(\d+)"),  # small_convnet: `conv{n}` -> `bn{n}` -> `relu{n}`, one per stage.
)


def stage_layers(backbone):
    """Names of the layers that end each stage of `backbone`, except the final stage.

    A stage's last layer in the functional graph's (topological) order is its output: resnet's
    `layer{stage}_{last}_out`, preact_resnet's `layer{stage}_{last}_add`, densenet's
    `denseblock{block}_layer{last}_concat` (before the transition, which downsamples like the
    first block of a resnet stage) and small_convnet's `relu{n}`.

    Args:
      backbone: keras.Model. A functional backbone named like the registry's
        (`cskd_tf.backbones`).

    Returns:
      list[str]. One layer name per stage but the last, shallowest first.

    Raises:
      ValueError: if `backbone` has fewer than two recognisable stages (e.g. the `mlp`).
    """
    ends = {}
    for pattern in _STAGE_PATTERNS:
        for layer in backbone.layers:
            match = pattern.fullmatch(layer.name)
            if match:
                ends[int(match.group(1))] = layer.name
        if ends:
            break
    if len(ends) < 2:
        raise ValueError(
            f"Backbone '{backbone.name}' has no stages that BYOT recognises (layers named like "
            "resnet's layer{stage}_{index}_*, densenet's denseblock{block}_* or small_convnet's "
            "relu{n}), so no auxiliary classifier can be attached to it."
        )
    return [ends[stage] for stage in sorted(ends)[:-1]]


def stage_outputs(backbone):
    """The symbolic outputs of every stage of `backbone` but the final one.

    Args:
      backbone: keras.Model. A functional registry backbone.

    Returns:
      list[KerasTensor]. NHWC feature maps, shallowest first (see `stage_layers`).

    Raises:
      ValueError: if `backbone` has fewer than two recognisable stages.
    """
    return [backbone.get_layer(name).output for name in stage_layers(backbone)]


def _auxiliary_head(x, index, target_shape, num_classes, dtype):
    """BYOT's bottleneck and classifier on one stage's feature map.

    Args:
      x: KerasTensor. The stage's output `[batch, h, w, c]`.
      index: int. 1-based position of the stage, for the layer names `aux{index}_*`.
      target_shape: tuple. `(h_C, w_C, D)` of the deepest feature map (before pooling).
      num_classes: int. Width of the logits.
      dtype: keras.DTypePolicy. Policy of the convolutions and batch-norms.

    Returns:
      tuple[KerasTensor, KerasTensor]. Pooled features `[batch, D]` and float32 logits
      `[batch, num_classes]`.
    """
    height, width = x.shape[1:3]
    target_height, target_width, depth = target_shape
    # kernel = stride = the downsampling factor of the stages in between, as BYOT's bottleneck.
    factor = (max(1, height // target_height), max(1, width // target_width))
    middle = max(1, depth // 4)
    for name, filters, kernel in (("conv1", middle, 1), ("conv2", middle, factor)):
        x = _conv_bn_relu(x, filters, kernel, f"aux{index}_{name}", dtype)
    x = _conv_bn_relu(x, depth, 1, f"aux{index}_conv3", dtype)
    features = keras.layers.GlobalAveragePooling2D(dtype=dtype, name=f"aux{index}_features")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=backbone_layers.torch_default_kernel_initializer(),
        bias_initializer=backbone_layers.torch_default_bias_initializer(depth),
        # float32, as the backbone's `logits`: the temperature-scaled softmaxes need it.
        dtype="float32",
        name=f"aux{index}_logits",
    )(features)
    return features, logits


def _conv_bn_relu(x, filters, kernel, name, dtype):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=kernel,
        padding="valid",
        use_bias=False,  # A batch-norm follows.
        kernel_initializer=backbone_layers.kaiming_normal_initializer("fan_out"),
        dtype=dtype,
        name=name,
    )(x)
    x = backbone_layers.TorchBatchNormalization(
        momentum=backbone_layers.BN_MOMENTUM,
        epsilon=backbone_layers.BN_EPSILON,
        dtype=dtype,
        name=f"{name}_bn",
    )(x)
    return keras.layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)


@keras.saving.register_keras_serializable(package="cskd_tf")
class BYOTModel(Classifier):
    """Trains a backbone with BYOT: auxiliary classifiers on its stages learn from its deepest one.

    Each stage but the last (`stage_outputs`) gets an auxiliary head: BYOT's bottleneck,
    1x1 conv (D/4) -> BN -> ReLU -> k x k conv with stride k (D/4) -> BN -> ReLU -> 1x1 conv (D)
    -> BN -> ReLU, where D is the width of the backbone's pooled `features` and k the spatial
    downsampling between the stage and the last feature map (8, 4, 2 for the four-stage
    networks), then a global average pool giving features `F_i [batch, D]` and a dense layer
    giving logits `q_i`. `fit` takes plain `(x, y)` batches and minimises

        CE(q_C, y) + sum_i [ (1 - alpha) * CE(q_i, y)
                             + alpha * T^2 * KL(sg(softmax(q_C / T)) || softmax(q_i / T))
                             + beta * ||F_i - sg(F_C)||^2 ]

    where `q_C`, `F_C` are the backbone's logits and pooled features and `sg` stops the
    gradient: the KD and feature terms train the shallow parts and never the deepest
    classifier. `CE(q_C, y)` is the compiled loss (label smoothing, Mixup's soft labels, ...
    apply to it); the auxiliary cross-entropies are plain cross-entropy (soft labels accepted).
    Every term is a mean over the batch; the history reports the deepest `ce_loss` and the
    unweighted sums over the heads `aux_ce_loss`, `aux_kd_loss` and `aux_feature_loss`.

    `backbone` (the attribute) stays the plain classifier, images -> deepest logits: `call`,
    `predict`, `evaluate`, export and `cskd_tf.callbacks.classifier_of` see it alone, and the
    auxiliary heads are used in training only. They are saved with the model (in
    `training_model`), and `load_model` returns it compiled with its optimizer's state, so
    training resumes from a `.keras` file.

    The defaults (T = 3, alpha = 0.3, beta = 0.03) are our reading of the BYOT paper; the
    CS-KD paper does not give them.

    Args:
      backbone: keras.Model. A functional registry backbone (with a `features` layer and
        named stages, see `stage_layers`).
      temperature: float. Softening temperature `T > 0` of the KD term.
      alpha: float in [0, 1]. Weight of the KD term against the auxiliary cross-entropies.
      beta: float >= 0. Weight of the feature term.
      **kwargs: forwarded to `keras.Model`.

    Raises:
      ValueError: for a backbone without stages or a `features` layer, or a bad weight.

    Reference: Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional
    Neural Networks via Self Distillation", ICCV 2019, section 3.
    """

    def __init__(self, backbone, temperature=3.0, alpha=0.3, beta=0.03, **kwargs):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        parts = ("ce_loss", "aux_ce_loss", "aux_kd_loss", "aux_feature_loss")
        super().__init__(backbone, parts=parts, **kwargs)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.training_model = self._training_model(backbone)
        self.num_auxiliary = (len(self.training_model.outputs) - 2) // 2
        self._build_with_backbone()

    @staticmethod
    def _training_model(backbone):
        """images -> [deep logits, deep features, aux logits..., aux features...]."""
        names = stage_layers(backbone)
        try:
            pooling = backbone.get_layer(backbones.FEATURES_LAYER)
        except ValueError as error:
            raise ValueError(
                f"Backbone '{backbone.name}' has no layer named '{backbones.FEATURES_LAYER}', "
                "which BYOT's feature term needs."
            ) from error
        target_shape = tuple(pooling.input.shape[1:])
        if len(target_shape) != 3:
            raise ValueError(
                f"BYOT needs the '{backbones.FEATURES_LAYER}' layer of backbone "
                f"'{backbone.name}' to pool a feature map, but its input has shape "
                f"{pooling.input.shape}."
            )
        aux_features, aux_logits = [], []
        for index, name in enumerate(names, 1):
            stage = backbone.get_layer(name)
            classes = backbone.output.shape[-1]
            features, logits = _auxiliary_head(
                stage.output, index, target_shape, classes, stage.dtype_policy
            )
            aux_features.append(features)
            aux_logits.append(logits)
        return keras.Model(
            backbone.input,
            [backbone.output, pooling.output, *aux_logits, *aux_features],
            name=f"{backbone.name}_byot",
        )

    def compute_terms(self, x, y, sample_weight=None, training=True):
        """The loss of one batch, its parts, and the outputs they come from.

        Every value is this replica's share (divided by the replica count, because the
        optimizer sums the replicas' gradients), as Keras' own losses are. The model must be
        compiled: the deepest term is the compiled loss.

        Args:
          x: float tensor. Images.
          y: labels `[batch]` or soft targets `[batch, classes]`.
          sample_weight: float tensor `[batch]` or None.
          training: bool. Runs the network in training mode (batch statistics).

        Returns:
          tuple[dict, dict]. The scalars `loss`, `ce_loss`, `aux_ce_loss`, `aux_kd_loss`,
          `aux_feature_loss`; and the outputs `logits`, `features` (deepest) and the lists
          `aux_logits`, `aux_features`, shallowest first.
        """
        outputs = self.training_model(x, training=training)
        n = self.num_auxiliary
        out = {
            "logits": outputs[0],
            "features": outputs[1],
            "aux_logits": list(outputs[2 : 2 + n]),
            "aux_features": list(outputs[2 + n :]),
        }
        weights = None if sample_weight is None else tf.reshape(sample_weight, [-1])

        def term(values):
            if weights is not None:
                values *= tf.cast(weights, values.dtype)
            return batch_mean(values)

        # Keras losses already divide by the replica count.
        ce = self._compute_loss(
            x=x, y=y, y_pred=out["logits"], sample_weight=sample_weight, training=training
        )
        target_features = tf.stop_gradient(tf.cast(out["features"], tf.float32))
        aux_ce = aux_kd = aux_feature = tf.constant(0.0)
        for logits, features in zip(out["aux_logits"], out["aux_features"]):
            aux_ce += term(losses.cross_entropy(logits, y))
            # class_wise_kl stops the gradient through the deepest logits, its target.
            aux_kd += term(losses.class_wise_kl(logits, out["logits"], self.temperature))
            squared = tf.square(tf.cast(features, tf.float32) - target_features)
            aux_feature += term(tf.reduce_sum(squared, axis=-1))
        loss = (
            tf.cast(ce, tf.float32)
            + (1.0 - self.alpha) * aux_ce
            + self.alpha * aux_kd
            + self.beta * aux_feature
        )
        terms = {
            "loss": loss,
            "ce_loss": ce,
            "aux_ce_loss": aux_ce,
            "aux_kd_loss": aux_kd,
            "aux_feature_loss": aux_feature,
        }
        return terms, out

    def compute_objective(self, x, y, sample_weight):
        terms, outputs = self.compute_terms(x, y, sample_weight, training=True)
        parts = {name: terms[name] for name in self.part_trackers()}
        return dict(loss=terms["loss"], parts=parts, logits=outputs["logits"])

    def compile_from_config(self, config):
        # What keras.Model does for a model that keeps Keras' `compile` (it skips models that
        # override it, as `Classifier` does): a loaded model comes back compiled, with the
        # optimizer's state, so that training resumes from a `.keras` file.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        # The auxiliary heads are rebuilt from the backbone; the .keras file holds their weights.
        config.update(
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
        )
        return config
