"""torchvision-style ResNets for 224x224 inputs (CUB-200-2011, Stanford Dogs, MIT67, ImageNet).

The architecture follows torchvision's `ResNet`, which the authors' `models/resnet.py` copies:

    conv7x7(64, stride 2, padding 3, no bias) -> BN -> ReLU -> maxpool3x3(stride 2, padding 1)
    4 stages, widths 64/128/256/512, strides 1/2/2/2
    global average pool (`features`) -> dense with bias (`logits`)

ResNet-10/18 use basic blocks (two 3x3 convolutions); ResNet-50/101 use bottleneck blocks with
the stride on the 3x3 convolution ("ResNet v1.5") and expansion 4. The first block of a stage
gets a downsample shortcut (1x1 convolution with the block's stride, then BN) when the stride or
the channel count changes. The block output is `ReLU(branch + shortcut)`.

ResNeXt (Xie et al., CVPR 2017) is torchvision's same `ResNet` with `groups` and
`width_per_group`: a stage of `planes` (64/128/256/512) has bottleneck width
`int(planes * width_per_group / 64) * groups` and a grouped 3x3 convolution, the output still
`4 * planes`. ResNeXt-101 32x4d (Table 5) is `ResNet(Bottleneck, [3, 4, 23, 3], groups=32,
width_per_group=4)`; ResNet-50/101 are `groups=1, width_per_group=64`.
"""

from __future__ import annotations

import functools

import keras

from cskd_tf.backbones import layers

WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)


def _conv_init() -> keras.initializers.Initializer:
    # torchvision: kaiming_normal_(w, mode="fan_out", nonlinearity="relu") on every Conv2d.
    return layers.kaiming_normal_initializer("fan_out")


def _downsample(x, channels: int, stride: int, name: str):
    """torchvision's downsample shortcut: bias-free 1x1 convolution then BN.

    Args:
        x: KerasTensor. Block input.
        channels: int. Output channels.
        stride: int. Stride.
        name: str. Block prefix; layers are `{name}_downsample_conv` and `{name}_downsample_bn`.

    Returns:
        KerasTensor. The projected shortcut.
    """
    x = layers.conv2d(
        x,
        channels,
        1,
        stride=stride,
        padding=0,
        name=f"{name}_downsample_conv",
        kernel_initializer=_conv_init(),
    )
    return layers.batch_norm(x, name=f"{name}_downsample_bn")


def _basic_block(x, in_channels: int, width: int, stride: int, name: str):
    """torchvision's `BasicBlock` (expansion 1).

    Args:
        x: KerasTensor. Block input with `in_channels` channels.
        in_channels: int. Channels of `x`.
        width: int. Output channels.
        stride: int. Stride of the first 3x3 convolution.
        name: str. Layer-name prefix, e.g. `layer2_0`.

    Returns:
        tuple[KerasTensor, int]. Block output and its channel count.
    """
    if stride != 1 or in_channels != width:
        shortcut = _downsample(x, width, stride, name)
    else:
        shortcut = x
    out = layers.conv2d(
        x, width, 3, stride=stride, name=f"{name}_conv1", kernel_initializer=_conv_init()
    )
    out = layers.batch_norm(out, name=f"{name}_bn1")
    out = layers.relu(out, name=f"{name}_relu1")
    out = layers.conv2d(out, width, 3, name=f"{name}_conv2", kernel_initializer=_conv_init())
    out = layers.batch_norm(out, name=f"{name}_bn2")
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return layers.relu(out, name=f"{name}_out"), width


def _bottleneck_block(
    x,
    in_channels: int,
    planes: int,
    stride: int,
    name: str,
    groups: int = 1,
    width_per_group: int = 64,
):
    """torchvision's `Bottleneck` (expansion 4, stride on the grouped 3x3 convolution).

    Args:
        x: KerasTensor. Block input with `in_channels` channels.
        in_channels: int. Channels of `x`.
        planes: int. The stage's width (64/128/256/512); the output has `4 * planes` channels.
        stride: int. Stride of the 3x3 convolution.
        name: str. Layer-name prefix, e.g. `layer2_0`.
        groups: int. Groups of the 3x3 convolution (torchvision's `groups`; 32 for ResNeXt).
        width_per_group: int. torchvision's `width_per_group` (`base_width`): the width is
            `int(planes * width_per_group / 64) * groups` (`planes` for ResNet's 1 x 64).

    Returns:
        tuple[KerasTensor, int]. Block output and its channel count.
    """
    width = int(planes * (width_per_group / 64.0)) * groups
    out_channels = 4 * planes
    if stride != 1 or in_channels != out_channels:
        shortcut = _downsample(x, out_channels, stride, name)
    else:
        shortcut = x
    out = layers.conv2d(
        x, width, 1, padding=0, name=f"{name}_conv1", kernel_initializer=_conv_init()
    )
    out = layers.batch_norm(out, name=f"{name}_bn1")
    out = layers.relu(out, name=f"{name}_relu1")
    out = layers.conv2d(
        out,
        width,
        3,
        stride=stride,
        groups=groups,
        name=f"{name}_conv2",
        kernel_initializer=_conv_init(),
    )
    out = layers.batch_norm(out, name=f"{name}_bn2")
    out = layers.relu(out, name=f"{name}_relu2")
    out = layers.conv2d(
        out, out_channels, 1, padding=0, name=f"{name}_conv3", kernel_initializer=_conv_init()
    )
    out = layers.batch_norm(out, name=f"{name}_bn3")
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return layers.relu(out, name=f"{name}_out"), out_channels


def resnet(
    block: str,
    blocks_per_stage: tuple[int, int, int, int],
    num_classes: int,
    input_shape: tuple[int, int, int],
    name: str,
    groups: int = 1,
    width_per_group: int = 64,
) -> keras.Model:
    """Builds a torchvision-style ResNet or ResNeXt.

    Args:
        block: str. `"basic"` or `"bottleneck"`.
        blocks_per_stage: tuple[int, int, int, int]. Blocks in each of the four stages.
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels) of normalised images.
        name: str. Model name.
        groups: int. Groups of the bottleneck 3x3 convolutions (torchvision's `groups`).
        width_per_group: int. torchvision's `width_per_group` (bottleneck width per group
            and per 64 planes).

    Returns:
        keras.Model. Maps images to float32 logits [batch, num_classes]; its layer `features`
        outputs the pooled penultimate features (512-d for basic, 2048-d for bottleneck blocks).

    Raises:
        ValueError: if basic blocks are asked for with groups or a width other than torchvision's
            `BasicBlock` supports (1 and 64).

    Reference:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Xie et al.,
        "Aggregated Residual Transformations for Deep Neural Networks" (ResNeXt), CVPR 2017;
        CS-KD (Yun et al., CVPR 2020), section 3.1, "Network architecture", and Table 5.
    """
    input_shape = layers.check_arguments(name, num_classes, input_shape)
    if block == "basic" and (groups != 1 or width_per_group != 64):
        raise ValueError(
            f"Backbone '{name}': basic blocks support only groups=1 and width_per_group=64 "
            f"(as torchvision's BasicBlock), got groups={groups}, "
            f"width_per_group={width_per_group}."
        )
    make_block = {
        "basic": _basic_block,
        "bottleneck": functools.partial(
            _bottleneck_block, groups=groups, width_per_group=width_per_group
        ),
    }[block]
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.conv2d(
        inputs, 64, 7, stride=2, padding=3, name="conv1", kernel_initializer=_conv_init()
    )
    x = layers.batch_norm(x, name="bn1")
    x = layers.relu(x, name="relu")
    x = layers.max_pool_3x3_s2(x, name="maxpool")
    channels = 64
    for stage, (num_blocks, width, stride) in enumerate(zip(blocks_per_stage, WIDTHS, STRIDES), 1):
        for index in range(num_blocks):
            x, channels = make_block(
                x, channels, width, stride if index == 0 else 1, name=f"layer{stage}_{index}"
            )
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.classifier_head(
        features,
        num_classes,
        # torchvision leaves `fc` at nn.Linear's defaults: kaiming_uniform(a=sqrt(5)) kernel,
        # uniform(+-1/sqrt(fan_in)) bias.
        kernel_initializer=layers.torch_default_kernel_initializer(),
        bias_initializer=layers.torch_default_bias_initializer(channels),
    )
    return keras.Model(inputs, logits, name=name)


def resnet10(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-10 (basic blocks [1, 1, 1, 1]), the student of the paper's table 4.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnet10`.
    """
    return resnet("basic", (1, 1, 1, 1), num_classes, input_shape, name="resnet10")


def resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-18 (basic blocks [2, 2, 2, 2]), the fine-grained backbone of the paper.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnet18`.
    """
    return resnet("basic", (2, 2, 2, 2), num_classes, input_shape, name="resnet18")


def resnet34(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-34 (basic blocks [3, 4, 6, 3]).

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnet34`.
    """
    return resnet("basic", (3, 4, 6, 3), num_classes, input_shape, name="resnet34")


def resnet50(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3]), used in the paper's ImageNet table 5.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnet50`.
    """
    return resnet("bottleneck", (3, 4, 6, 3), num_classes, input_shape, name="resnet50")


def resnet101(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-101 (bottleneck blocks [3, 4, 23, 3]), used in the paper's ImageNet table 5.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnet101`.
    """
    return resnet("bottleneck", (3, 4, 23, 3), num_classes, input_shape, name="resnet101")


def resnext101_32x4d(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNeXt-101 32x4d (bottleneck blocks [3, 4, 23, 3], 32 groups of width 4 per 64 planes).

    torchvision's `ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)`: bottleneck
    widths 128/256/512/1024, outputs 256/512/1024/2048; used in the paper's ImageNet table 5.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels).

    Returns:
        keras.Model. The backbone, named `resnext101_32x4d`.
    """
    return resnet(
        "bottleneck",
        (3, 4, 23, 3),
        num_classes,
        input_shape,
        name="resnext101_32x4d",
        groups=32,
        width_per_group=4,
    )
