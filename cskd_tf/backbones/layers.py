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
- Initialisers. Each PyTorch default or explicit `nn.init` call has a Keras equivalent below.
"""

from __future__ import annotations

import math

import keras

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


def batch_norm(x, name: str):
    """Batch-normalises the last (channel) axis with PyTorch's default hyper-parameters.

    Gamma starts at 1 and beta at 0, as PyTorch (and torchvision's explicit init) sets them.

    Args:
        x: KerasTensor. NHWC (or [batch, features]) input.
        name: str. Layer name.

    Returns:
        KerasTensor. The normalised tensor.
    """
    return keras.layers.BatchNormalization(
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
