"""Pre-activation ResNets for 32x32 inputs (CIFAR-100, TinyImageNet), as the CS-KD authors wrote.

The architecture follows the authors' `CIFAR_ResNet` with `PreActBlock` (alinlab/cs-kd,
`models/resnet.py`, itself after Kuang Liu's pytorch-cifar):

    conv3x3(64, stride 1, no bias) -> BN -> ReLU
    4 stages of pre-activation basic blocks, widths 64/128/256/512, strides 1/2/2/2
    global average pool (`features`) -> dense with bias (`logits`)

A pre-activation block computes `a = ReLU(BN(x))` once and feeds it to both the residual branch
(conv3x3 -> BN -> ReLU -> conv3x3) and the shortcut. When the stride or the width changes, the
shortcut is a bias-free 1x1 convolution of `a` without batch-norm. Otherwise the shortcut is
`a` itself, not `x`: the reference's `PreActBlock` always holds `self.shortcut = nn.Sequential()`
(the identity) and calls `self.shortcut(out)` on the pre-activated tensor, unlike Kuang Liu's
original (`... if hasattr(self, "shortcut") else x`) and He et al.'s clean identity path. The
numbers to reproduce come from the authors' variant, so it is kept. There is no batch-norm or
ReLU after the last block: the reference pools the raw sum of the last block.

The reference pools with `avg_pool2d(out, 4)`, which is a global average on 32x32 inputs; a
global average pool is used here so that other input sizes work too.
"""

from __future__ import annotations

import keras

from cskd_tf.backbones import layers

WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)


def _conv_init() -> keras.initializers.Initializer:
    # The reference sets no initialiser, so PyTorch's default kaiming_uniform(a=sqrt(5)) applies.
    return layers.torch_default_kernel_initializer()


def _preact_block(x, in_channels: int, width: int, stride: int, name: str):
    """One pre-activation basic block, as the reference's `PreActBlock` computes it.

    Args:
        x: KerasTensor. Block input, NHWC with `in_channels` channels.
        in_channels: int. Channels of `x`.
        width: int. Output channels.
        stride: int. Stride of the first 3x3 convolution and of the shortcut.
        name: str. Prefix of the block's layer names, e.g. `layer2_0`.

    Returns:
        KerasTensor. Block output with `width` channels.
    """
    out = layers.batch_norm(x, name=f"{name}_bn1")
    out = layers.relu(out, name=f"{name}_relu1")
    if stride != 1 or in_channels != width:
        # Projection of the pre-activated input, with no BN, as in the reference.
        shortcut = layers.conv2d(
            out,
            width,
            1,
            stride=stride,
            padding=0,
            name=f"{name}_shortcut",
            kernel_initializer=_conv_init(),
        )
    else:
        # The reference's identity shortcut also takes the pre-activated input (module docstring).
        shortcut = out
    out = layers.conv2d(
        out, width, 3, stride=stride, name=f"{name}_conv1", kernel_initializer=_conv_init()
    )
    out = layers.batch_norm(out, name=f"{name}_bn2")
    out = layers.relu(out, name=f"{name}_relu2")
    out = layers.conv2d(out, width, 3, name=f"{name}_conv2", kernel_initializer=_conv_init())
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def preact_resnet(
    blocks_per_stage: tuple[int, int, int, int],
    num_classes: int,
    input_shape: tuple[int, int, int],
    name: str,
) -> keras.Model:
    """Builds a pre-activation ResNet with a 32x32-style stem.

    Args:
        blocks_per_stage: tuple[int, int, int, int]. Blocks in each of the four stages.
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels) of normalised images.
        name: str. Model name.

    Returns:
        keras.Model. Maps images to float32 logits [batch, num_classes]; its layer `features`
        outputs the pooled 512-d penultimate features.

    Reference:
        He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016; CS-KD
        (Yun et al., CVPR 2020), section 3.1, "Network architecture".
    """
    input_shape = layers.check_arguments(name, num_classes, input_shape)
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.conv2d(inputs, 64, 3, stride=1, name="conv1", kernel_initializer=_conv_init())
    x = layers.batch_norm(x, name="bn1")
    x = layers.relu(x, name="relu1")
    in_channels = 64
    for stage, (num_blocks, width, stride) in enumerate(zip(blocks_per_stage, WIDTHS, STRIDES), 1):
        for index in range(num_blocks):
            x = _preact_block(
                x, in_channels, width, stride if index == 0 else 1, name=f"layer{stage}_{index}"
            )
            in_channels = width
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.classifier_head(
        features,
        num_classes,
        # nn.Linear defaults: kaiming_uniform(a=sqrt(5)) kernel, uniform(+-1/sqrt(fan_in)) bias.
        kernel_initializer=layers.torch_default_kernel_initializer(),
        bias_initializer=layers.torch_default_bias_initializer(in_channels),
    )
    return keras.Model(inputs, logits, name=name)


def preact_resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """PreAct ResNet-18 ([2, 2, 2, 2]), the CIFAR-100 / TinyImageNet backbone of the paper.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `preact_resnet18`.
    """
    return preact_resnet((2, 2, 2, 2), num_classes, input_shape, name="preact_resnet18")


def preact_resnet10(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """PreAct ResNet-10 ([1, 1, 1, 1]), the reference's `CIFAR_ResNet10`.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `preact_resnet10`.
    """
    return preact_resnet((1, 1, 1, 1), num_classes, input_shape, name="preact_resnet10")


def preact_resnet34(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """PreAct ResNet-34 ([3, 4, 6, 3]), the reference's `CIFAR_ResNet34`.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `preact_resnet34`.
    """
    return preact_resnet((3, 4, 6, 3), num_classes, input_shape, name="preact_resnet34")
