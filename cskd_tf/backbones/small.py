"""Tiny backbones for the offline demo and the tests; not part of the paper.

- `small_convnet`: three 3x3 convolutions with batch-norm for the 8x8 scikit-learn digits, small
  enough (about 57k parameters) to train in seconds on a CPU while exercising batch-norm, whose
  train/inference behaviour is what CS-KD's partner pass depends on.
- `mlp`: two dense layers and no batch-norm, so that its outputs do not depend on how a batch
  is split, which tests comparing one and two replicas need.

Both use PyTorch's default initialisers, like the paper's CIFAR backbones.
"""

from __future__ import annotations

import math

import keras

from cskd_tf.backbones import layers

SMALL_CONVNET_WIDTHS = (32, 64, 64)
SMALL_CONVNET_STRIDES = (1, 2, 1)
MLP_WIDTH = 64


def small_convnet(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """conv3x3(32)-BN-ReLU, conv3x3(64, stride 2)-BN-ReLU, conv3x3(64)-BN-ReLU, pool, dense.

    Convolutions have no bias because a batch-norm follows each one.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels), e.g. (8, 8, 1).

    Returns:
        keras.Model. Named `small_convnet`; its layer `features` outputs the pooled 64-d
        features.
    """
    input_shape = layers.check_arguments("small_convnet", num_classes, input_shape)
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for index, (width, stride) in enumerate(zip(SMALL_CONVNET_WIDTHS, SMALL_CONVNET_STRIDES), 1):
        x = layers.conv2d(
            x,
            width,
            3,
            stride=stride,
            name=f"conv{index}",
            kernel_initializer=layers.torch_default_kernel_initializer(),
        )
        x = layers.batch_norm(x, name=f"bn{index}")
        x = layers.relu(x, name=f"relu{index}")
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.classifier_head(
        features,
        num_classes,
        kernel_initializer=layers.torch_default_kernel_initializer(),
        bias_initializer=layers.torch_default_bias_initializer(SMALL_CONVNET_WIDTHS[-1]),
    )
    return keras.Model(inputs, logits, name="small_convnet")


def mlp(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """Flatten -> Dense(64, ReLU) -> Dense(64, ReLU) (`features`) -> dense (`logits`).

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. Named `mlp`; its layer `features` outputs 64-d features. It has no
        batch-norm, so each example's output is independent of the rest of its batch.
    """
    input_shape = layers.check_arguments("mlp", num_classes, input_shape)
    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Flatten(name="flatten")(inputs)
    fan_in = math.prod(input_shape)
    for name in ("hidden", "features"):
        x = keras.layers.Dense(
            MLP_WIDTH,
            activation="relu",
            kernel_initializer=layers.torch_default_kernel_initializer(),
            bias_initializer=layers.torch_default_bias_initializer(fan_in),
            name=name,
        )(x)
        fan_in = MLP_WIDTH
    logits = layers.classifier_head(
        x,
        num_classes,
        kernel_initializer=layers.torch_default_kernel_initializer(),
        bias_initializer=layers.torch_default_bias_initializer(MLP_WIDTH),
    )
    return keras.Model(inputs, logits, name="mlp")
