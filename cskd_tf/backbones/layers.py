"""Building blocks shared by the backbones: PyTorch-faithful layers and initialisers.

The backbones reproduce PyTorch models (the authors' code base, alinlab/cs-kd, and
torchvision), so three PyTorch conventions that Keras does not share are made explicit here:

- Padding. PyTorch pads symmetrically (`padding=p` adds `p` rows and columns on every side).
  Keras' `padding="same"` with stride 2 pads only at the bottom and right for even inputs,
  which shifts the sampling grid by one pixel against PyTorch. Strided layers therefore get an
  explicit `ZeroPadding2D` followed by `padding="valid"`; for stride 1 and `p == k // 2`,
  `"same"` is the same computation and is kept.
- Batch-norm. PyTorch's `momentum=0.1` (weight of the new batch) is Keras' `momentum=0.9`
  (weight of the old value), and PyTorch's `eps` defaults to 1e-5 where Keras' is 1e-3.
  PyTorch's `BatchNorm2d` also updates its running variance with the unbiased batch variance,
  Keras' `BatchNormalization` with the biased one: `TorchBatchNormalization` does as PyTorch.
- Initialisers. Each PyTorch default or explicit `nn.init` call has a Keras equivalent below.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# PyTorch's BatchNorm2d defaults (momentum 0.1 in its convention, eps 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_default_kernel_initializer() -> keras.initializers.Initializer:
    """PyTorch's default `Conv2d` / `Linear` weight initialiser.

    `reset_parameters` calls `kaiming_uniform_(w, a=sqrt(5))`: bound = gain * sqrt(3 / fan_in)
    with gain = sqrt(2 / (1 + 5)), i.e. bound = sqrt(1 / fan_in), which is Keras'
    `VarianceScaling(1/3, "fan_in", "uniform")` (limit = sqrt(3 * scale / fan_in)).

    Returns:
        keras.initializers.Initializer. A fresh, unseeded initialiser (a new instance per layer,
        so no two layers share random draws).
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


def torch_default_bias_initializer(fan_in: int) -> keras.initializers.Initializer:
    """PyTorch's default `Conv2d` / `Linear` bias initialiser, uniform(+-1 / sqrt(fan_in)).

    Keras bias initialisers do not see the kernel's fan-in, so the caller passes it.

    Args:
        fan_in: int. Number of inputs of the layer (in_features for a dense layer,
            in_channels * kernel height * kernel width for a convolution).

    Returns:
        keras.initializers.Initializer. A fresh, unseeded uniform initialiser.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(minval=-bound, maxval=bound)


def kaiming_normal_initializer(mode: str = "fan_in") -> keras.initializers.Initializer:
    """PyTorch's `kaiming_normal_(w, mode=mode, nonlinearity="relu")` (gain sqrt(2)).

    std = sqrt(2 / fan), an untruncated normal, which is Keras'
    `VarianceScaling(2.0, mode, "untruncated_normal")` (Keras' `he_normal` is truncated).
    The default `nonlinearity="leaky_relu"` with `a=0` has the same gain, so torchvision's
    DenseNet call `kaiming_normal_(w)` is `mode="fan_in"` here.

    Args:
        mode: str. `"fan_in"` or `"fan_out"`. Keras computes both exactly as PyTorch does for
            convolution kernels (receptive field size times in or out channels).

    Returns:
        keras.initializers.Initializer. A fresh, unseeded initialiser.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode=mode, distribution="untruncated_normal"
    )


@keras.saving.register_keras_serializable(package="cskd_tf")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with PyTorch's `BatchNorm2d` moving-variance update.

    Training normalises with the batch mean and the biased batch variance, as both frameworks
    do. The moving statistics are then updated as PyTorch updates `running_mean` and
    `running_var`:

        moving_mean     = momentum * moving_mean     + (1 - momentum) * mean
        moving_variance = momentum * moving_variance + (1 - momentum) * variance * n / (n - 1)

    with `n` the number of values per channel (batch x height x width): the unbiased variance,
    where Keras' own layer uses the biased one. The difference reaches only the inference-mode
    statistics (a relative 1/(n-1) per update: 8e-3 for n = 128), which every evaluation and
    export uses.

    A batch with fewer than two values per channel leaves the moving statistics as they are.
    PyTorch refuses such a batch in training; here it is what a replica receives when a short
    last batch does not reach every replica (an empty share, whose moments are NaN), and a
    one-value batch has no unbiased variance.

    Everything else (arguments, variables, `get_config`) is Keras' layer, so weights and
    checkpoints carry over between the two classes. Masks and batch renormalisation are
    Keras' alone and fall back to its own update.

    Reference: PyTorch's `torch.nn.BatchNorm2d` (documented update of `running_var` "with
    unbiased estimator"); Ioffe & Szegedy, "Batch Normalization", ICML 2015, Algorithm 2.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        # Keras' layer (keras/src/layers/normalization/batch_normalization.py, 3.15) with only
        # the update of the moving statistics changed; BN is computed in float32 at least.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = tf.cast(inputs, compute_dtype)
        mean, variance = self._moments(inputs, None)
        shape = tf.shape(inputs)
        count = tf.reduce_prod(tf.gather(shape, self._reduction_axes))
        count = tf.cast(count, compute_dtype)
        update = count >= 2
        unbiased = variance * (count / tf.maximum(count - 1.0, 1.0))
        momentum = tf.cast(self.momentum, compute_dtype)
        moving_mean = tf.cast(self.moving_mean, compute_dtype)
        moving_variance = tf.cast(self.moving_variance, compute_dtype)
        self.moving_mean.assign(
            tf.where(update, moving_mean * momentum + mean * (1.0 - momentum), moving_mean)
        )
        self.moving_variance.assign(
            tf.where(
                update,
                moving_variance * momentum + unbiased * (1.0 - momentum),
                moving_variance,
            )
        )
        outputs = keras.ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=tf.cast(self.beta, compute_dtype) if self.center else None,
            scale=tf.cast(self.gamma, compute_dtype) if self.scale else None,
            epsilon=self.epsilon,
        )
        return tf.cast(outputs, self.compute_dtype)


def batch_norm(x, name: str):
    """Batch-normalises the last (channel) axis as PyTorch's `BatchNorm2d` does by default.

    `TorchBatchNormalization` with PyTorch's momentum and epsilon; gamma starts at 1 and beta
    at 0, as PyTorch (and torchvision's explicit init) sets them.

    Args:
        x: KerasTensor. NHWC (or [batch, features]) input.
        name: str. Layer name.

    Returns:
        KerasTensor. The normalised tensor.
    """
    return TorchBatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        gamma_initializer="ones",
        beta_initializer="zeros",
        name=name,
    )(x)


def relu(x, name: str):
    """Applies a named ReLU (names keep layer look-ups and weight porting readable).

    Args:
        x: KerasTensor. Input.
        name: str. Layer name.

    Returns:
        KerasTensor. max(x, 0).
    """
    return keras.layers.ReLU(name=name)(x)


def conv2d(
    x,
    filters: int,
    kernel_size: int,
    name: str,
    kernel_initializer: keras.initializers.Initializer,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
):
    """A bias-free 2-D convolution with PyTorch's symmetric zero padding.

    Every convolution in the reproduced ResNets and DenseNets has `bias=False` (a batch-norm
    follows or precedes it), so no bias is created.

    Args:
        x: KerasTensor. NHWC input.
        filters: int. Output channels.
        kernel_size: int. Square kernel size.
        name: str. Layer name; an explicit padding layer is named `name + "_pad"`.
        kernel_initializer: keras.initializers.Initializer. Kernel initialiser.
        stride: int. Square stride.
        padding: int | None. Zero rows/columns added on every side, as PyTorch's `padding=`;
            None means `kernel_size // 2`.
        groups: int. PyTorch's `groups=`: input and output channels are cut into `groups`
            contiguous slices and slice g of the output sees slice g of the input only. The
            kernel is HWIO of shape `(k, k, in_channels // groups, filters)`, output channels
            `[g * filters // groups, (g + 1) * filters // groups)` forming group g: PyTorch's
            `[filters, in_channels // groups, k, k]` weight transposed, with the same fan-in and
            fan-out. Keras' TensorFlow backend runs a grouped convolution through XLA
            (`jit_compile=True`), on every device.

    Returns:
        KerasTensor. The convolution's output, with PyTorch's output size
        `floor((H + 2 * padding - kernel_size) / stride) + 1`.
    """
    if padding is None:
        padding = kernel_size // 2
    if padding == 0:
        keras_padding = "valid"
    elif stride == 1 and kernel_size % 2 == 1 and padding == kernel_size // 2:
        # Stride 1, odd kernel: "same" pads (k - 1) / 2 on each side, exactly like PyTorch.
        keras_padding = "same"
    else:
        # Strided: "same" would pad asymmetrically (bottom/right only), so pad explicitly.
        x = keras.layers.ZeroPadding2D(padding=padding, name=name + "_pad")(x)
        keras_padding = "valid"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=keras_padding,
        use_bias=False,
        kernel_initializer=kernel_initializer,
        groups=groups,
        name=name,
    )(x)


def max_pool_3x3_s2(x, name: str):
    """PyTorch's `MaxPool2d(kernel_size=3, stride=2, padding=1)` of the ImageNet stems.

    PyTorch pads a max-pool with -inf; zeros are used here. This is equivalent because the
    pool always follows a ReLU: every window holds at least one real pixel, all real pixels are
    >= 0, so a zero from the border can never exceed the window's true maximum.

    Args:
        x: KerasTensor. NHWC input, non-negative.
        name: str. Layer name; the padding layer is named `name + "_pad"`.

    Returns:
        KerasTensor. Output of spatial size `floor((H - 1) / 2) + 1`.
    """
    x = keras.layers.ZeroPadding2D(padding=1, name=name + "_pad")(x)
    return keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="valid", name=name)(x)


def classifier_head(
    features,
    num_classes: int,
    kernel_initializer: keras.initializers.Initializer,
    bias_initializer: keras.initializers.Initializer,
):
    """The final dense layer every backbone ends with, named `logits`.

    It runs in float32 even under a `mixed_float16` policy: the CS-KD loss divides the logits by
    a temperature and compares two softmaxes, which float16 logits would degrade.

    Args:
        features: KerasTensor. The output of the layer named `features`, [batch, D].
        num_classes: int. Number of classes.
        kernel_initializer: keras.initializers.Initializer. Kernel initialiser.
        bias_initializer: keras.initializers.Initializer. Bias initialiser.

    Returns:
        KerasTensor. Logits [batch, num_classes], float32.
    """
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer,
        dtype="float32",
        name="logits",
    )(features)


def check_arguments(name: str, num_classes: int, input_shape) -> tuple[int, int, int]:
    """Validates a backbone's arguments, failing with one clear sentence.

    Args:
        name: str. Backbone name, for the message.
        num_classes: int. Must be a positive integer.
        input_shape: tuple. Must be (height, width, channels) of positive integers.

    Returns:
        tuple[int, int, int]. `input_shape` as a tuple of ints.

    Raises:
        ValueError: if an argument is malformed.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(
            f"Backbone '{name}' needs a positive integer num_classes, got {num_classes!r}."
        )
    shape = tuple(input_shape)
    if len(shape) != 3 or any(d is None or int(d) != d or d < 1 for d in shape):
        raise ValueError(
            f"Backbone '{name}' needs input_shape (height, width, channels) of positive "
            f"integers, got {input_shape!r}."
        )
    return tuple(int(d) for d in shape)
